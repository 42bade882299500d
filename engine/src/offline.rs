//! Offline inspection of a stopped node's data directory: what `kvctl inspect`, `ls`, `header`
//! and `verify` are built on. Opens everything read-only and writes nothing, after taking the
//! directory's lock so that it never reads a directory a running engine is changing.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use mooncake_kv_tiers::{ExtentAllocator, NVME_UNIT_BYTES};

use crate::format::Error as FormatError;
use crate::format::{self, Header};
use crate::meta::MetaStore;
pub use crate::meta::{DATA_DIR_VERSION, MapEntry, NodeInfo};
use crate::store::lock_dir;
pub use crate::store::{DATA_FILE, LOCK_FILE, META_DIR};
use crate::{Error, Result};

/// A stopped node's data directory, open for reading.
pub struct DataDir {
    dir: PathBuf,
    meta: MetaStore,
    data: File,
    data_len_bytes: u64,
    node: NodeInfo,
    _lock: File,
}

impl std::fmt::Debug for DataDir {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DataDir")
            .field("dir", &self.dir)
            .field("node", &self.node)
            .finish()
    }
}

/// One entry of the block map, as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListedBlock {
    /// The key.
    pub key: Vec<u8>,
    /// The map entry, or why it could not be decoded.
    pub entry: std::result::Result<MapEntry, String>,
}

/// What `verify` found wrong with one block.
#[derive(Debug)]
pub struct BadBlock {
    /// The key.
    pub key: Vec<u8>,
    /// The first check that failed.
    pub error: Error,
}

/// The summary `kvctl inspect` prints.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// The directory.
    pub dir: PathBuf,
    /// The node's identity.
    pub node_id: [u8; 16],
    /// The directory's format version.
    pub format_version: u32,
    /// Map entries.
    pub blocks: u64,
    /// Map entries that could not be decoded or overlap another.
    pub bad_entries: u64,
    /// Payload bytes of the blocks.
    pub payload_bytes: u64,
    /// Bytes of extents the map points at.
    pub used_bytes: u64,
    /// Bytes of the data file not in any extent.
    pub free_bytes: u64,
    /// Size of the data file.
    pub capacity_bytes: u64,
    /// Valid block headers found in free space: blocks whose map entry was never committed
    /// (a crash between writing and committing) or was deleted. Reclaimed as free space.
    pub orphans: u64,
}

impl DataDir {
    /// Opens a stopped node's directory read-only.
    ///
    /// # Errors
    ///
    /// [`Error::DirectoryInUse`] if a running engine holds it; [`Error::IncompatibleDataDir`]
    /// if it is not a data directory or has another format version; [`Error::Metadata`].
    pub fn open(dir: &Path) -> Result<Self> {
        let meta_path = dir.join(META_DIR);
        if !meta_path.join("CURRENT").exists() {
            return Err(Error::IncompatibleDataDir {
                path: dir.to_owned(),
                reason: "no metadata (meta/CURRENT) found: not a data directory".to_owned(),
            });
        }
        let lock = lock_dir(dir)?;
        let (meta, node) = MetaStore::open_read_only(&meta_path)?;
        if node.format_version != DATA_DIR_VERSION {
            return Err(Error::IncompatibleDataDir {
                path: dir.to_owned(),
                reason: format!(
                    "format version {} (this build reads {DATA_DIR_VERSION})",
                    node.format_version
                ),
            });
        }
        let data_path = dir.join(DATA_FILE);
        let data = File::open(&data_path).map_err(|source| Error::DataDir {
            path: data_path.clone(),
            action: "open the data file",
            source,
        })?;
        let data_len_bytes = data
            .metadata()
            .map_err(|source| Error::DataDir {
                path: data_path,
                action: "stat the data file",
                source,
            })?
            .len();
        Ok(Self {
            dir: dir.to_owned(),
            meta,
            data,
            data_len_bytes,
            node,
            _lock: lock,
        })
    }

    /// The node info.
    pub fn node(&self) -> NodeInfo {
        self.node
    }

    /// Every map entry, in key order.
    ///
    /// # Errors
    ///
    /// [`Error::Metadata`] if the scan fails.
    pub fn list(&self) -> Result<Vec<ListedBlock>> {
        let mut out = Vec::new();
        self.meta.for_each_entry(|key, entry| {
            out.push(ListedBlock {
                key: key.to_vec(),
                entry: entry.map_err(|e| e.to_string()),
            })
        })?;
        Ok(out)
    }

    /// The map entry of one key.
    ///
    /// # Errors
    ///
    /// [`Error::Metadata`], [`Error::CorruptMetadata`].
    pub fn entry(&self, key: &[u8]) -> Result<Option<MapEntry>> {
        self.meta.get(key)
    }

