//! Dropping one secret leaves the others locked in RAM.
//!
//! Its own test binary: `VmLck` counts the whole process, so no other test
//! may lock or unlock memory while this one measures.

use coffre_luks2::secret::SecretBytes;
use std::collections::BTreeSet;

/// Locked memory of this process, in KiB.
fn vm_lck_kib() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with("VmLck:"))
        .expect("VmLck in /proc/self/status");
    line.split_whitespace().nth(1).unwrap().parse().unwrap()
}

fn pages(secrets: &[SecretBytes]) -> BTreeSet<usize> {
    let size = coffre_sys::page_size();
    secrets
        .iter()
        .flat_map(|s| {
            let start = s.expose().as_ptr() as usize;
            start / size..(start + s.len()).div_ceil(size)
        })
        .collect()
}

#[test]
fn dropping_one_secret_leaves_vmlck_covering_the_others() {
    // Locking is possible here: from now on, pages not counted in VmLck
    // are a failure of SecretBytes, not of the machine.
    coffre_testkit::require(&[coffre_testkit::Need::Mlock]);
    let before = vm_lck_kib();
    // Small secrets the allocator packs together, as a passphrase next to
    // a volume key would be.
    let mut secrets: Vec<SecretBytes> = (0..16).map(|_| SecretBytes::random(48)).collect();
    let locked = vm_lck_kib();
    let all = pages(&secrets);
    let page_kib = coffre_sys::page_size() / 1024;
    assert!(
        locked >= before + all.len() * page_kib,
        "the {} pages of 16 live secrets are not locked (VmLck {before} -> {locked} KiB)",
        all.len()
    );
    // Drop a secret whose page another live secret shares.
    let victim = (0..secrets.len())
        .find(|&i| {
            let rest: Vec<_> = (0..secrets.len()).filter(|&j| j != i).collect();
            let p = pages(std::slice::from_ref(&secrets[i]));
            rest.iter()
                .any(|&j| !pages(std::slice::from_ref(&secrets[j])).is_disjoint(&p))
        })
        .expect("16 small secrets share at least one page");
    drop(secrets.remove(victim));
    let after = vm_lck_kib();
    let still = pages(&secrets);
    assert!(
        after >= before + still.len() * page_kib,
        "VmLck {after} KiB no longer covers the {} pages of the live secrets (was {before} KiB before them)",
        still.len()
    );
    // Each live secret's page is still counted.
    for s in &secrets {
        assert!(coffre_sys::locked::users_of_page(s.expose().as_ptr()) >= 1);
    }
    drop(secrets);
    assert_eq!(
        vm_lck_kib(),
        before,
        "every page unlocked once all are gone"
    );
}
