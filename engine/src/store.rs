//! The persistent side of an engine: a data directory holding the NVMe data file and the
//! RocksDB metadata, the directory lock, and the ordering rules between them.
//!
//! ```text
//! DIR/
//!   LOCK          held (flock, exclusive) by the process that has the directory open
//!   blocks.data   the NVMe tier's data file, preallocated
//!   meta/         RocksDB: the block map and the node info
//! ```

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use mooncake_kv_tiers::{AlignedBuf, IoBackendKind, NvmeConfig, NvmeTier};
use parking_lot::Mutex;

use crate::format;
use crate::meta::{DATA_DIR_VERSION, MapEntry, MetaStore, MetadataStore, NodeInfo};
use crate::slot::NvmeCopy;
use crate::{Error, Result};

/// Payloads on NVMe start on a 4 KiB boundary, so they can be read straight into a caller's
/// aligned buffer.
pub(crate) const NVME_PAYLOAD_ALIGN: usize = 4096;

/// Names inside a data directory.
pub const LOCK_FILE: &str = "LOCK";
/// The NVMe data file inside a data directory.
pub const DATA_FILE: &str = "blocks.data";
/// The RocksDB directory inside a data directory.
pub const META_DIR: &str = "meta";

/// The data file must be exactly as large as the metadata recorded at creation: a file grown
/// or cut short (a copy gone wrong, a truncation) is not the directory the map describes.
/// The engine's open and `kvctl verify` both apply this.
pub(crate) fn check_data_len(dir: &Path, node: &NodeInfo, data_len: Option<u64>) -> Result<()> {
    if data_len == Some(node.nvme_capacity_bytes) {
        return Ok(());
    }
    Err(Error::IncompatibleDataDir {
        path: dir.to_owned(),
        reason: format!(
            "the metadata expects a data file of {} bytes, found {}",
            node.nvme_capacity_bytes,
            data_len.map_or("none".to_owned(), |l| format!("{l} bytes"))
        ),
    })
}

/// A metadata error that is damage to its files, as [`Error::DamagedMetadata`] with the way
/// out; any other error as it is.
pub(crate) fn damaged(dir: &Path, error: Error) -> Error {
    match error {
        Error::Metadata { source, .. } if source.kind() == rocksdb::ErrorKind::Corruption => {
            Error::DamagedMetadata {
                path: dir.to_owned(),
                source,
            }
        }
        other => other,
    }
}

/// Creates the data directory, owner only (0700): the blocks are readable by whoever can read
/// it, token or not. An existing directory open to others is closed to them, with a warning.
fn create_private_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let error = |action| {
        move |source| Error::DataDir {
            path: dir.to_owned(),
            action,
            source,
        }
    };
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(error("create the data directory"))?;
    let mode = std::fs::metadata(dir)
        .map_err(error("stat the data directory"))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode & 0o700))
            .map_err(error("restrict the data directory to its owner"))?;
        tracing::warn!(path = %dir.display(), mode = format!("{:o}", mode & 0o777),
            "the data directory was open to other users; it is now owner-only (0700)");
    }
    Ok(())
}

/// Takes the directory's lock, or says who holds it.
pub(crate) fn lock_dir(dir: &Path) -> Result<File> {
    let path = dir.join(LOCK_FILE);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(&path)
        .map_err(|source| Error::DataDir {
            path: path.clone(),
            action: "open the lock file",
            source,
        })?;
    if rustix::fs::flock(&file, rustix::fs::FlockOperation::NonBlockingLockExclusive).is_err() {
        let holder = std::fs::read_to_string(&path).unwrap_or_default();
        return Err(Error::DirectoryInUse {
            path: dir.to_owned(),
            holder: holder.trim().to_owned(),
        });
    }
    // Best effort: the pid helps whoever finds the directory locked.
    let _ = file
        .set_len(0)
        .and_then(|()| write!(file, "pid {}", std::process::id()));
    Ok(file)
}

/// A map entry to delete at the next commit; the copy keeps its extent from reuse until then.
struct DeferredDelete {
    key: Box<[u8]>,
    generation: u64,
    _copy: Arc<NvmeCopy>,
}

/// One block to write to NVMe: its extent and contents.
pub(crate) struct BlockWrite<'a> {
    pub(crate) extent: &'a mut mooncake_kv_tiers::Extent,
    pub(crate) key: &'a [u8],
    pub(crate) payload: &'a [u8],
    pub(crate) generation: u64,
}

/// An open data directory.
pub(crate) struct Store {
    pub(crate) tier: Arc<NvmeTier>,
    meta: Box<dyn MetadataStore>,
    pub(crate) node: NodeInfo,
    /// Serialises map commits with the location changes that depend on them (see `Engine`).
    pub(crate) meta_lock: Mutex<()>,
    /// Map entries to delete at the next commit, with their copies kept alive (so their
    /// extents are not reused) until the delete is durable.
    deferred_deletes: Mutex<Vec<DeferredDelete>>,
    /// Set after a failed sync: what the device holds is unknown, so nothing more is persisted.
    poisoned: AtomicBool,
    _lock: File,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("tier", &self.tier)
            .field("node", &self.node)
            .finish()
    }
}

