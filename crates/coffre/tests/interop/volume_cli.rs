//! The `coffre volume` command line: exit codes, locking, data I/O, and no
//! plaintext on the backing storage.

use crate::util::*;
use coffre_storage::Luks2Container;

fn fresh(
    detached: bool,
) -> (
    Dir,
    std::path::PathBuf,
    Option<std::path::PathBuf>,
    std::path::PathBuf,
) {
    let d = Dir::new();
    let vol = d.path("vol");
    let hdr = detached.then(|| d.path("hdr"));
    let pw = d.pass("pw", "pass");
    let mut a = vec![
        "volume",
        "format",
        s(&vol),
        "--size",
        "8M",
        "--key-file",
        s(&pw),
    ];
    a.extend(COFFRE_FAST);
    if let Some(h) = &hdr {
        a.extend(["--header", s(h)]);
    }
    ok(&coffre(&a));
    (d, vol, hdr, pw)
}

#[test]
fn no_plaintext_reaches_the_backing_file() {
    for detached in [false, true] {
        let (_d, vol, hdr, pw) = fresh(detached);
        let marker = b"COFFRE-PLAINTEXT-MARKER-0123456789abcdef";
        let data: Vec<u8> = marker.iter().copied().cycle().take(4 << 20).collect();
        let mut a = vec!["volume", "write", s(&vol), "--key-file", s(&pw)];
        if let Some(h) = &hdr {
            a.extend(["--header", s(h)]);
        }
        ok(&coffre_stdin(&a, &data));
        for file in [Some(&vol), hdr.as_ref()].into_iter().flatten() {
            let raw = std::fs::read(file).unwrap();
            assert!(
                !raw.windows(16).any(|w| w == &marker[..16]),
                "plaintext found in {}",
                file.display()
            );
        }
        let mut r = vec![
            "volume",
            "read",
            s(&vol),
            "--key-file",
            s(&pw),
            "--length",
            "4M",
        ];
        if let Some(h) = &hdr {
            r.extend(["--header", s(h)]);
        }
        assert!(ok(&coffre(&r)) == data);
    }
}

#[test]
fn unaligned_reads_and_writes() {
    let (_d, vol, _, pw) = fresh(false);
    let data = pattern(10_000, 3);
    ok(&coffre_stdin(
        &[
            "volume",
            "write",
            s(&vol),
            "--key-file",
            s(&pw),
            "--offset",
            "4000",
        ],
        &data,
    ));
    let out = ok(&coffre(&[
        "volume",
        "read",
        s(&vol),
        "--key-file",
        s(&pw),
        "--offset",
        "4000",
        "--length",
        "10000",
    ]));
    assert_eq!(out, data);
    let around = ok(&coffre(&[
        "volume",
        "read",
        s(&vol),
        "--key-file",
        s(&pw),
        "--offset",
        "0",
        "--length",
        "20000",
    ]));
    assert!(around[..4000].iter().all(|&b| b == 0) || around[..4000] != data[..]);
    assert_eq!(&around[4000..14000], &data[..]);
    // Past the end: refused, with a message.
    let out = coffre(&[
        "volume",
        "read",
        s(&vol),
        "--key-file",
        s(&pw),
        "--offset",
        "8M",
        "--length",
        "1",
    ]);
    assert_eq!(out.status.code(), Some(1));
    let out = coffre_stdin(
        &[
            "volume",
            "write",
            s(&vol),
            "--key-file",
            s(&pw),
            "--offset",
            "8388000",
        ],
        &data,
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("past the end"));
}

#[test]
fn exit_codes_and_locking() {
    let (d, vol, _, pw) = fresh(false);
    let wrong = d.pass("wrong", "nope");
    assert_eq!(
        coffre(&["volume", "check-key", s(&vol), "--key-file", s(&wrong)])
            .status
            .code(),
        Some(2)
    );
    assert_eq!(
        coffre(&["volume", "check-key", s(&vol), "--key-file", s(&pw)])
            .status
            .code(),
        Some(0)
    );
    assert_eq!(
        coffre(&[
            "volume",
            "check-key",
            s(&vol),
            "--key-file",
            s(&pw),
            "--key-slot",
            "3"
        ])
        .status
        .code(),
        Some(1)
    );
    assert_eq!(coffre(&["volume", "frobnicate"]).status.code(), Some(64));
    assert_eq!(
        coffre(&["volume", "dump", s(&d.path("missing"))])
            .status
            .code(),
        Some(1)
    );

    // While another opener holds the volume, every command is refused.
    let held = Luks2Container::open(&vol, None).unwrap();
    let out = coffre(&["volume", "check-key", s(&vol), "--key-file", s(&pw)]);
    assert_eq!(out.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&out.stderr).contains("in use"));
    assert!(matches!(
        Luks2Container::open(&vol, None),
        Err(coffre_storage::Error::Busy(_))
    ));
    drop(held);
    assert_eq!(
        coffre(&["volume", "check-key", s(&vol), "--key-file", s(&pw)])
            .status
            .code(),
        Some(0)
    );
}

#[test]
fn detached_header_is_locked_too() {
    let (d, vol, hdr, _pw) = fresh(true);
    let hdr = hdr.unwrap();
    let held = Luks2Container::open(&vol, Some(&hdr)).unwrap();
    // Another data file with the same header: the header lock refuses it.
    let other = d.path("other");
    std::fs::write(&other, vec![0u8; 1 << 20]).unwrap();
    assert!(matches!(
        Luks2Container::open(&other, Some(&hdr)),
        Err(coffre_storage::Error::Busy(_))
    ));
    drop(held);
}

