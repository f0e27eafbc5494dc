use thiserror::Error;

/// Everything that can go wrong while reading, checking or building LUKS2
/// metadata. Messages never contain key material or passphrases.
#[derive(Debug, Error)]
#[non_exhaustive]
pub enum Error {
    /// The bytes are not a LUKS2 header at all (wrong magic, version...).
    #[error("not a LUKS2 header: {0}")]
    NotLuks2(String),
    /// The header is LUKS2 but corrupt: checksum, JSON syntax, sizes or
    /// offsets that do not add up.
    #[error("damaged LUKS2 header: {0}")]
    Corrupt(String),
    /// Both header copies are unusable.
    #[error("no usable LUKS2 header: primary: {primary}; secondary: {secondary}")]
    NoValidHeader {
        /// Why the primary copy was rejected.
        primary: String,
        /// Why the secondary copy was rejected.
        secondary: String,
    },
    /// A feature or a value coffre does not implement, in a header
    /// cryptsetup may well read; the volume is left untouched.
    #[error(
        "unsupported LUKS2 header: {0} (coffre leaves this volume untouched; cryptsetup may read it)"
    )]
    Unsupported(String),
    /// No keyslot opened with the given passphrase.
    #[error("no keyslot opens with this passphrase")]
    WrongPassphrase,
    /// The keyslot number does not exist.
    #[error("keyslot {0} is not in use")]
    KeyslotNotFound(u32),
    /// The keyslot number is already used.
    #[error("keyslot {0} is already in use")]
    KeyslotInUse(u32),
    /// All 32 keyslots are used, or the keyslot area has no room left.
    #[error("no room for another keyslot: {0}")]
    NoRoom(String),
    /// A caller asked for something that cannot be done (bad parameters).
    #[error("{0}")]
    Invalid(String),
    /// The volume key does not match the volume's digest.
    #[error("the volume key does not match this volume's digest")]
    WrongVolumeKey,
}

impl Error {
    pub(crate) fn corrupt(msg: impl Into<String>) -> Self {
        Error::Corrupt(msg.into())
    }
    pub(crate) fn unsupported(msg: impl Into<String>) -> Self {
        Error::Unsupported(msg.into())
    }
    pub(crate) fn invalid(msg: impl Into<String>) -> Self {
        Error::Invalid(msg.into())
    }
}
