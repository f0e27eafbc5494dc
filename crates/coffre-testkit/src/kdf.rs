//! Cheap KDF costs for throw-away keyslots (tests only, never real data),
//! in one place: as numbers for the library and as the flags cryptsetup
//! and `coffre` share (`--pbkdf`, `--pbkdf-force-iterations`,
//! `--pbkdf-memory`, `--pbkdf-parallel`).

/// PBKDF2 iterations (keyslots and digests).
pub const PBKDF2_ITERATIONS: u32 = 1000;
/// Argon2 time cost.
pub const ARGON2_ITERATIONS: u32 = 4;
/// Argon2 memory, KiB.
pub const ARGON2_MEMORY_KIB: u32 = 8192;
/// Argon2 lanes.
pub const ARGON2_PARALLEL: u32 = 2;

/// [`PBKDF2_ITERATIONS`] as a flag value.
pub const PBKDF2_ITERATIONS_ARG: &str = "1000";
/// [`ARGON2_ITERATIONS`] as a flag value.
pub const ARGON2_ITERATIONS_ARG: &str = "4";
/// [`ARGON2_MEMORY_KIB`] as a flag value.
pub const ARGON2_MEMORY_ARG: &str = "8192";
/// [`ARGON2_PARALLEL`] as a flag value.
pub const ARGON2_PARALLEL_ARG: &str = "2";

/// A cheap PBKDF2 keyslot, for cryptsetup or `coffre volume`.
pub const PBKDF2_FAST: [&str; 4] = [
    "--pbkdf",
    "pbkdf2",
    "--pbkdf-force-iterations",
    PBKDF2_ITERATIONS_ARG,
];

/// A cheap argon2id keyslot, for cryptsetup or `coffre volume`.
pub const ARGON2ID_FAST: [&str; 8] = [
    "--pbkdf",
    "argon2id",
    "--pbkdf-force-iterations",
    ARGON2_ITERATIONS_ARG,
    "--pbkdf-memory",
    ARGON2_MEMORY_ARG,
    "--pbkdf-parallel",
    ARGON2_PARALLEL_ARG,
];

/// The flags of a cheap keyslot of the given KDF (`pbkdf2`, `argon2i`,
/// `argon2id`).
pub fn fast_kdf(kdf: &str) -> Vec<&'static str> {
    match kdf {
        "pbkdf2" => PBKDF2_FAST.to_vec(),
        "argon2i" | "argon2id" => {
            let name = if kdf == "argon2i" {
                "argon2i"
            } else {
                "argon2id"
            };
            vec![
                "--pbkdf",
                name,
                "--pbkdf-memory",
                ARGON2_MEMORY_ARG,
                "--pbkdf-parallel",
                ARGON2_PARALLEL_ARG,
                "--pbkdf-force-iterations",
                ARGON2_ITERATIONS_ARG,
            ]
        }
        other => panic!("unknown kdf {other}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_say_the_numbers() {
        assert_eq!(PBKDF2_ITERATIONS_ARG, PBKDF2_ITERATIONS.to_string());
        assert_eq!(ARGON2_ITERATIONS_ARG, ARGON2_ITERATIONS.to_string());
        assert_eq!(ARGON2_MEMORY_ARG, ARGON2_MEMORY_KIB.to_string());
        assert_eq!(ARGON2_PARALLEL_ARG, ARGON2_PARALLEL.to_string());
    }
}