#[test]
fn format_protects_existing_volumes_and_last_keyslot() {
    let (d, vol, _, pw) = fresh(false);
    let mut a = vec![
        "volume",
        "format",
        s(&vol),
        "--size",
        "8M",
        "--key-file",
        s(&pw),
    ];
    a.extend(COFFRE_FAST);
    let out = coffre(&a);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--force"));
    ok(&coffre(&[
        "volume",
        "check-key",
        s(&vol),
        "--key-file",
        s(&pw),
    ]));
    let out = coffre(&[
        "volume",
        "remove-key",
        s(&vol),
        "--key-slot",
        "0",
        "--key-file",
        s(&pw),
    ]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("last"));
    ok(&coffre(&[
        "volume",
        "check-key",
        s(&vol),
        "--key-file",
        s(&pw),
    ]));
    let _ = d;
}

#[test]
fn dump_json_has_no_secrets() {
    let (d, vol, _, pw) = fresh(false);
    let key = coffre_unlock(&vol, None, "pass").unwrap().1;
    let out = String::from_utf8(ok(&coffre(&["volume", "dump", s(&vol), "--json"]))).unwrap();
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["keyslots"][0]["id"], 0);
    assert_eq!(v["data_segment"]["key_bits"], 512);
    let hex: String = key.expose().iter().map(|b| format!("{b:02x}")).collect();
    assert!(!out.contains(&hex[..16]));
    assert!(!out.contains("pass\""));
    let _ = (d, pw);
}

#[test]
#[ignore = "system: needs cryptsetup"]
fn add_key_from_volume_key_file() {
    require(&[Need::Cryptsetup]);
    let (d, vol, _, pw) = fresh(false);
    let vk = cryptsetup_volume_key(&d, &vol, None, &pw);
    let vkf = d.path("vk");
    std::fs::write(&vkf, &vk).unwrap();
    let p2 = d.pass("p2", "from the volume key");
    let mut a = vec![
        "volume",
        "add-key",
        s(&vol),
        "--volume-key-file",
        s(&vkf),
        "--new-keyfile",
        s(&p2),
    ];
    a.extend(COFFRE_FAST);
    ok(&coffre(&a));
    ok(&coffre(&[
        "volume",
        "check-key",
        s(&vol),
        "--key-file",
        s(&p2),
    ]));
    // A wrong volume key is refused with exit 2.
    std::fs::write(&vkf, vec![0u8; 64]).unwrap();
    let out = coffre(&[
        "volume",
        "add-key",
        s(&vol),
        "--volume-key-file",
        s(&vkf),
        "--new-keyfile",
        s(&p2),
    ]);
    assert_eq!(out.status.code(), Some(2));
}

/// A key unlocked from one volume's keyslot opens that volume without a
/// second digest derivation, but that shortcut never lets it open another
/// volume whose key has the same length: the other digest is checked in
/// full and refuses it.
#[test]
fn an_unlocked_key_opens_its_own_volume_only() {
    let (a, b) = (Dir::new(), Dir::new());
    let (ca, _) = coffre_testkit::volume::scratch_volume(a.tmp.path(), 1 << 20);
    let (cb, _) = coffre_testkit::volume::scratch_volume(b.tmp.path(), 1 << 20);
    let pass = coffre_luks2::Passphrase::from_slice(b"scratch");
    let (_, key) = ca.unlock(&pass, None).unwrap();
    assert!(ca.open_volume(&key).is_ok());
    assert!(ca.open_volume(&key.duplicate()).is_ok());
    assert!(matches!(
        cb.open_volume(&key),
        Err(coffre_storage::Error::Luks2(
            coffre_luks2::Error::WrongVolumeKey
        ))
    ));
    // The same bytes with no record of a check take the full derivation.
    let raw = coffre_luks2::VolumeKey::new(coffre_luks2::SecretBytes::from_slice(key.expose()));
    assert!(ca.open_volume(&raw).is_ok());
    assert!(cb.open_volume(&raw).is_err());
}

/// Writes and reads of several chunks (each core takes its own) land in
/// order: an unaligned write of 5 MiB and some bytes, read back whole and
/// in unaligned slices that cross chunk boundaries; the sectors around it
/// keep what they held; a reader that goes away early is not an error.
#[test]
fn multi_chunk_io_keeps_order() {
    let (_d, vol, _, pw) = fresh(false);
    let vol = s(&vol);
    let pw = s(&pw);
    let before = pattern(8 << 20, 1);
    ok(&coffre_stdin(
        &["volume", "write", vol, "--key-file", pw],
        &before,
    ));
    let data = pattern((5 << 20) + 777, 9);
    let at = 1000usize;
    ok(&coffre_stdin(
        &["volume", "write", vol, "--key-file", pw, "--offset", "1000"],
        &data,
    ));
    let mut want = before.clone();
    want[at..at + data.len()].copy_from_slice(&data);
    let all = ok(&coffre(&["volume", "read", vol, "--key-file", pw]));
    assert!(all == want, "the whole volume after the write differs");
    for (off, len) in [
        (1usize, 3 << 20),
        ((1 << 20) - 5, (2 << 20) + 11),
        (at + data.len() - 3, 9),
    ] {
        let out = ok(&coffre(&[
            "volume",
            "read",
            vol,
            "--key-file",
            pw,
            "--offset",
            &off.to_string(),
            "--length",
            &len.to_string(),
        ]));
        assert!(out == want[off..off + len], "slice {off}+{len} differs");
    }
    let sh = format!(
        "{} volume read {vol} --key-file {pw} | head -c 100 > /dev/null; exit ${{PIPESTATUS[0]}}",
        env!("CARGO_BIN_EXE_coffre")
    );
    let st = std::process::Command::new("bash")
        .args(["-c", &sh])
        .status()
        .unwrap();
    assert!(st.success(), "a reader that went away made read fail: {st}");
}
