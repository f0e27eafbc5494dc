//! Names on the host: the firewall's table, each workload's link and MAC.
//!
//! Several vaults may share a host, so a link's name comes from the vault
//! (its directory, unique on the host) and the workload: a hash, because
//! Linux allows 15 bytes. A MAC comes from the vault's name and the
//! workload's, so that a VM restored from its saved state (safe mode,
//! `-incoming`) finds the same device, on this host or another one.

use sha2::{Digest, Sha256};

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn digest(parts: &[&str]) -> [u8; 32] {
    let mut h = Sha256::new();
    for p in parts {
        // Length-prefixed, so ("ab", "c") and ("a", "bc") differ.
        h.update((p.len() as u64).to_le_bytes());
        h.update(p.as_bytes());
    }
    h.finalize().into()
}

/// The vault's nftables table (family `inet`): `coffre_` and 12 hex digits.
pub fn table(vault_id: &str) -> String {
    format!("coffre_{}", hex(&digest(&["table", vault_id])[..6]))
}

/// The packet mark (SO_MARK) on the NFS portmapper's UDP socket of the
/// vault whose table is `table`: the vault's output rule knows that
/// socket's packets by it, whatever source address they were given. Not
/// zero; the daemon sets it (the server, without `CAP_NET_ADMIN`, cannot
/// change it).
pub fn nfs_mark(table: &str) -> u32 {
    let d = digest(&["nfs-mark", table]);
    u32::from_le_bytes([d[0], d[1], d[2], d[3]]) | 1
}

/// How many ids the vault's helpers may take, one each: the DHCP server,
/// the LDAP server, and each VM's NFS server.
pub const SERVICE_IDS: u32 = 1024;

/// Where the block of [`SERVICE_IDS`] ids the vault's helpers run as
/// starts (unless `[accounts] service_first_id` says): one of 100 000
/// blocks from 2 000 000 000 on, by the vault's directory, so that the
/// vaults on a host take different ones (but for a chance of 1 in
/// 100 000, which the daemon's start does not detect). Above systemd's
/// container range (524288 to 1879048191), below 2^31 (some tools take
/// ids as signed), far from the members' default range and from any
/// account or subordinate id a host hands out by default. No account has
/// them: they own no file, and no helper shares its processes, its
/// limits or its signals with another.
pub fn service_ids(vault_id: &str) -> u32 {
    let d = digest(&["service-ids", vault_id]);
    let block = u32::from_le_bytes([d[0], d[1], d[2], d[3]]) % 100_000;
    2_000_000_000 + block * SERVICE_IDS
}

/// The host side of a workload's link (its tap or veth): `cw` and 10 hex
/// digits, 12 bytes.
pub fn link(vault_id: &str, workload: &str) -> String {
    format!("cw{}", hex(&digest(&["link", vault_id, workload])[..5]))
}

/// The OpenVPN gateway's tun device: `cv` and 10 hex digits.
pub fn vpn_link(vault_id: &str) -> String {
    format!("cv{}", hex(&digest(&["vpn", vault_id])[..5]))
}

/// The network namespace of a process workload with `network = true`
/// (`/run/netns/NAME`).
pub fn netns(vault_id: &str, workload: &str) -> String {
    format!("coffre-{}", link(vault_id, workload))
}

/// A workload's MAC: locally administered, unicast, stable for a vault
/// name and a workload name.
pub fn mac(vault_name: &str, workload: &str) -> [u8; 6] {
    let d = digest(&["mac", vault_name, workload]);
    let mut m = [0u8; 6];
    m.copy_from_slice(&d[..6]);
    m[0] = (m[0] & 0xfc) | 0x02;
    m
}

/// `02:ab:...` as `ip` and QEMU write it.
pub fn mac_text(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_fit_and_differ() {
        let a = link("/srv/vault-a", "desktop");
        assert_eq!(a.len(), 12);
        assert!(a.len() <= 15);
        assert_ne!(a, link("/srv/vault-b", "desktop"));
        assert_ne!(a, link("/srv/vault-a", "forge"));
        assert_eq!(a, link("/srv/vault-a", "desktop"));
        assert!(vpn_link("/srv/vault-a").len() <= 15);
        assert_ne!(link("a", "bc"), link("ab", "c"));
        assert!(table("/srv/vault-a").starts_with("coffre_"));
    }

    #[test]
    fn service_ids_are_a_block_of_their_own_per_vault() {
        let a = service_ids("/srv/vault-a");
        assert_eq!(a, service_ids("/srv/vault-a"));
        assert_ne!(a, service_ids("/srv/vault-b"));
        for v in ["/srv/vault-a", "/srv/vault-b", "", "x"] {
            let first = service_ids(v);
            assert_eq!((first - 2_000_000_000) % SERVICE_IDS, 0);
            // Above systemd's container range, below 2^31.
            assert!(first > 1_879_048_191);
            assert!(u64::from(first) + u64::from(SERVICE_IDS) <= 1 << 31);
        }
    }

    #[test]
    fn macs_are_local_unicast_and_stable() {
        for w in ["desktop", "forge", "x"] {
            let m = mac("team", w);
            assert_eq!(m[0] & 0x01, 0, "unicast");
            assert_eq!(m[0] & 0x02, 0x02, "locally administered");
            assert_eq!(m, mac("team", w));
        }
        assert_ne!(mac("team", "desktop"), mac("other", "desktop"));
        assert_eq!(mac_text(&[2, 0xab, 0, 1, 2, 0xff]), "02:ab:00:01:02:ff");
    }
}
