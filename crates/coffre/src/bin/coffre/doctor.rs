//! `coffre doctor`: the host's and a vault directory's findings, printed
//! for people or as JSON; the exit code says the worst.

use anyhow::Result;
use coffre_daemon::doctor::{self, Finding, Level};
use std::path::Path;

pub fn run(dir: Option<&Path>, json: bool) -> Result<u8> {
    let (vault, needs, qemu) = match dir {
        Some(d) => {
            let (f, n, q) = doctor::vault(d);
            (Some(f), n, q)
        }
        None => (None, doctor::Needs::default(), None),
    };
    let host = doctor::host(needs, qemu.as_deref());
    let mut all = host.clone();
    all.extend(vault.iter().flatten().cloned());
    let worst = doctor::worst(&all);
    if json {
        let out = serde_json::json!({
            "host": host,
            "vault": dir.map(|d| serde_json::json!({
                "dir": d,
                "findings": vault.clone().unwrap_or_default(),
            })),
            "worst": worst,
        });
        println!("{}", serde_json::to_string_pretty(&out)?);
    } else {
        print_section("host", &host);
        if let (Some(d), Some(v)) = (dir, &vault) {
            println!();
            print_section(&format!("vault {}", d.display()), v);
        }
        println!();
        println!("worst: {worst}");
    }
    Ok(match worst {
        Level::Ok => coffre::exit::OK,
        Level::Warn => coffre::exit::DOCTOR_WARN,
        Level::Fail => coffre::exit::DOCTOR_FAIL,
    })
}

fn print_section(title: &str, findings: &[Finding]) {
    println!("{title}");
    let width = findings.iter().map(|f| f.check.len()).max().unwrap_or(0);
    for f in findings {
        println!(
            "  {:<4}  {:<width$}  {}",
            f.level.to_string(),
            f.check,
            f.detail
        );
        if let Some(fix) = &f.fix {
            println!("  {:<4}  {:<width$}  fix: {fix}", "", "");
        }
    }
}