/// How a data directory is opened.
#[derive(Debug, Clone)]
pub(crate) struct StoreConfig {
    pub(crate) dir: PathBuf,
    pub(crate) nvme_capacity_bytes: u64,
    pub(crate) io_backend: IoBackendKind,
    pub(crate) io_depth: u32,
}

impl Store {
    /// Opens or creates the directory. Checks, before writing anything, that an existing
    /// directory has this build's version and that its data file matches what the metadata
    /// recorded.
    /// `wrap` makes the metadata store of the directory's RocksDB: itself, boxed, or a test's
    /// that fails.
    pub(crate) fn open(
        config: &StoreConfig,
        wrap: impl FnOnce(MetaStore) -> Box<dyn MetadataStore>,
    ) -> Result<Self> {
        let dir = &config.dir;
        create_private_dir(dir)?;
        let lock = lock_dir(dir)?;
        let meta_path = dir.join(META_DIR);
        let data_path = dir.join(DATA_FILE);
        let creating = match MetaStore::peek(&meta_path).map_err(|e| damaged(dir, e))? {
            Some(node) => {
                if node.format_version != DATA_DIR_VERSION {
                    return Err(Error::IncompatibleDataDir {
                        path: dir.clone(),
                        reason: format!(
                            "format version {} (this build reads {DATA_DIR_VERSION})",
                            node.format_version
                        ),
                    });
                }
                let data_len = std::fs::metadata(&data_path).map(|m| m.len()).ok();
                check_data_len(dir, &node, data_len)?;
                if node.nvme_capacity_bytes != config.nvme_capacity_bytes {
                    return Err(Error::IncompatibleDataDir {
                        path: dir.clone(),
                        reason: format!(
                            "the data file holds {} bytes but nvme_capacity_bytes is {}; \
                             resizing a data directory is not supported",
                            node.nvme_capacity_bytes, config.nvme_capacity_bytes
                        ),
                    });
                }
                false
            }
            None => {
                if data_path.exists() {
                    return Err(Error::IncompatibleDataDir {
                        path: dir.clone(),
                        reason: format!("{DATA_FILE} exists but there is no metadata"),
                    });
                }
                true
            }
        };
        // A creation that fails (no space, a file too large) takes its data file with it, or
        // every later start would find a data file with no metadata and refuse.
        let cleanup = |error: Error| {
            if creating
                && let Err(e) = std::fs::remove_file(&data_path)
                && e.kind() != std::io::ErrorKind::NotFound
            {
                tracing::warn!(path = %data_path.display(), error = %e,
                    "cannot remove the data file of a failed creation");
            }
            error
        };
        let tier = NvmeTier::open(NvmeConfig {
            capacity_bytes: config.nvme_capacity_bytes,
            io_depth: config.io_depth,
            io_backend: config.io_backend,
            ..NvmeConfig::new(data_path.clone())
        })
        .map_err(|e| cleanup(e.into()))?;
        let (meta, node) = match MetaStore::open(&meta_path, config.nvme_capacity_bytes) {
            Ok(opened) => opened,
            Err(error) => {
                drop(tier);
                return Err(cleanup(damaged(dir, error)));
            }
        };
        Ok(Self {
            tier: Arc::new(tier),
            meta: wrap(meta),
            node,
            meta_lock: Mutex::new(()),
            deferred_deletes: Mutex::new(Vec::new()),
            poisoned: AtomicBool::new(false),
            _lock: lock,
        })
    }

    /// Every map entry whose extent could be taken back, as a copy; malformed or overlapping
    /// entries are reported to `bad` and deleted from the map.
    pub(crate) fn recover(
        &self,
        mut each: impl FnMut(&[u8], Arc<NvmeCopy>),
        mut bad: impl FnMut(&[u8], &Error),
    ) -> Result<()> {
        let mut to_delete: Vec<Vec<u8>> = Vec::new();
        self.meta.for_each_entry(&mut |key, entry| {
            let checked = entry.and_then(|entry| {
                check_entry(key, &entry)?;
                let extent = self
                    .tier
                    .adopt(entry.extent_offset_bytes, entry.extent_len_bytes)?;
                Ok(Arc::new(NvmeCopy::new(
                    extent,
                    Arc::clone(&self.tier),
                    entry,
                )))
            });
            match checked {
                Ok(copy) => each(key, copy),
                Err(error) => {
                    bad(key, &error);
                    to_delete.push(key.to_vec());
                }
            }
        })?;
        let deletes: Vec<&[u8]> = to_delete.iter().map(Vec::as_slice).collect();
        self.meta.commit(&[], &deletes)
    }

    pub(crate) fn check_poisoned(&self) -> Result<()> {
        if self.poisoned.load(Ordering::Acquire) {
            Err(Error::Poisoned)
        } else {
            Ok(())
        }
    }

    fn poison<T>(&self, error: Error) -> Result<T> {
        tracing::error!(%error, "persisting failed; the engine refuses further persistence until restarted");
        self.poison_now();
        Err(error)
    }

