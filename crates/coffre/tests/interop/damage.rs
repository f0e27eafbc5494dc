//! Bad input: damaged, truncated and lying headers give a clear error or
//! recovery from the other copy; never a panic, never a write.

use crate::util::*;
use coffre_luks2::binary::{BinaryHeader, Copy};
use coffre_testkit::kdf::PBKDF2_ITERATIONS_ARG;
use std::os::unix::fs::FileExt;
use std::path::Path;

const HDR: u64 = 16384;
const HDR_LEN: usize = 16384;

type Damage = Box<dyn Fn(&Path)>;

fn flip(path: &Path, at: u64) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8];
    f.read_exact_at(&mut b, at).unwrap();
    b[0] ^= 0x40;
    f.write_all_at(&b, at).unwrap();
}

/// The whole file, to compare before and after (volumes here are small).
fn digest(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap()
}

/// A bit flip in either copy (binary part or JSON) is survived: reads use
/// the other copy, dump reports the damage, writes are refused (exit 4,
/// nothing written) until `repair`, after which cryptsetup agrees.
#[test]
#[ignore = "system: needs cryptsetup"]
fn one_damaged_copy_is_recovered_and_repaired() {
    require(&[Need::Cryptsetup]);
    for (what, at) in [
        ("primary binary", 30),
        ("primary checksum", 460),
        ("primary JSON", 4096 + 20),
        ("secondary binary", HDR + 30),
        ("secondary JSON", HDR + 4096 + 20),
    ] {
        let d = Dir::new();
        let (vol, pw) = format_volume(&d, "4M");
        flip(&vol, at);
        let out = coffre(&["volume", "check-key", s(&vol), "--key-file", s(&pw)]);
        assert_eq!(
            exit_code(&out),
            0,
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let dump = String::from_utf8(ok(&coffre(&["volume", "dump", s(&vol)]))).unwrap();
        assert!(dump.contains("DAMAGED"), "{what}: {dump}");
        let json: serde_json::Value =
            serde_json::from_slice(&ok(&coffre(&["volume", "dump", s(&vol), "--json"]))).unwrap();
        let which = if at < HDR { "primary" } else { "secondary" };
        assert_eq!(json["copies"][which]["state"], "damaged", "{what}");

        let before = digest(&vol);
        let p2 = d.pass("p2", "new");
        let out = coffre(&[
            "volume",
            "add-key",
            s(&vol),
            "--key-file",
            s(&pw),
            "--new-keyfile",
            s(&p2),
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            PBKDF2_ITERATIONS_ARG,
        ]);
        assert_eq!(
            exit_code(&out),
            4,
            "{what}: add-key must refuse: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(String::from_utf8_lossy(&out.stderr).contains("repair"));
        assert!(
            digest(&vol) == before,
            "{what}: add-key wrote to a damaged header"
        );

        // repair needs confirmation when not on a terminal.
        let out = coffre(&["volume", "repair", s(&vol)]);
        assert_ne!(exit_code(&out), 0);
        assert!(
            digest(&vol) == before,
            "{what}: repair wrote without confirmation"
        );
        let out = coffre(&["volume", "repair", s(&vol), "--batch-mode"]);
        assert_eq!(
            exit_code(&out),
            0,
            "{what}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let json: serde_json::Value =
            serde_json::from_slice(&ok(&coffre(&["volume", "dump", s(&vol), "--json"]))).unwrap();
        assert_eq!(json["copies"]["primary"]["state"], "valid", "{what}");
        assert_eq!(json["copies"]["secondary"]["state"], "valid", "{what}");
        cryptsetup(&["luksDump", s(&vol)]);
        cryptsetup(&["open", "--test-passphrase", "--key-file", s(&pw), s(&vol)]);
        ok(&coffre(&[
            "volume",
            "add-key",
            s(&vol),
            "--key-file",
            s(&pw),
            "--new-keyfile",
            s(&p2),
            "--pbkdf",
            "pbkdf2",
            "--pbkdf-force-iterations",
            PBKDF2_ITERATIONS_ARG,
        ]));
    }
}

/// An interrupted write leaves one copy older than the other: the newer
/// wins, the older is reported stale and repaired.
#[test]
#[ignore = "system: needs cryptsetup"]
fn stale_copy_after_interrupted_write() {
    require(&[Need::Cryptsetup]);
    let d = Dir::new();
    let (vol, pw) = format_volume(&d, "4M");
    let f = std::fs::File::open(&vol).unwrap();
    let mut old_primary = vec![0u8; HDR_LEN];
    f.read_exact_at(&mut old_primary, 0).unwrap();
    drop(f);
    let p2 = d.pass("p2", "second");
    let mut a = vec![
        "volume",
        "add-key",
        s(&vol),
        "--key-file",
        s(&pw),
        "--new-keyfile",
        s(&p2),
    ];
    a.extend(COFFRE_FAST);
    ok(&coffre(&a));
    // As if we crashed after writing the secondary copy only.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&vol)
        .unwrap()
        .write_all_at(&old_primary, 0)
        .unwrap();
    ok(&coffre(&[
        "volume",
        "check-key",
        s(&vol),
        "--key-file",
        s(&p2),
    ]));
    let json: serde_json::Value =
        serde_json::from_slice(&ok(&coffre(&["volume", "dump", s(&vol), "--json"]))).unwrap();
    assert_eq!(json["copies"]["primary"]["state"], "stale");
    ok(&coffre(&["volume", "repair", s(&vol), "-q"]));
    let out = cryptsetup(&["open", "--test-passphrase", "--key-file", s(&p2), s(&vol)]);
    assert!(out.status.success());
}

/// Both copies gone, truncated files, a wrong magic: exit 4 with a message,
/// nothing written.
#[test]
fn unusable_headers_are_refused_cleanly() {
    let cases: Vec<(&str, Damage)> = vec![
        (
            "both copies flipped",
            Box::new(|p: &Path| {
                flip(p, 4096 + 20);
                flip(p, HDR + 4096 + 20);
            }),
        ),
        (
            "wrong magic",
            Box::new(|p: &Path| {
                flip(p, 0);
                flip(p, HDR);
            }),
        ),
        (
            "truncated to 10000 bytes",
            Box::new(|p: &Path| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(p)
                    .unwrap()
                    .set_len(10000)
                    .unwrap()
            }),
        ),
        (
            "truncated inside the secondary",
            Box::new(|p: &Path| {
                flip(p, 20);
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(p)
                    .unwrap()
                    .set_len(HDR + 5000)
                    .unwrap()
            }),
        ),
        (
            "empty file",
            Box::new(|p: &Path| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(p)
                    .unwrap()
                    .set_len(0)
                    .unwrap()
            }),
        ),
    ];
    for (what, damage) in cases {
        let d = Dir::new();
        let (vol, pw) = format_volume(&d, "4M");
        damage(&vol);
        let before = digest(&vol);
        for args in [
            vec!["volume", "check-key", s(&vol), "--key-file", s(&pw)],
            vec!["volume", "dump", s(&vol)],
            vec!["volume", "repair", s(&vol), "-q"],
            vec![
                "volume",
                "read",
                s(&vol),
                "--key-file",
                s(&pw),
                "--length",
                "4096",
            ],
        ] {
            let out = coffre(&args);
            assert_eq!(
                exit_code(&out),
                4,
                "{what} {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(
                String::from_utf8_lossy(&out.stderr).contains("LUKS2"),
                "{what}"
            );
            assert!(digest(&vol) == before, "{what} {args:?} wrote");
        }
    }
}

/// Rewrites both copies' JSON with `edit` applied and valid checksums, as a
/// hostile or buggy writer could.
fn rewrite_json(vol: &Path, edit: &dyn Fn(&mut serde_json::Value)) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(vol)
        .unwrap();
    for (copy, at) in [(Copy::Primary, 0u64), (Copy::Secondary, HDR)] {
        let mut area = vec![0u8; HDR_LEN];
        f.read_exact_at(&mut area, at).unwrap();
        let bin: BinaryHeader = coffre_luks2::binary::parse(&area, copy, at).unwrap();
        let end = area[4096..].iter().position(|&b| b == 0).unwrap();
        let mut v: serde_json::Value = serde_json::from_slice(&area[4096..4096 + end]).unwrap();
        edit(&mut v);
        let text = serde_json::to_vec(&v).unwrap();
        area[4096..].fill(0);
        area[4096..4096 + text.len()].copy_from_slice(&text);
        bin.encode_into(copy, &mut area).unwrap();
        f.write_all_at(&area, at).unwrap();
    }
}

