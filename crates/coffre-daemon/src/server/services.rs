//! The ids the vault's helpers run as: the DHCP server, the LDAP server
//! and each VM's NFS server take one uid and gid each (the same number),
//! of no account on the host and no member's: none shares its processes
//! (`RLIMIT_NPROC` counts a user's), its limits or its signals with
//! another, and none owns a file. From a block of
//! [`SERVICE_IDS`](coffre_net::names::SERVICE_IDS) that the vault's
//! directory picks ([`coffre_net::names::service_ids`]) unless
//! `[accounts] service_first_id` says.

use crate::vaultdir::AccountsConfig;
use coffre_net::names::SERVICE_IDS;
use coffre_vault::accounts::Range;

/// The block, checked.
#[derive(Clone, Copy, Debug)]
pub(super) struct ServiceIds {
    first: u32,
}

/// Which helper.
#[derive(Clone, Copy, Debug)]
pub(super) enum Service {
    Dhcp,
    Ldap,
    /// The `k`th VM with a share (in the configuration's order).
    Nfs(usize),
}

impl ServiceIds {
    /// The block for the vault in `vault_id`: refused if it overlaps the
    /// members' range or a range the host hands out.
    pub(super) fn new(accounts: &AccountsConfig, vault_id: &str) -> Result<Self, String> {
        let first = accounts
            .service_first_id
            .unwrap_or_else(|| coffre_net::names::service_ids(vault_id));
        let block = Range {
            first,
            last: first
                .checked_add(SERVICE_IDS - 1)
                .ok_or("[accounts] service_first_id leaves no room for its block")?,
        };
        block
            .check()
            .map_err(|e| format!("the helpers' ids: {e}"))?;
        let members = accounts.range();
        let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
        let host = super::accounts::host_ranges(
            &read("/etc/login.defs"),
            &read("/etc/subuid"),
            &read("/etc/subgid"),
        );
        // systemd's dynamic users and its containers' ranges, which a
        // host may hand out at any time.
        let systemd = [
            (
                "systemd's dynamic users".to_string(),
                Range {
                    first: 61184,
                    last: 65519,
                },
            ),
            (
                "systemd's containers' ids".to_string(),
                Range {
                    first: 524_288,
                    last: 1_879_048_191,
                },
            ),
        ];
        for (what, r) in std::iter::once(("the members' ids ([accounts])".to_string(), members))
            .chain(systemd)
            .chain(host)
        {
            if block.overlaps(&r) {
                return Err(format!(
                    "the helpers' ids {block} overlap {what} ({r}): set [accounts] service_first_id to the first of {SERVICE_IDS} free ids"
                ));
            }
        }
        Ok(ServiceIds { first })
    }

    /// `service`'s uid and gid: refused if the host has an account or a
    /// group of that number.
    pub(super) fn of(&self, service: Service) -> Result<(u32, u32), String> {
        let k = match service {
            Service::Dhcp => 0,
            Service::Ldap => 1,
            Service::Nfs(k) => u32::try_from(k).unwrap_or(u32::MAX).saturating_add(2),
        };
        if k >= SERVICE_IDS {
            return Err(format!(
                "more helpers than the {SERVICE_IDS} ids of their block"
            ));
        }
        let id = self.first + k;
        if super::accounts::host_uses()(id) {
            return Err(format!(
                "id {id}, for {service:?}, is a user or a group of this host's: set [accounts] service_first_id to the first of {SERVICE_IDS} free ids"
            ));
        }
        Ok((id, id))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_helper_has_its_own_id_and_a_block_that_clashes_is_refused() {
        let mut c = AccountsConfig::default();
        let ids = ServiceIds::new(&c, "/srv/vault-a").unwrap();
        let all: Vec<u32> = [
            Service::Dhcp,
            Service::Ldap,
            Service::Nfs(0),
            Service::Nfs(1),
        ]
        .into_iter()
        .map(|s| ids.of(s).unwrap().0)
        .collect();
        let distinct: std::collections::BTreeSet<_> = all.iter().collect();
        assert_eq!(distinct.len(), all.len(), "{all:?}");
        assert!(all.iter().all(|id| *id >= 2_000_000_000));
        assert!(ids.of(Service::Nfs(SERVICE_IDS as usize)).is_err());
        // Over the members' range, or root's numbers: refused.
        c.service_first_id = Some(c.first_id);
        let e = ServiceIds::new(&c, "x").unwrap_err();
        assert!(e.contains("members"), "{e}");
        c.service_first_id = Some(0);
        assert!(ServiceIds::new(&c, "x").is_err());
        c.service_first_id = Some(u32::MAX - 10);
        assert!(ServiceIds::new(&c, "x").is_err());
        c.service_first_id = Some(1_000_000);
        let e = ServiceIds::new(&c, "x").unwrap_err();
        assert!(e.contains("systemd"), "{e}");
        // A host account's number: refused for that helper.
        c.service_first_id = Some(65534 - 2);
        let ids = ServiceIds { first: 65534 - 2 };
        assert!(ids.of(Service::Nfs(0)).is_err(), "nobody's number");
    }
}
