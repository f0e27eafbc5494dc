//! The command line, with cryptsetup's flag names where they exist.

use clap::{Args, Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

const EXIT_CODES: &str = "\
EXIT CODES:
    0   success
    1   failure (the message says why)
    2   the passphrase opens no keyslot
    3   the volume is in use by another coffre process
    4   the LUKS2 header is damaged, missing or not LUKS2
    5   the volume uses a LUKS2 feature coffre does not implement
    64  the command line is wrong

SECRETS:
    Passphrases are read from files (--key-file F, or - for standard input),
    byte for byte as cryptsetup reads key files: a trailing newline is part of
    the passphrase. Secrets are never accepted as command-line arguments.";

/// coffre: a team strongroom for sensitive data.
///
/// The vault's data lives in one LUKS2 volume, readable by cryptsetup on any
/// Linux host; `coffre volume` works on that volume directly, without a
/// daemon, and is also the recovery path.
#[derive(Debug, Parser)]
#[command(name = "coffre", version, after_long_help = EXIT_CODES)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Work on a LUKS2 volume directly (format, keyslots, data, recovery).
    #[command(subcommand)]
    Volume(VolumeCommand),
}

/// Where a volume is.
#[derive(Debug, Args)]
pub struct Target {
    /// The data device or file.
    pub path: PathBuf,
    /// Detached header file (the data device then holds ciphertext only).
    #[arg(long, value_name = "FILE")]
    pub header: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum PbkdfChoice {
    Argon2id,
    Pbkdf2,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum PriorityChoice {
    Prefer,
    Normal,
    Ignore,
}

impl PriorityChoice {
    pub fn value(self) -> u32 {
        match self {
            Self::Ignore => 0,
            Self::Normal => 1,
            Self::Prefer => 2,
        }
    }
}

/// KDF cost for a new keyslot: benchmarked to --iter-time, or explicit.
#[derive(Debug, Args)]
pub struct PbkdfArgs {
    /// Key derivation function for the new keyslot.
    #[arg(long, value_enum, default_value = "argon2id")]
    pub pbkdf: PbkdfChoice,
    /// Target unlock time in milliseconds; costs are benchmarked on this
    /// machine to reach it (cryptsetup's default is 2000).
    #[arg(long, value_name = "MS", conflicts_with = "pbkdf_force_iterations")]
    pub iter_time: Option<u64>,
    /// Exact cost: argon2 passes, or pbkdf2 iterations (no benchmark).
    #[arg(long, value_name = "N")]
    pub pbkdf_force_iterations: Option<u32>,
    /// argon2 memory in KiB: the exact memory with
    /// --pbkdf-force-iterations, otherwise the cap for the benchmark
    /// (default 1048576, never more than half the RAM).
    #[arg(long, value_name = "KIB")]
    pub pbkdf_memory: Option<u32>,
    /// argon2 lanes, computed in parallel (default: 4, at most the CPUs).
    #[arg(long, value_name = "N")]
    pub pbkdf_parallel: Option<u32>,
}

#[derive(Debug, Subcommand)]
pub enum VolumeCommand {
    /// Create a new LUKS2 volume (destroys what PATH holds).
    ///
    /// With --header, the header and keyslots go to their own file and PATH
    /// holds ciphertext only, from offset 0: whoever stores PATH has nothing
    /// to attack passphrases with. Keep that header file safe and backed up:
    /// without it the data is lost.
    Format {
        #[command(flatten)]
        target: Target,
        /// Size of the data area (e.g. 512M, 10G); required for a new file.
        #[arg(long, value_parser = coffre::size::parse_size)]
        size: Option<u64>,
        /// File holding the passphrase for keyslot 0 (- for stdin).
        #[arg(long, value_name = "FILE")]
        key_file: PathBuf,
        /// Data sector size in bytes.
        #[arg(long, default_value_t = 4096, value_parser = sector_size_parser)]
        sector_size: u32,
        /// Volume key size in bits: 512 is AES-256-XTS, 256 is AES-128-XTS.
        #[arg(long, default_value_t = 512, value_parser = key_size_parser)]
        key_size: usize,
        #[command(flatten)]
        pbkdf: PbkdfArgs,
        /// Label stored in the header.
        #[arg(long, default_value = "")]
        label: String,
        /// Format even if PATH or the header file already holds a LUKS header.
        #[arg(long)]
        force: bool,
    },
    /// Show the header: keyslots, segment, tokens, the state of both copies.
    Dump {
        #[command(flatten)]
        target: Target,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Check a passphrase: exit 0 if it opens a keyslot, 2 if not.
    CheckKey {
        #[command(flatten)]
        target: Target,
        /// File holding the passphrase (- for stdin).
        #[arg(long, value_name = "FILE")]
        key_file: PathBuf,
        /// Try only this keyslot.
        #[arg(long, value_name = "N")]
        key_slot: Option<u32>,
    },
    /// Add a keyslot for a new passphrase.
    AddKey {
        #[command(flatten)]
        target: Target,
        /// An existing passphrase (- for stdin).
        #[arg(long, value_name = "FILE", required_unless_present = "volume_key_file")]
        key_file: Option<PathBuf>,
        /// Authorise with the raw volume key instead (recovery).
        #[arg(long, value_name = "FILE", conflicts_with = "key_file")]
        volume_key_file: Option<PathBuf>,
        /// The new passphrase.
        #[arg(long, value_name = "FILE")]
        new_keyfile: PathBuf,
        /// Keyslot number for the new passphrase (default: lowest free).
        #[arg(long, value_name = "N")]
        key_slot: Option<u32>,
        /// Priority of the new keyslot when unlocking.
        #[arg(long, value_enum)]
        priority: Option<PriorityChoice>,
        #[command(flatten)]
        pbkdf: PbkdfArgs,
    },
    /// Remove a keyslot and wipe its key material.
    RemoveKey {
        #[command(flatten)]
        target: Target,
        /// Keyslot to remove.
        #[arg(long, value_name = "N")]
        key_slot: u32,
        /// A passphrase that opens some keyslot, proving you may (- for stdin).
        #[arg(long, value_name = "FILE")]
        key_file: PathBuf,
        /// Allow removing the last keyslot (the data becomes unreadable).
        #[arg(long)]
        force: bool,
    },
    /// Change the passphrase of the keyslot the old one opens, atomically.
    ChangeKey {
        #[command(flatten)]
        target: Target,
        /// The current passphrase.
        #[arg(long, value_name = "FILE")]
        key_file: PathBuf,
        /// The new passphrase.
        #[arg(long, value_name = "FILE")]
        new_keyfile: PathBuf,
        /// Only this keyslot.
        #[arg(long, value_name = "N")]
        key_slot: Option<u32>,
        #[command(flatten)]
        pbkdf: PbkdfArgs,
    },
    /// Set a keyslot's priority (cryptsetup config --priority).
    Config {
        #[command(flatten)]
        target: Target,
        /// The keyslot.
        #[arg(long, value_name = "N")]
        key_slot: u32,
        /// New priority.
        #[arg(long, value_enum)]
        priority: PriorityChoice,
    },
    /// Rewrite a damaged or stale header copy from the good one.
    ///
    /// Says what it will do first; asks for confirmation on a terminal, and
    /// needs --batch-mode otherwise. No other command writes to a header it
    /// found damaged.
    Repair {
        #[command(flatten)]
        target: Target,
        /// Do not ask for confirmation.
        #[arg(short = 'q', long)]
        batch_mode: bool,
    },
    /// Decrypt data from the volume to standard output.
    Read {
        #[command(flatten)]
        target: Target,
        /// The passphrase (- for stdin).
        #[arg(long, value_name = "FILE")]
        key_file: PathBuf,
        /// Start at this byte of the decrypted volume.
        #[arg(long, default_value = "0", value_parser = coffre::size::parse_size)]
        offset: u64,
        /// Read this many bytes (default: to the end).
        #[arg(long, value_parser = coffre::size::parse_size)]
        length: Option<u64>,
    },
    /// Encrypt standard input into the volume.
    Write {
        #[command(flatten)]
        target: Target,
        /// The passphrase (a file; stdin carries the data).
        #[arg(long, value_name = "FILE")]
        key_file: PathBuf,
        /// Start at this byte of the decrypted volume.
        #[arg(long, default_value = "0", value_parser = coffre::size::parse_size)]
        offset: u64,
    },
    /// Measure cipher throughput and unlock time on this machine.
    Bench {
        /// Bytes to encrypt per measurement.
        #[arg(long, default_value = "256M", value_parser = coffre::size::parse_size)]
        size: u64,
        /// Also time unlocking this volume (with --key-file).
        #[arg(long, value_name = "PATH", requires = "key_file")]
        volume: Option<PathBuf>,
        /// Detached header of --volume.
        #[arg(long, value_name = "FILE")]
        header: Option<PathBuf>,
        /// Passphrase for --volume.
        #[arg(long, value_name = "FILE")]
        key_file: Option<PathBuf>,
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
}

fn sector_size_parser(s: &str) -> Result<u32, String> {
    match s {
        "512" => Ok(512),
        "4096" => Ok(4096),
        _ => Err("the sector size is 512 or 4096".into()),
    }
}

fn key_size_parser(s: &str) -> Result<usize, String> {
    match s {
        "256" => Ok(256),
        "512" => Ok(512),
        _ => Err("the key size is 256 or 512 bits (aes-xts-plain64)".into()),
    }
}
