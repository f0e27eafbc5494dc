//! A vault's `config.toml` as a whole, from arbitrary text, through the
//! parser and every check `coffre serve` runs at start (`[storage]`,
//! `[network]`, `[gateway]`, `[directory]`, `[bus]`, `[[workload]]`,
//! `[metrics]`...): an operator's typo gets an error that names the
//! file and says something, never a panic; what is accepted is
//! written back and read again without a panic either.
#![no_main]

use coffre_daemon::vaultdir::VaultDir;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let dir = VaultDir::new(std::path::Path::new("/var/lib/coffre/fuzz"));
    match dir.parse_config(text) {
        Err(e) => {
            let said = e.to_string();
            assert!(said.contains("config.toml"), "{said}");
            assert!(
                said.len() > "/var/lib/coffre/fuzz/config.toml".len() + 2,
                "{said}"
            );
        }
        Ok(c) => {
            if let Ok(again) = toml::to_string(&c) {
                let _ = dir.parse_config(&again);
            }
        }
    }
});
