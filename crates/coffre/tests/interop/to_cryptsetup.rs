//! Volumes made by coffre work in cryptsetup, and what each tool does to
//! the other's volume is seen by both.

use crate::util::*;
use coffre_testkit::kdf::PBKDF2_FAST;
use std::path::{Path, PathBuf};

struct Vol {
    d: Dir,
    vol: PathBuf,
    hdr: Option<PathBuf>,
    pw: PathBuf,
}

impl Vol {
    fn format(detached: bool, sector: &str, key_bits: &str, kdf: &[&str], size: &str) -> Vol {
        let d = Dir::new();
        let vol = d.path("vol");
        let hdr = detached.then(|| d.path("vol.hdr"));
        let pw = d.pass("pw", "coffre made this");
        let mut args = vec![
            "volume",
            "format",
            s(&vol),
            "--size",
            size,
            "--key-file",
            s(&pw),
            "--sector-size",
            sector,
            "--key-size",
            key_bits,
        ];
        args.extend(kdf);
        if let Some(h) = &hdr {
            args.extend(["--header", s(h)]);
        }
        ok(&coffre(&args));
        Vol { d, vol, hdr, pw }
    }

    /// `--header H` for cryptsetup and coffre, when detached.
    fn hargs(&self) -> Vec<String> {
        match &self.hdr {
            Some(h) => vec!["--header".into(), s(h).into()],
            None => vec![],
        }
    }

    fn cs(&self, args: &[&str]) -> std::process::Output {
        let h = self.hargs();
        let mut v: Vec<&str> = args.to_vec();
        v.extend(h.iter().map(String::as_str));
        v.push(s(&self.vol));
        cryptsetup_status(&v)
    }

    fn cf(&self, args: &[&str]) -> std::process::Output {
        self.cf_stdin(args, &[])
    }

    fn cf_stdin(&self, args: &[&str], input: &[u8]) -> std::process::Output {
        let h = self.hargs();
        let mut v: Vec<&str> = vec!["volume", args[0], s(&self.vol)];
        v.extend(&args[1..]);
        v.extend(h.iter().map(String::as_str));
        coffre_stdin(&v, input)
    }

    fn test_pass(&self, key_file: &Path) -> bool {
        self.cs(&["open", "--test-passphrase", "--key-file", s(key_file)])
            .status
            .success()
    }
}

/// coffre's volumes pass luksDump and open --test-passphrase, for every
/// layout and both KDFs; a wrong passphrase fails in cryptsetup too.
#[test]
#[ignore = "system: needs cryptsetup"]
fn coffre_volumes_pass_cryptsetup() {
    require(&[Need::Cryptsetup]);
    let pbkdf2 = PBKDF2_FAST;
    for detached in [false, true] {
        for sector in ["512", "4096"] {
            for key_bits in ["256", "512"] {
                for kdf in [&COFFRE_FAST[..], &pbkdf2[..]] {
                    let v = Vol::format(detached, sector, key_bits, kdf, "8M");
                    let ctx = format!("detached {detached} sector {sector} key {key_bits} {kdf:?}");
                    let dump = v.cs(&["luksDump"]);
                    assert!(
                        dump.status.success(),
                        "{ctx}: {}",
                        String::from_utf8_lossy(&dump.stderr)
                    );
                    let text = String::from_utf8_lossy(&dump.stdout);
                    assert!(
                        text.contains(&format!("sector: {sector} [bytes]")),
                        "{ctx}: {text}"
                    );
                    assert!(v.test_pass(&v.pw), "{ctx}");
                    let wrong = v.d.pass("wrong", "not it");
                    assert!(!v.test_pass(&wrong), "{ctx}");
                    // The volume key coffre made is the one cryptsetup finds.
                    let expected = cryptsetup_volume_key(&v.d, &v.vol, v.hdr.as_deref(), &v.pw);
                    let (_, key) =
                        coffre_unlock(&v.vol, v.hdr.as_deref(), "coffre made this").unwrap();
                    assert_eq!(key.expose(), &expected[..], "{ctx}");
                    assert_eq!(key.len() * 8, key_bits.parse::<usize>().unwrap(), "{ctx}");
                }
            }
        }
    }
}

