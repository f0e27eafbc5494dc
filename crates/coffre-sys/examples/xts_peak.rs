//! The XTS kernel's peak speed on one core: the best of many short runs
//! (1 MiB, 4 KiB sectors), which shared and noisy machines disturb less
//! than one long run. For comparing builds of the kernel; `coffre volume
//! bench` and `scripts/bench` give the figures against OpenSSL.
//!
//! `cargo run --release -p coffre-sys --example xts_peak [TRIALS]`

use coffre_sys::xts::{Width, Xts};
use std::time::Instant;

fn main() {
    let trials: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(400);
    let Some(width) = Width::best() else {
        eprintln!("xts_peak: this CPU has no VAES kernel");
        std::process::exit(1);
    };
    let mut buf = vec![0x5Au8; 1 << 20];
    for key_len in [64u8, 32] {
        let key: Vec<u8> = (0..key_len).map(|i| i.wrapping_mul(37) ^ 0xA5).collect();
        let x = Xts::with_width(&key, width).expect("the best width runs here");
        for enc in [true, false] {
            let mut best = f64::MAX;
            for t in 0..trials {
                let start = Instant::now();
                if enc {
                    x.encrypt(t as u64 * 256, 1, 4096, &mut buf);
                } else {
                    x.decrypt(t as u64 * 256, 1, 4096, &mut buf);
                }
                best = best.min(start.elapsed().as_secs_f64());
            }
            println!(
                "{:?} AES-{}-XTS {}: {:.2} GiB/s",
                width,
                usize::from(key_len) * 4,
                if enc { "encrypt" } else { "decrypt" },
                buf.len() as f64 / best / (1u64 << 30) as f64
            );
        }
    }
}
