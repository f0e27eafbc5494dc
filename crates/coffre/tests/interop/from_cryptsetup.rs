//! Volumes made by cryptsetup open in coffre.

use crate::util::*;
use coffre_storage::Luks2Container;

/// Every KDF, both sector sizes, both key sizes, several keyslots: each
/// right passphrase opens, a wrong one is refused, and the volume key is
/// the one cryptsetup dumps.
#[test]
#[ignore = "system: needs cryptsetup"]
fn luksformat_matrix_opens_with_right_passphrases_only() {
    require(&[Need::Cryptsetup]);
    for kdf in ["argon2id", "argon2i", "pbkdf2"] {
        for sector in ["512", "4096"] {
            for key_bits in ["256", "512"] {
                let d = Dir::new();
                let vol = d.path("vol");
                std::fs::File::create(&vol)
                    .unwrap()
                    .set_len(20 << 20)
                    .unwrap();
                let p0 = d.pass("p0", &format!("first {kdf}"));
                let p1 = d.pass("p1", "second passphrase\n");
                let mut args = vec![
                    "luksFormat",
                    "--type",
                    "luks2",
                    "--sector-size",
                    sector,
                    "--key-size",
                    key_bits,
                    "--key-file",
                    s(&p0),
                ];
                args.extend(fast_kdf(kdf));
                args.push(s(&vol));
                cryptsetup(&args);
                let mut add = vec!["luksAddKey", "--key-file", s(&p0)];
                add.extend(fast_kdf(kdf));
                add.extend([s(&vol), s(&p1)]);
                cryptsetup(&add);
                let expected = cryptsetup_volume_key(&d, &vol, None, &p0);
                let ctx = format!("{kdf} sector {sector} key {key_bits}");
                let (slot, key) = coffre_unlock(&vol, None, &format!("first {kdf}")).unwrap();
                assert_eq!(slot, 0, "{ctx}");
                assert_eq!(key.expose(), &expected[..], "{ctx}");
                let (slot, key) = coffre_unlock(&vol, None, "second passphrase\n").unwrap();
                assert_eq!(slot, 1, "{ctx}");
                assert_eq!(key.expose(), &expected[..], "{ctx}");
                let err = coffre_unlock(&vol, None, "second passphrase").unwrap_err();
                assert!(
                    matches!(
                        err,
                        coffre_storage::Error::Luks2(coffre_luks2::Error::WrongPassphrase)
                    ),
                    "{ctx}: {err}"
                );
            }
        }
    }
}

fn encrypt_in_place(
    d: &Dir,
    plain: &[u8],
    sector: &str,
    key_bits: &str,
    detached: bool,
) -> (
    std::path::PathBuf,
    Option<std::path::PathBuf>,
    std::path::PathBuf,
) {
    let vol = d.path("vol");
    let pw = d.pass("pw", "reencrypt me");
    let mut content = plain.to_vec();
    if !detached {
        // cryptsetup needs room for the header it moves the data behind.
        content.resize(plain.len() + (32 << 20), 0);
    }
    std::fs::write(&vol, &content).unwrap();
    let hdr = d.path("hdr");
    let mut args = vec![
        "reencrypt",
        "--encrypt",
        "--type",
        "luks2",
        "--sector-size",
        sector,
        "--key-size",
        key_bits,
        "--key-file",
        s(&pw),
    ];
    args.extend(fast_kdf("pbkdf2"));
    if detached {
        args.extend(["--header", s(&hdr)]);
    } else {
        args.extend(["--reduce-device-size", "32M"]);
    }
    args.push(s(&vol));
    cryptsetup(&args);
    (vol, detached.then_some(hdr), pw)
}

/// Data that cryptsetup encrypted decrypts in coffre to the original bytes,
/// with both key sizes (AES-256-XTS and AES-128-XTS) and every provider.
#[test]
#[ignore = "system: needs root (for cryptsetup reencrypt's lock), cryptsetup"]
fn data_encrypted_by_cryptsetup_decrypts() {
    require(&[Need::Root, Need::Cryptsetup]);
    let plain = pattern(24 << 20, 7);
    let cases = [
        ("512", "512", false),
        ("512", "512", true),
        ("4096", "512", false),
        ("4096", "512", true),
        ("512", "256", true),
        ("4096", "256", true),
    ];
    for (sector, key_bits, detached) in cases {
        let d = Dir::new();
        let (vol, hdr, pw) = encrypt_in_place(&d, &plain, sector, key_bits, detached);
        let mut args = vec![
            "volume",
            "read",
            s(&vol),
            "--key-file",
            s(&pw),
            "--length",
            "24M",
        ];
        if let Some(h) = &hdr {
            args.extend(["--header", s(h)]);
        }
        let out = ok(&coffre(&args));
        assert!(
            out == plain,
            "sector {sector} key {key_bits} detached {detached}: plaintext differs"
        );
        // And through the library with every cipher provider.
        let c = Luks2Container::open(&vol, hdr.as_deref()).unwrap();
        let (_, key) = c
            .unlock(&coffre_luks2::Passphrase::from_slice(b"reencrypt me"), None)
            .unwrap();
        for p in [
            coffre_luks2::cipher::Provider::Rust,
            coffre_luks2::cipher::Provider::AwsLc,
            coffre_luks2::cipher::Provider::Vaes,
        ] {
            let skip = match p {
                coffre_luks2::cipher::Provider::AwsLc => key_bits == "256",
                coffre_luks2::cipher::Provider::Vaes => !coffre_sys::xts::available(),
                _ => false,
            };
            if skip {
                continue;
            }
            let v = c.open_volume_with(&key, p).unwrap();
            let mut buf = vec![0u8; 1 << 20];
            v.read_at(3 << 20, &mut buf).unwrap();
            assert!(buf == plain[3 << 20..4 << 20], "{p:?}");
        }
    }
}

/// The keyslot priorities cryptsetup sets are honoured: `ignore` is skipped
/// unless named, `prefer` is tried first.
#[test]
#[ignore = "system: needs cryptsetup"]
fn priorities_from_cryptsetup() {
    require(&[Need::Cryptsetup]);
    let d = Dir::new();
    let vol = d.path("vol");
    std::fs::File::create(&vol)
        .unwrap()
        .set_len(20 << 20)
        .unwrap();
    let p0 = d.pass("p0", "zero");
    let p1 = d.pass("p1", "one");
    let mut args = vec!["luksFormat", "--type", "luks2", "--key-file", s(&p0)];
    args.extend(fast_kdf("pbkdf2"));
    args.push(s(&vol));
    cryptsetup(&args);
    let mut add = vec!["luksAddKey", "--key-file", s(&p0)];
    add.extend(fast_kdf("pbkdf2"));
    add.extend([s(&vol), s(&p1)]);
    cryptsetup(&add);
    cryptsetup(&["config", "--priority", "ignore", "--key-slot", "1", s(&vol)]);
    assert!(coffre_unlock(&vol, None, "one").is_err());
    let c = Luks2Container::open(&vol, None).unwrap();
    c.unlock(&coffre_luks2::Passphrase::from_slice(b"one"), Some(1))
        .unwrap();
    drop(c);
    cryptsetup(&["config", "--priority", "prefer", "--key-slot", "1", s(&vol)]);
    let c = Luks2Container::open(&vol, None).unwrap();
    assert_eq!(c.header().keyslots_to_try(None).unwrap(), vec![1, 0]);
}