    /// From now on nothing more is persisted: [`Error::Poisoned`] until the engine reopens.
    pub(crate) fn poison_now(&self) {
        self.poisoned.store(true, Ordering::Release);
    }

    /// Encodes blocks in the NVMe layout into aligned buffers, writes them to their extents
    /// (many in flight) and syncs the data file. After this returns `Ok`, the bytes are
    /// durable and a map entry may point at them.
    pub(crate) fn write_blocks(&self, blocks: &mut [BlockWrite<'_>]) -> Result<Vec<MapEntry>> {
        self.check_poisoned()?;
        let mut entries = Vec::with_capacity(blocks.len());
        let mut bufs = Vec::with_capacity(blocks.len());
        for block in blocks.iter() {
            let len = format::encoded_len(block.key.len(), block.payload.len(), NVME_PAYLOAD_ALIGN);
            let mut buf = AlignedBuf::zeroed(len.next_multiple_of(NVME_PAYLOAD_ALIGN));
            format::encode_into(
                &mut buf,
                block.key,
                block.payload,
                block.generation,
                NVME_PAYLOAD_ALIGN,
            )?;
            let header = format::decode_header(&buf)?;
            entries.push(MapEntry {
                extent_offset_bytes: block.extent.offset_bytes(),
                extent_len_bytes: block.extent.len_bytes(),
                generation: block.generation,
                payload_len: header.payload_len,
                payload_offset: header.payload_offset,
                payload_crc32: header.payload_crc32,
            });
            bufs.push(buf);
        }
        let mut writes: Vec<_> = blocks
            .iter_mut()
            .zip(bufs.iter())
            .map(|(block, buf)| (&mut *block.extent, buf))
            .collect();
        for result in self.tier.write_extents(&mut writes) {
            if let Err(error) = result {
                return self.poison(error.into());
            }
        }
        if let Err(error) = self.tier.sync() {
            return self.poison(error.into());
        }
        Ok(entries)
    }

    /// Commits map puts and conditional deletes (a delete applies only if the entry still has
    /// that generation), plus every deferred delete, in one synced write. Call with
    /// `meta_lock` held.
    pub(crate) fn commit(
        &self,
        puts: &[(&[u8], MapEntry)],
        deletes: &[(&[u8], u64)],
    ) -> Result<()> {
        self.check_poisoned()?;
        let deferred = std::mem::take(&mut *self.deferred_deletes.lock());
        let mut delete_keys: Vec<&[u8]> = Vec::new();
        let candidates = deletes
            .iter()
            .copied()
            .chain(deferred.iter().map(|d| (&d.key[..], d.generation)));
        for (key, generation) in candidates {
            // Only delete what is still the entry of that generation: a newer put of the same
            // key may already have replaced it.
            if self
                .meta
                .get(key)?
                .is_some_and(|entry| entry.generation == generation)
            {
                delete_keys.push(key);
            }
        }
        match self.meta.commit(puts, &delete_keys) {
            Ok(()) => Ok(()),
            Err(error) => {
                // The deferred deletes are lost with the engine: it is poisoned.
                self.poison(error)
            }
        }
        // `deferred` drops here: those extents are free for reuse now that their entries are
        // durably gone.
    }

    pub(crate) fn has_deferred_deletes(&self) -> bool {
        !self.deferred_deletes.lock().is_empty()
    }

    /// Queues the deletion of a map entry for the next commit.
    pub(crate) fn defer_delete(&self, key: &[u8], copy: Arc<NvmeCopy>) {
        self.deferred_deletes.lock().push(DeferredDelete {
            key: key.into(),
            generation: copy.entry.generation,
            _copy: copy,
        });
    }

    /// Reads a whole block into an aligned buffer and verifies it completely.
    pub(crate) fn read_block(&self, copy: &NvmeCopy) -> Result<AlignedBuf> {
        let len = copy
            .entry
            .block_len()
            .next_multiple_of(NVME_PAYLOAD_ALIGN as u64) as usize;
        let mut buf = AlignedBuf::zeroed(len);
        self.tier
            .read_extents(&mut [(copy.extent(), 0, &mut buf[..])])
            .remove(0)?;
        Ok(buf)
    }
}

/// What a map entry must satisfy before its extent is trusted.
fn check_entry(key: &[u8], entry: &MapEntry) -> Result<()> {
    let corrupt = |reason: &str| {
        Err(Error::CorruptMetadata {
            reason: reason.to_owned(),
        })
    };
    format::check_key(key)?;
    if entry.payload_len as usize > format::MAX_VALUE_BYTES {
        return corrupt("payload length over the limit");
    }
    if (entry.payload_offset as usize) < format::HEADER_BYTES + key.len()
        || entry.payload_offset as usize > format::MAX_PAYLOAD_OFFSET
    {
        return corrupt("payload offset out of range");
    }
    if entry.block_len() > entry.extent_len_bytes {
        return corrupt("block longer than its extent");
    }
    Ok(())
}