    /// The raw bytes of a block, as long as its map entry says.
    ///
    /// # Errors
    ///
    /// [`Error::Format`] (truncated) if the data file ends first; [`Error::DataDir`] for read errors.
    pub fn read_block(&self, entry: &MapEntry) -> Result<Vec<u8>> {
        let end = entry.extent_offset_bytes.saturating_add(entry.block_len());
        if entry.block_len() > entry.extent_len_bytes || end > self.data_len_bytes {
            return Err(Error::from(FormatError::Truncated {
                needed_bytes: end,
                available_bytes: self.data_len_bytes,
            }));
        }
        // Bounded: block_len is at most the extent, which is inside the file.
        let mut buf = vec![0u8; entry.block_len() as usize];
        self.read_at(&mut buf, entry.extent_offset_bytes)?;
        Ok(buf)
    }

    /// Fills `buf` from the data file at `offset_bytes`.
    fn read_at(&self, buf: &mut [u8], offset_bytes: u64) -> Result<()> {
        self.data
            .read_exact_at(buf, offset_bytes)
            .map_err(|source| Error::DataDir {
                path: self.dir.join(DATA_FILE),
                action: "read the data file",
                source,
            })
    }

    /// The decoded header of a block (checked, but without reading the payload).
    ///
    /// # Errors
    ///
    /// As [`format::decode_header`], and read errors.
    pub fn header(&self, entry: &MapEntry) -> Result<Header> {
        let mut buf = [0u8; format::HEADER_BYTES];
        self.read_at(&mut buf, entry.extent_offset_bytes)?;
        Ok(format::decode_header(&buf)?)
    }

    /// Fully verifies one block: every CRC, and key, generation and lengths against the map.
    ///
    /// # Errors
    ///
    /// The first check that failed.
    pub fn verify_block(&self, key: &[u8], entry: &MapEntry) -> Result<()> {
        let bytes = self.read_block(entry)?;
        format::verify(
            &bytes,
            &format::Expected {
                key,
                generation: entry.generation,
                payload_len: entry.payload_len,
                payload_offset: Some(entry.payload_offset),
                payload_crc32: Some(entry.payload_crc32),
            },
        )?;
        Ok(())
    }

    /// Verifies every block, calling `progress` after each; returns the bad ones.
    ///
    /// # Errors
    ///
    /// [`Error::Metadata`] if the map cannot be scanned.
    pub fn verify_all(&self, mut progress: impl FnMut(u64, u64)) -> Result<Vec<BadBlock>> {
        let listed = self.list()?;
        let total = listed.len() as u64;
        let mut bad = Vec::new();
        for (done, block) in listed.into_iter().enumerate() {
            let result = match &block.entry {
                Ok(entry) => self.verify_block(&block.key, entry),
                Err(reason) => Err(Error::CorruptMetadata {
                    reason: reason.clone(),
                }),
            };
            if let Err(error) = result {
                bad.push(BadBlock {
                    key: block.key,
                    error,
                });
            }
            progress(done as u64 + 1, total);
        }
        Ok(bad)
    }

    /// Counts blocks, bytes, free space and orphans.
    ///
    /// # Errors
    ///
    /// [`Error::Metadata`] and read errors.
    pub fn summary(&self) -> Result<Summary> {
        let capacity = self.data_len_bytes;
        let mut allocator = ExtentAllocator::new(capacity / NVME_UNIT_BYTES);
        let (mut blocks, mut bad_entries, mut payload_bytes) = (0, 0, 0);
        for block in self.list()? {
            let Ok(entry) = block.entry else {
                bad_entries += 1;
                continue;
            };
            let taken = entry.extent_offset_bytes % NVME_UNIT_BYTES == 0
                && entry.extent_len_bytes % NVME_UNIT_BYTES == 0
                && allocator.take(
                    entry.extent_offset_bytes / NVME_UNIT_BYTES,
                    entry.extent_len_bytes / NVME_UNIT_BYTES,
                );
            if taken {
                blocks += 1;
                payload_bytes += u64::from(entry.payload_len);
            } else {
                bad_entries += 1;
            }
        }
        let used_bytes = allocator.allocated_units() * NVME_UNIT_BYTES;
        let mut orphans = 0;
        for (start, len) in allocator.free_extents() {
            let (mut unit, end) = (start, start + len);
            while unit < end {
                let mut head = [0u8; format::HEADER_BYTES];
                let offset = unit * NVME_UNIT_BYTES;
                let step = match self.data.read_exact_at(&mut head, offset) {
                    Ok(()) => match format::decode_header(&head) {
                        Ok(header) => {
                            orphans += 1;
                            (header.block_len() as u64).div_ceil(NVME_UNIT_BYTES).max(1)
                        }
                        Err(_) => 1,
                    },
                    Err(_) => break,
                };
                unit += step;
            }
        }
        Ok(Summary {
            dir: self.dir.clone(),
            node_id: self.node.node_id,
            format_version: self.node.format_version,
            blocks,
            bad_entries,
            payload_bytes,
            used_bytes,
            free_bytes: capacity - used_bytes,
            capacity_bytes: capacity,
            orphans,
        })
    }
}