/// JSON that lies: sizes that disagree, areas outside the keyslots area,
/// offsets that overflow, a missing digest, an unsupported feature or
/// value. Each gets a clear error, never a panic or a write: 4 (damaged)
/// only where cryptsetup refuses the header too, 5 (unsupported) for what
/// cryptsetup loads and coffre does not use.
#[test]
#[ignore = "system: needs cryptsetup"]
fn lying_json_is_refused() {
    require(&[Need::Cryptsetup]);
    type Edit = Box<dyn Fn(&mut serde_json::Value)>;
    let cases: Vec<(&str, i32, Edit)> = vec![
        (
            "json_size lies",
            4,
            Box::new(|v| v["config"]["json_size"] = "4096".into()),
        ),
        (
            "area past keyslots area",
            4,
            Box::new(|v| v["keyslots"]["0"]["area"]["offset"] = "16773120".into()),
        ),
        (
            "area offset overflows",
            4,
            Box::new(|v| v["keyslots"]["0"]["area"]["offset"] = "18446744073709551615".into()),
        ),
        (
            "area size overflows",
            4,
            Box::new(|v| v["keyslots"]["0"]["area"]["size"] = "18446744073709551615".into()),
        ),
        (
            "segment offset past u64",
            4,
            Box::new(|v| v["segments"]["0"]["offset"] = "18446744073709551616".into()),
        ),
        (
            "keyslots_size huge",
            4,
            Box::new(|v| v["config"]["keyslots_size"] = "18446744073709551615".into()),
        ),
        (
            "stripes zero",
            5,
            Box::new(|v| v["keyslots"]["0"]["af"]["stripes"] = 0.into()),
        ),
        (
            "key_size huge",
            5,
            Box::new(|v| v["keyslots"]["0"]["key_size"] = 4_000_000_000u32.into()),
        ),
        (
            "argon2 memory absurd",
            5,
            Box::new(|v| v["keyslots"]["0"]["kdf"]["memory"] = 4_000_000_000u32.into()),
        ),
        (
            "negative number",
            4,
            Box::new(|v| v["segments"]["0"]["offset"] = "-1".into()),
        ),
        (
            "digest missing",
            4,
            Box::new(|v| v["digests"] = serde_json::json!({})),
        ),
        (
            "digest names ghost keyslot",
            4,
            Box::new(|v| v["digests"]["0"]["keyslots"] = serde_json::json!(["0", "7"])),
        ),
        (
            "not an object",
            4,
            Box::new(|v| *v = serde_json::json!([1, 2])),
        ),
        (
            "integrity",
            5,
            Box::new(|v| {
                v["segments"]["0"]["integrity"] = serde_json::json!({
                    "type": "hmac(sha256)",
                    "journal_encryption": "none",
                    "journal_integrity": "none"
                })
            }),
        ),
        (
            "reencryption",
            5,
            Box::new(|v| {
                v["config"]["requirements"] =
                    serde_json::json!({"mandatory": ["online-reencrypt-v2"]})
            }),
        ),
        (
            "other cipher",
            5,
            Box::new(|v| v["segments"]["0"]["encryption"] = "serpent-xts-plain64".into()),
        ),
        (
            "unknown requirement",
            5,
            Box::new(|v| {
                v["config"]["requirements"] = serde_json::json!({"mandatory": ["from-the-future"]})
            }),
        ),
    ];
    for (what, want, edit) in cases {
        let d = Dir::new();
        let (vol, pw) = format_volume(&d, "4M");
        rewrite_json(&vol, &*edit);
        let before = digest(&vol);
        if want == 4 {
            let copy = d.path("copy");
            std::fs::copy(&vol, &copy).unwrap();
            assert!(
                !cryptsetup_status(&["luksDump", s(&copy)]).status.success(),
                "{what}: coffre calls damaged a header cryptsetup loads"
            );
        }
        for args in [
            vec!["volume", "check-key", s(&vol), "--key-file", s(&pw)],
            vec!["volume", "dump", s(&vol), "--json"],
            vec!["volume", "repair", s(&vol), "-q"],
        ] {
            let out = coffre(&args);
            assert_eq!(
                exit_code(&out),
                want,
                "{what} {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(digest(&vol) == before, "{what}: {args:?} wrote");
        }
    }
}

/// A flipped bit in the keyslot area makes that passphrase fail like a
/// wrong one (the AF splitter spreads the damage), without a panic.
#[test]
fn damaged_keyslot_area_fails_cleanly() {
    let d = Dir::new();
    let (vol, pw) = format_volume(&d, "4M");
    flip(&vol, 2 * HDR + 1000);
    let out = coffre(&["volume", "check-key", s(&vol), "--key-file", s(&pw)]);
    assert_eq!(exit_code(&out), 2);
}