/// Keyslots cryptsetup adds or kills on a coffre volume work in coffre, and
/// the reverse.
#[test]
#[ignore = "system: needs cryptsetup"]
fn keyslot_changes_are_seen_by_both_tools() {
    require(&[Need::Cryptsetup]);
    let v = Vol::format(true, "4096", "512", &COFFRE_FAST, "8M");
    let p_cs = v.d.pass("p_cs", "added by cryptsetup");
    let mut add = vec!["luksAddKey", "--key-file", s(&v.pw)];
    add.extend(fast_kdf("argon2id"));
    let h = v.hargs();
    add.extend(h.iter().map(String::as_str));
    add.extend([s(&v.vol), s(&p_cs)]);
    cryptsetup(&add);
    let (slot, _) = coffre_unlock(&v.vol, v.hdr.as_deref(), "added by cryptsetup").unwrap();
    assert_eq!(slot, 1);

    // coffre adds slot 5 with pbkdf2 and "prefer"; cryptsetup opens it.
    let p_cf = v.d.pass("p_cf", "added by coffre");
    let mut a = vec![
        "add-key",
        "--key-file",
        s(&v.pw),
        "--new-keyfile",
        s(&p_cf),
        "--key-slot",
        "5",
        "--priority",
        "prefer",
    ];
    a.extend(PBKDF2_FAST);
    ok(&v.cf(&a));
    assert!(v.test_pass(&p_cf));
    let dump = String::from_utf8(v.cs(&["luksDump"]).stdout).unwrap();
    assert!(dump.contains("5: luks2"), "{dump}");
    assert!(dump.contains("Priority:   prefer"), "{dump}");

    // coffre changes slot 1's passphrase: old refused, new opens, in both.
    let p_new = v.d.pass("p_new", "changed by coffre");
    let mut c = vec![
        "change-key",
        "--key-file",
        s(&p_cs),
        "--new-keyfile",
        s(&p_new),
    ];
    c.extend(COFFRE_FAST);
    ok(&v.cf(&c));
    assert!(!v.test_pass(&p_cs));
    assert!(v.test_pass(&p_new));
    assert!(
        v.cs(&[
            "open",
            "--test-passphrase",
            "--key-slot",
            "1",
            "--key-file",
            s(&p_new)
        ])
        .status
        .success()
    );

    // cryptsetup kills slot 0: coffre refuses its passphrase.
    let mut kill = vec!["luksKillSlot", "--key-file", s(&p_new)];
    kill.extend(h.iter().map(String::as_str));
    kill.extend([s(&v.vol), "0"]);
    cryptsetup(&kill);
    assert!(coffre_unlock(&v.vol, v.hdr.as_deref(), "coffre made this").is_err());

    // coffre removes slot 5: cryptsetup refuses it.
    ok(&v.cf(&["remove-key", "--key-slot", "5", "--key-file", s(&p_new)]));
    assert!(!v.test_pass(&p_cf));
    assert!(v.test_pass(&p_new));
}

/// Data coffre wrote is decrypted by cryptsetup itself (detached header:
/// reencrypt --decrypt).
#[test]
#[ignore = "system: needs root (for cryptsetup reencrypt's lock), cryptsetup"]
fn cryptsetup_decrypts_what_coffre_wrote() {
    require(&[Need::Root, Need::Cryptsetup]);
    for sector in ["512", "4096"] {
        for key_bits in ["256", "512"] {
            let v = Vol::format(true, sector, key_bits, &COFFRE_FAST, "16M");
            let data = pattern(16 << 20, 99);
            ok(&v.cf_stdin(&["write", "--key-file", s(&v.pw)], &data));
            let h = v.hargs();
            let mut args = vec![
                "reencrypt",
                "--decrypt",
                "--force-offline-reencrypt",
                "--key-file",
                s(&v.pw),
            ];
            args.extend(h.iter().map(String::as_str));
            args.push(s(&v.vol));
            cryptsetup(&args);
            let plain = std::fs::read(&v.vol).unwrap();
            assert!(
                plain == data,
                "sector {sector} key {key_bits}: cryptsetup's plaintext differs"
            );
        }
    }
}

