//! The one error type of this crate.

/// What an engine operation can fail with.
///
/// Operating conditions (a full tier, a corrupt block, a bad argument) are errors; broken
/// invariants of the engine itself are assertions.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A configuration value is out of range; nothing was opened.
    #[error("invalid engine configuration: {field}: {reason}")]
    Config {
        /// The offending field, named as in [`EngineConfig`](crate::EngineConfig).
        field: &'static str,
        /// Why it was refused.
        reason: String,
    },
    /// Keys must not be empty.
    #[error("empty key")]
    EmptyKey,
    /// The key is longer than [`MAX_KEY_BYTES`](crate::MAX_KEY_BYTES).
    #[error("key of {len_bytes} bytes is longer than the maximum of {max_bytes}")]
    KeyTooLong {
        /// Length of the key given.
        len_bytes: usize,
        /// The limit.
        max_bytes: usize,
    },
    /// The value is larger than [`MAX_VALUE_BYTES`](crate::MAX_VALUE_BYTES).
    #[error("value of {len_bytes} bytes is larger than the maximum of {max_bytes}")]
    ValueTooLarge {
        /// Length of the value given.
        len_bytes: usize,
        /// The limit.
        max_bytes: usize,
    },
    /// A caller-provided buffer is too small for what must go into it.
    #[error("buffer of {available_bytes} bytes is too small: {needed_bytes} needed")]
    BufferTooSmall {
        /// Bytes needed.
        needed_bytes: usize,
        /// Bytes available.
        available_bytes: usize,
    },
    /// The block does not fit even after evicting every block that may be evicted. Blocks
    /// that are pinned, or still being read, cannot be evicted.
    #[error(
        "no space for a block of {required_bytes} bytes: {used_bytes} of {capacity_bytes} bytes in use, {pinned_bytes} pinned"
    )]
    NoSpace {
        /// Bytes the block needs in the tier.
        required_bytes: u64,
        /// The tier's capacity.
        capacity_bytes: u64,
        /// Bytes in use when the engine gave up.
        used_bytes: u64,
        /// Bytes held by pinned blocks then.
        pinned_bytes: u64,
    },
    /// Fewer bytes than the block needs: `needed_bytes` is what the header (or the fixed
    /// header size) asks for.
    #[error("truncated block: {needed_bytes} bytes needed, {available_bytes} available")]
    Truncated {
        /// Bytes the block needs.
        needed_bytes: u64,
        /// Bytes given.
        available_bytes: u64,
    },
    /// The first four bytes are not the block magic.
    #[error("not a block: magic {found:02x?}")]
    BadMagic {
        /// The bytes found.
        found: [u8; 4],
    },
    /// A format version this build does not read.
    #[error("unsupported block format version {found}")]
    UnsupportedVersion {
        /// The version found.
        found: u16,
    },
    /// A header field holds a value the format does not allow (a nonzero reserved field, a
    /// payload offset before the end of the key, a length over its limit).
    #[error("invalid block header: {field} = {value}")]
    BadHeaderField {
        /// The field, named as in `docs/format.md`.
        field: &'static str,
        /// Its value.
        value: u64,
    },
    /// The header's CRC does not match its bytes.
    #[error("header checksum mismatch: stored {expected:#010x}, computed {actual:#010x}")]
    HeaderChecksum {
        /// The CRC stored in the header.
        expected: u32,
        /// The CRC of the bytes read.
        actual: u32,
    },
    /// The key's CRC does not match its bytes.
    #[error("key checksum mismatch: stored {expected:#010x}, computed {actual:#010x}")]
    KeyChecksum {
        /// The CRC stored in the header.
        expected: u32,
        /// The CRC of the bytes read.
        actual: u32,
    },
    /// The payload's CRC does not match its bytes.
    #[error("payload checksum mismatch: stored {expected:#010x}, computed {actual:#010x}")]
    PayloadChecksum {
        /// The CRC stored in the header.
        expected: u32,
        /// The CRC of the bytes read.
        actual: u32,
    },
    /// The padding between the key and the payload is not zero.
    #[error("nonzero padding byte at offset {offset}")]
    NonZeroPadding {
        /// Offset of the first nonzero byte from the start of the block.
        offset: usize,
    },
    /// A block read back is intact but is not the block that was asked for (another key or
    /// generation): the slot was reused in between.
    #[error(
        "block mismatch: expected generation {expected_generation}, found {found_generation} ({detail})"
    )]
    BlockMismatch {
        /// The generation asked for.
        expected_generation: u64,
        /// The generation found.
        found_generation: u64,
        /// Which check failed.
        detail: &'static str,
    },
    /// The storage tier failed.
    #[error("tier: {0}")]
    Tier(#[from] mooncake_kv_tiers::Error),
    /// The data directory could not be created or a file in it could not be opened.
    #[error("cannot {action} at {}: {source}", path.display())]
    DataDir {
        /// The path concerned.
        path: std::path::PathBuf,
        /// What was being attempted.
        action: &'static str,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// Another process holds the data directory (a running engine or kvd). Nothing was changed.
    #[error("data directory {} is in use by another process ({holder})", path.display())]
    DirectoryInUse {
        /// The directory.
        path: std::path::PathBuf,
        /// What the lock file says about its holder.
        holder: String,
    },
    /// The data directory was written by another format version, or its files disagree with
    /// each other or with the config. Nothing was changed.
    #[error("data directory {} cannot be opened: {reason}", path.display())]
    IncompatibleDataDir {
        /// The directory.
        path: std::path::PathBuf,
        /// What does not match.
        reason: String,
    },
    /// RocksDB failed.
    #[error("metadata: cannot {action}: {source}")]
    Metadata {
        /// What was being attempted.
        action: &'static str,
        /// RocksDB's error; its `kind()` tells busy, corruption, I/O and so on apart.
        #[source]
        source: rocksdb::Error,
    },
    /// A metadata record is malformed.
    #[error("corrupt metadata: {reason}")]
    CorruptMetadata {
        /// What is wrong.
        reason: String,
    },
    /// An earlier sync of the data file or the metadata failed, so what the device holds is
    /// unknown; the engine persists nothing more until it is reopened.
    #[error("the engine is poisoned by an earlier failed sync; reopen it")]
    Poisoned,
    /// The engine has no NVMe tier (no `data_dir` configured), so it cannot persist.
    #[error("no data directory configured: nothing can be persisted")]
    NotPersistent,
}

/// This crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
