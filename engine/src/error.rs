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
    /// A key, value or block broke the block format's rules: bad arguments (an empty or
    /// too long key, a too large value) or a block that failed verification (a checksum, a
    /// truncation, a bad header).
    #[error(transparent)]
    Format(mooncake_kv_format::Error),
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
    /// The metadata store's files are damaged (a checksum failed while it opened). The engine
    /// does not open on it: RocksDB would otherwise drop what followed the damage, silently.
    /// `kvctl salvage` rebuilds the block map from the data file.
    #[error(
        "the metadata in {} is damaged ({source}); nothing was changed. The blocks are still in \
         {}: rebuild the block map from them with `kvctl salvage {}` (the damaged metadata is \
         kept beside it)",
        path.join(crate::store::META_DIR).display(),
        path.join(crate::store::DATA_FILE).display(),
        path.display()
    )]
    DamagedMetadata {
        /// The data directory.
        path: std::path::PathBuf,
        /// RocksDB's report.
        #[source]
        source: rocksdb::Error,
    },
    /// A block could not be written to the NVMe tier during a flush.
    #[error("cannot flush block {key}: {source}")]
    Flush {
        /// The block's key: text when it is printable, else `0x` and hex.
        key: String,
        /// Why.
        #[source]
        source: Box<Error>,
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

impl From<mooncake_kv_format::Error> for Error {
    /// A valid block that is not the one expected is the engine's [`Error::BlockMismatch`];
    /// every other format error is [`Error::Format`].
    fn from(error: mooncake_kv_format::Error) -> Self {
        match error {
            mooncake_kv_format::Error::Mismatch {
                field,
                expected_generation,
                found_generation,
            } => Self::BlockMismatch {
                expected_generation,
                found_generation,
                detail: field,
            },
            other => Self::Format(other),
        }
    }
}

/// A key for a message: as text when it is printable UTF-8 of reasonable length, else `0x` and
/// hex (the spelling `kvctl` accepts back), shortened past 64 bytes.
pub(crate) fn shown_key(key: &[u8]) -> String {
    const SHOWN: usize = 64;
    let cut = &key[..key.len().min(SHOWN)];
    let more = if key.len() > SHOWN { "..." } else { "" };
    match std::str::from_utf8(cut) {
        Ok(text) if text.chars().all(|c| !c.is_control()) => format!("{text:?}{more}"),
        _ => {
            let hex: String = cut.iter().map(|b| format!("{b:02x}")).collect();
            format!("0x{hex}{more}")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_shown_as_text_or_hex() {
        assert_eq!(shown_key(b"prefix/abc"), "\"prefix/abc\"");
        assert_eq!(shown_key(&[0, 1, 0xff]), "0x0001ff");
        assert_eq!(shown_key(&[b'a'; 70]), format!("{:?}...", "a".repeat(64)));
        let flush = Error::Flush {
            key: shown_key(b"k1"),
            source: Box::new(Error::Poisoned),
        };
        assert!(flush.to_string().starts_with("cannot flush block \"k1\": "));
    }
}
