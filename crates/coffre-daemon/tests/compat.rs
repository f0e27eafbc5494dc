//! Files written by an earlier coffre still load (issue 13: "an audit log
//! written before verifies after, a config.toml from before still
//! loads"). The fixture was made by the daemon at commit 90dfbde.

use coffre_daemon::vaultdir::VaultDir;
use std::path::Path;

fn fixture() -> VaultDir {
    VaultDir::new(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vault-90dfbde"))
}

#[test]
fn config_and_control_data_from_before_load() {
    let dir = fixture();
    let config = dir.load_config().unwrap();
    assert_eq!(config.listen.split(':').next(), Some("127.0.0.1"));
    let control = dir.load_control().unwrap();
    assert_eq!(control.vault.members.len(), 2);
    assert!(control.vault.members.contains_key("bob"));
    // carol's invitation, made after the unlock, is still pending.
    let inv = &control.invitations["carol"];
    assert_eq!(inv.role, coffre_vault::Role::Member);
    assert_eq!(inv.code_sha256.len(), 64);
}

#[test]
fn an_audit_log_from_before_verifies() {
    let dir = fixture();
    let control = dir.load_control().unwrap();
    let report = coffre_audit::verify(&dir.root, &control.audit_public_key).unwrap();
    assert_eq!(report.records, 19);
    // Its records read back with today's types (doors, sources, results).
    let entries = coffre_audit::read_entries(&dir.root).unwrap();
    assert!(entries.iter().any(|e| {
        e.record
            .source
            .as_ref()
            .is_some_and(|s| s.door == coffre_vault::Door::Cli)
    }));
    assert!(entries.iter().any(|e| e.record.action == "member_join"));
}
