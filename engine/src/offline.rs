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
        let (meta, node) =
            MetaStore::open_read_only(&meta_path).map_err(|e| crate::store::damaged(dir, e))?;
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
    /// [`Error::IncompatibleDataDir`] where the engine would refuse to open the directory
    /// ([`DataDir::check_open`]); [`Error::Metadata`] if the map cannot be scanned.
    pub fn verify_all(&self, mut progress: impl FnMut(u64, u64)) -> Result<Vec<BadBlock>> {
        self.check_open()?;
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

    /// What the engine checks at open beyond the format version (which [`DataDir::open`]
    /// checks): that the data file is exactly as large as the metadata recorded. `kvctl verify`
    /// fails where the node would refuse to start.
    ///
    /// # Errors
    ///
    /// [`Error::IncompatibleDataDir`], saying what differs.
    pub fn check_open(&self) -> Result<()> {
        crate::store::check_data_len(&self.dir, &self.node, Some(self.data_len_bytes))
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

/// What [`salvage`] found and wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SalvageReport {
    /// Bytes of the data file scanned.
    pub scanned_bytes: u64,
    /// Intact blocks found (every CRC checked).
    pub intact_blocks: u64,
    /// Of those, older generations of a key whose newer block was also found: not kept.
    pub superseded_blocks: u64,
    /// Blocks in the new map: one per key, its newest intact generation.
    pub kept_blocks: u64,
    /// Places that began like a block (its magic number) but failed a check: skipped.
    pub damaged_blocks: u64,
    /// Where the old metadata was moved, if there was any.
    pub old_metadata: Option<PathBuf>,
}

/// Bytes the scan reads at a time.
const SALVAGE_CHUNK_BYTES: usize = 8 << 20;

/// Rebuilds a stopped node's block map from its data file, for when the metadata is damaged
/// or lost: every block describes itself (key, generation, CRCs of header, key and payload),
/// so a scan of the file at every 4 KiB boundary finds every intact block; each key gets its
/// newest intact generation. The old metadata directory is moved aside (`meta.damaged-SECS`),
/// never deleted, and a new one is written (a new node id; the data file's size as capacity).
///
/// What it cannot know: which blocks were removed. A removed block whose bytes are still
/// intact in the data file comes back (and a put that was never acknowledged, if its bytes
/// reached the file). Nothing it keeps is a wrong byte: every kept block passed its CRCs.
///
/// # Errors
///
/// [`Error::DirectoryInUse`] if a node holds the directory; [`Error::DataDir`] if the data
/// file cannot be read or the metadata moved; [`Error::IncompatibleDataDir`] if the data file
/// is missing or not a whole number of 4 KiB units; [`Error::Metadata`] for the new metadata.
pub fn salvage(dir: &Path, mut progress: impl FnMut(u64, u64)) -> Result<SalvageReport> {
    let _lock = lock_dir(dir)?;
    let data_path = dir.join(DATA_FILE);
    let io = |action| {
        let path = data_path.clone();
        move |source| Error::DataDir {
            path,
            action,
            source,
        }
    };
    let data = File::open(&data_path).map_err(io("open the data file"))?;
    let len = data.metadata().map_err(io("stat the data file"))?.len();
    if len == 0 || len % NVME_UNIT_BYTES != 0 {
        return Err(Error::IncompatibleDataDir {
            path: dir.to_owned(),
            reason: format!(
                "{DATA_FILE} holds {len} bytes, not a whole number of {NVME_UNIT_BYTES}-byte units"
            ),
        });
    }
    let mut report = SalvageReport {
        scanned_bytes: len,
        intact_blocks: 0,
        superseded_blocks: 0,
        kept_blocks: 0,
        damaged_blocks: 0,
        old_metadata: None,
    };
    let mut newest: std::collections::HashMap<Vec<u8>, MapEntry> = std::collections::HashMap::new();
    let mut chunk = vec![0u8; SALVAGE_CHUNK_BYTES];
    let (mut chunk_start, mut chunk_len) = (0u64, 0usize);
    let mut offset = 0u64;
    while offset + format::HEADER_BYTES as u64 <= len {
        if offset < chunk_start
            || offset + format::HEADER_BYTES as u64 > chunk_start + chunk_len as u64
        {
            chunk_start = offset;
            // Bounded by the chunk's size and by what is left of the file.
            chunk_len = SALVAGE_CHUNK_BYTES.min((len - offset) as usize);
            data.read_exact_at(&mut chunk[..chunk_len], chunk_start)
                .map_err(io("read the data file"))?;
            progress(offset, len);
        }
        let at = (offset - chunk_start) as usize;
        let mut step = NVME_UNIT_BYTES;
        if chunk[at..at + 4] == format::MAGIC {
            match format::decode_header(&chunk[at..at + format::HEADER_BYTES]) {
                Ok(header) if header.block_len() as u64 <= len - offset => {
                    let block_len = header.block_len();
                    let spilled;
                    let bytes = if at + block_len <= chunk_len {
                        &chunk[at..at + block_len]
                    } else {
                        // Bounded: a checked header's block is at most a key, padding and
                        // MAX_VALUE_BYTES, and it ends inside the file (checked above).
                        let mut owned = vec![0u8; block_len];
                        data.read_exact_at(&mut owned, offset)
                            .map_err(io("read the data file"))?;
                        spilled = owned;
                        &spilled[..]
                    };
                    match format::decode(bytes) {
                        Ok(block) => {
                            report.intact_blocks += 1;
                            let extent = (block_len as u64).next_multiple_of(NVME_UNIT_BYTES);
                            let entry = MapEntry {
                                extent_offset_bytes: offset,
                                extent_len_bytes: extent,
                                generation: header.generation,
                                payload_len: header.payload_len,
                                payload_offset: header.payload_offset,
                                payload_crc32: header.payload_crc32,
                            };
                            match newest.entry(block.key.to_vec()) {
                                std::collections::hash_map::Entry::Vacant(slot) => {
                                    slot.insert(entry);
                                }
                                std::collections::hash_map::Entry::Occupied(mut slot) => {
                                    report.superseded_blocks += 1;
                                    if entry.generation > slot.get().generation {
                                        slot.insert(entry);
                                    }
                                }
                            }
                            // An intact block is whole: no other block starts inside it.
                            step = extent;
                        }
                        Err(_) => report.damaged_blocks += 1,
                    }
                }
                _ => report.damaged_blocks += 1,
            }
        }
        offset += step;
    }
    progress(len, len);

    let meta_path = dir.join(META_DIR);
    if meta_path.exists() {
        let seconds = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let aside = dir.join(format!("{META_DIR}.damaged-{seconds}"));
        std::fs::rename(&meta_path, &aside).map_err(|source| Error::DataDir {
            path: meta_path.clone(),
            action: "move the old metadata aside",
            source,
        })?;
        report.old_metadata = Some(aside);
    }
    let (meta, _node) = MetaStore::open(&meta_path, len)?;
    let entries: Vec<(Vec<u8>, MapEntry)> = newest.into_iter().collect();
    for batch in entries.chunks(1024) {
        let puts: Vec<(&[u8], MapEntry)> = batch.iter().map(|(k, e)| (&k[..], *e)).collect();
        meta.commit(&puts, &[])?;
    }
    report.kept_blocks = entries.len() as u64;
    Ok(report)
}