/// Attached header: cryptsetup re-keys the volume offline (decrypting what
/// coffre wrote with the old key, encrypting with a new one), and coffre
/// reads the same bytes back with the new key.
#[test]
#[ignore = "system: needs root (for cryptsetup reencrypt's lock), cryptsetup"]
fn cryptsetup_rekeys_what_coffre_wrote() {
    require(&[Need::Root, Need::Cryptsetup]);
    let v = Vol::format(false, "4096", "512", &COFFRE_FAST, "16M");
    let data = pattern(16 << 20, 5);
    ok(&v.cf_stdin(&["write", "--key-file", s(&v.pw)], &data));
    let before = coffre_unlock(&v.vol, None, "coffre made this").unwrap().1;
    let mut args = vec![
        "reencrypt",
        "--force-offline-reencrypt",
        "--key-file",
        s(&v.pw),
    ];
    args.extend(fast_kdf("argon2id"));
    args.push(s(&v.vol));
    cryptsetup(&args);
    let after = coffre_unlock(&v.vol, None, "coffre made this").unwrap().1;
    assert_ne!(before.expose(), after.expose(), "re-keying changed the key");
    let out = ok(&v.cf(&["read", "--key-file", s(&v.pw)]));
    assert!(out == data, "data differs after cryptsetup re-keyed it");
}

/// Tokens and JSON fields coffre does not interpret survive its writes.
#[test]
#[ignore = "system: needs cryptsetup"]
fn tokens_and_unknown_fields_survive() {
    require(&[Need::Cryptsetup]);
    let v = Vol::format(false, "4096", "512", &COFFRE_FAST, "8M");
    let token = v.d.path("token.json");
    std::fs::write(
        &token,
        r#"{"type":"coffre-test","keyslots":["0"],"member":"alice","nested":{"a":[1,2,3]}}"#,
    )
    .unwrap();
    let out = v.cs(&[
        "token",
        "import",
        "--json-file",
        s(&token),
        "--token-id",
        "3",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let export = |v: &Vol| -> serde_json::Value {
        let o = v.cs(&["token", "export", "--token-id", "3"]);
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        serde_json::from_slice(&o.stdout).unwrap()
    };
    let before = export(&v);

    // Unknown fields everywhere, written as another LUKS2 writer would.
    let c = coffre_storage::Luks2Container::open(&v.vol, None).unwrap();
    let mut h = c.header().clone();
    drop(c);
    let extra = serde_json::json!({"x-future": {"k": "v"}});
    h.metadata.extra.insert("x-top".into(), extra.clone());
    h.metadata
        .config
        .extra
        .insert("x-config".into(), extra.clone());
    for k in h.metadata.keyslots.values_mut() {
        k.extra.insert("x-keyslot".into(), extra.clone());
        k.area.extra.insert("x-area".into(), extra.clone());
    }
    for sg in h.metadata.segments.values_mut() {
        sg.extra.insert("x-segment".into(), extra.clone());
    }
    h.binary.seqid += 1;
    let [p, sc] = h.encode().unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(&v.vol)
            .unwrap();
        f.write_all_at(&sc, h.binary.hdr_size).unwrap();
        f.write_all_at(&p, 0).unwrap();
    }
    // coffre writes: add, change, remove.
    let p2 = v.d.pass("p2", "second");
    let mut a = vec!["add-key", "--key-file", s(&v.pw), "--new-keyfile", s(&p2)];
    a.extend(COFFRE_FAST);
    ok(&v.cf(&a));
    let p3 = v.d.pass("p3", "third");
    let mut c = vec!["change-key", "--key-file", s(&p2), "--new-keyfile", s(&p3)];
    c.extend(COFFRE_FAST);
    ok(&v.cf(&c));
    assert_eq!(export(&v), before, "token changed");
    let c = coffre_storage::Luks2Container::open(&v.vol, None).unwrap();
    let m = &c.header().metadata;
    assert_eq!(m.extra["x-top"], extra);
    assert_eq!(m.config.extra["x-config"], extra);
    assert_eq!(
        m.keyslots[&coffre_luks2::metadata::Id(0)].extra["x-keyslot"],
        extra
    );
    assert_eq!(
        m.keyslots[&coffre_luks2::metadata::Id(0)].area.extra["x-area"],
        extra
    );
    drop(c);
    // Removing keyslot 0 also unbinds the token from it, as cryptsetup does.
    ok(&v.cf(&["remove-key", "--key-slot", "0", "--key-file", s(&p3)]));
    let after = export(&v);
    assert_eq!(after["member"], "alice");
    assert_eq!(after["nested"], before["nested"]);
    assert_eq!(after["keyslots"], serde_json::json!([]));
    assert!(v.test_pass(&p3));
}
