//! `coffre volume bench`: cipher throughput per core and on all cores, and
//! unlock time.

use crate::secrets;
use anyhow::{Context, Result};
use coffre::exit;
use coffre_luks2::cipher::{AwsLcXts, RustXts, SectorCipher, VaesXts};
use coffre_storage::Luks2Container;
use coffre_sys::xts::Width;
use rayon::prelude::*;
use serde_json::json;
use std::path::PathBuf;
use std::time::Instant;

const SECTOR: usize = 4096;

fn gib_per_s(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / secs / (1u64 << 30) as f64
}

/// Encrypts `total` bytes in 1 MiB requests on one thread; GiB/s.
fn one_core(c: &dyn SectorCipher, total: u64) -> Result<f64> {
    let mut buf = vec![0x5Au8; 1 << 20];
    let rounds = (total / buf.len() as u64).max(1);
    c.encrypt(0, SECTOR, &mut buf)?;
    let start = Instant::now();
    for i in 0..rounds {
        c.encrypt(i * 256, SECTOR, &mut buf)?;
    }
    Ok(gib_per_s(
        rounds * buf.len() as u64,
        start.elapsed().as_secs_f64(),
    ))
}

/// Same, with one 1 MiB buffer per thread on every core; GiB/s in total.
fn all_cores(c: &dyn SectorCipher, total: u64) -> Result<f64> {
    let threads = rayon::current_num_threads();
    let per = (total / threads as u64).max(1 << 20);
    let start = Instant::now();
    (0..threads)
        .into_par_iter()
        .try_for_each(|t| -> Result<()> {
            let mut buf = vec![0x5Au8; 1 << 20];
            for i in 0..per / buf.len() as u64 {
                c.encrypt(((t as u64) << 40) | (i * 256), SECTOR, &mut buf)?;
            }
            Ok(())
        })?;
    Ok(gib_per_s(
        per / (1 << 20) * (1 << 20) * threads as u64,
        start.elapsed().as_secs_f64(),
    ))
}

pub fn run(
    size: u64,
    volume: Option<PathBuf>,
    header: Option<PathBuf>,
    key_file: Option<PathBuf>,
    json_out: bool,
) -> Result<u8> {
    let mut key = [0u8; 64];
    coffre_luks2::secret::fill_random(&mut key);
    let mut rows = Vec::new();
    let mut candidates: Vec<(&str, Box<dyn SectorCipher>)> = vec![
        ("aes-xts 512b", Box::new(AwsLcXts::new(&key)?)),
        ("aes-xts 512b", Box::new(RustXts::new(&key)?)),
        ("aes-xts 256b", Box::new(RustXts::new(&key[..32])?)),
    ];
    // Our VAES kernels, where the CPU has them: the 512-bit one (what
    // such a CPU uses) and the 256-bit one (what CPUs with AVX2 only use).
    for w in [Width::Ymm, Width::Zmm] {
        if let (Ok(a), Ok(b)) = (
            VaesXts::with_width(&key, w),
            VaesXts::with_width(&key[..32], w),
        ) {
            candidates.insert(1, ("aes-xts 512b", Box::new(a)));
            candidates.push(("aes-xts 256b", Box::new(b)));
        }
    }
    for (label, c) in &candidates {
        let one = one_core(c.as_ref(), size)?;
        let all = all_cores(c.as_ref(), size)?;
        rows.push(json!({
            "cipher": label,
            "provider": c.name(),
            "sector_size": SECTOR,
            "one_core_gib_s": (one * 100.0).round() / 100.0,
            "all_cores_gib_s": (all * 100.0).round() / 100.0,
            "cores": rayon::current_num_threads(),
        }));
    }
    let mut unlock = serde_json::Value::Null;
    if let (Some(v), Some(k)) = (volume, key_file) {
        let pass = secrets::passphrase(&k)?;
        let start = Instant::now();
        let c = Luks2Container::open(&v, header.as_deref())
            .with_context(|| format!("opening {}", v.display()))?;
        let (slot, _key) = c.unlock(&pass, None)?;
        let ms = start.elapsed().as_secs_f64() * 1000.0;
        unlock = json!({"volume": v, "keyslot": slot, "unlock_ms": (ms * 10.0).round() / 10.0});
    }
    if json_out {
        println!(
            "{}",
            serde_json::to_string_pretty(&json!({"ciphers": rows, "unlock": unlock}))?
        );
    } else {
        println!(
            "# {:<14} {:<40} {:>12} {:>14}",
            "cipher", "provider", "1 core", "all cores"
        );
        for r in &rows {
            println!(
                "  {:<14} {:<40} {:>8.2} GiB/s {:>8.2} GiB/s",
                r["cipher"].as_str().unwrap_or(""),
                r["provider"].as_str().unwrap_or(""),
                r["one_core_gib_s"].as_f64().unwrap_or(0.0),
                r["all_cores_gib_s"].as_f64().unwrap_or(0.0)
            );
        }
        println!(
            "  (4096-byte sectors, 1 MiB requests, {} cores)",
            rayon::current_num_threads()
        );
        if !unlock.is_null() {
            println!(
                "unlock {}: keyslot {} in {} ms",
                unlock["volume"].as_str().unwrap_or(""),
                unlock["keyslot"],
                unlock["unlock_ms"]
            );
        }
    }
    Ok(exit::OK)
}
