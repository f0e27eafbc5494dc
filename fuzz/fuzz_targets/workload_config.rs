//! The `[[workload]]` tables of `config.toml`, from arbitrary text: an
//! operator's typo gets an error, never a panic, from parsing and from
//! the checks `coffre serve` and `coffre doctor` run (each workload's,
//! the names', and against the vault network's subnet); and what parses
//! is written back and read again unchanged, with the same verdict.
#![no_main]

use coffre_workload::config::{WorkloadConfig, check_all, check_network};
use libfuzzer_sys::fuzz_target;

#[derive(serde::Deserialize, serde::Serialize)]
struct Part {
    #[serde(default)]
    subnet: Option<String>,
    #[serde(default)]
    workload: Vec<WorkloadConfig>,
}

fn verdict(p: &Part) -> Result<(), String> {
    check_all(&p.workload).map_err(|e| e.to_string())?;
    let subnet = match &p.subnet {
        Some(s) => Some(s.parse::<coffre_net::Subnet>().map_err(|e| e.to_string())?),
        None => None,
    };
    check_network(&p.workload, subnet.as_ref()).map_err(|e| e.to_string())
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(part) = toml::from_str::<Part>(text) else {
        return;
    };
    let first = verdict(&part);
    if let Err(e) = &first {
        assert!(!e.is_empty(), "an error that says nothing");
    }
    let Ok(again) = toml::to_string(&part) else {
        return;
    };
    let back: Part = toml::from_str(&again)
        .unwrap_or_else(|e| panic!("written back, not read again: {e}\n{again}"));
    assert_eq!(
        serde_json::to_value(&back.workload).unwrap(),
        serde_json::to_value(&part.workload).unwrap(),
        "changed by a round trip:\n{again}"
    );
    assert_eq!(verdict(&back), first, "another verdict after a round trip");
});
