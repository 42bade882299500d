//! Metadata in RocksDB: the NVMe block map and the node's identity.
//!
//! Column families:
//!
//! - `blocks`: block key -> [`MapEntry`], one per block persisted on the NVMe tier;
//! - `node`: `format_version` -> u32 LE, `node_id` -> 16 bytes, `nvme_capacity_bytes` -> u64 LE.
//!
//! Writes that must survive a crash go through one `WriteBatch` with `sync = true`, so a batch
//! of puts costs one sync. The engine writes a block's bytes and syncs the data file before it
//! commits the entry that points at them: a crash can leave an extent no entry points at (an
//! orphan, free again on the next open), never an entry pointing at bytes that were not
//! written.

use std::path::Path;

use rocksdb::{ColumnFamilyDescriptor, DB, IteratorMode, Options, WriteBatch, WriteOptions};

use crate::format::le;
use crate::{Error, Result};

/// Version of the data directory's layout (the map records, the node keys, the block format
/// on NVMe). An engine refuses a directory of another version and leaves it untouched.
pub const DATA_DIR_VERSION: u32 = 1;

const CF_BLOCKS: &str = "blocks";
const CF_NODE: &str = "node";
const KEY_VERSION: &[u8] = b"format_version";
const KEY_NODE_ID: &[u8] = b"node_id";
const KEY_NVME_CAPACITY: &[u8] = b"nvme_capacity_bytes";

/// Where a persisted block lies on the NVMe tier, and what it must be when read back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MapEntry {
    /// Start of the extent in the data file, a multiple of 4 KiB.
    pub extent_offset_bytes: u64,
    /// Length of the extent, a multiple of 4 KiB.
    pub extent_len_bytes: u64,
    /// Generation of the block.
    pub generation: u64,
    /// Payload length.
    pub payload_len: u32,
    /// Where the payload starts in the block.
    pub payload_offset: u32,
    /// CRC32 of the payload.
    pub payload_crc32: u32,
}

/// Encoded size of a [`MapEntry`]: a version byte, three reserved zero bytes, then the fields
/// in declaration order, little-endian.
pub(crate) const MAP_ENTRY_BYTES: usize = 4 + 8 + 8 + 8 + 4 + 4 + 4;
const MAP_ENTRY_VERSION: u8 = 1;

impl MapEntry {
    /// The record stored in RocksDB.
    pub fn encode(&self) -> [u8; MAP_ENTRY_BYTES] {
        let mut out = [0u8; MAP_ENTRY_BYTES];
        out[0] = MAP_ENTRY_VERSION;
        le::put_u64(&mut out, 4, self.extent_offset_bytes);
        le::put_u64(&mut out, 12, self.extent_len_bytes);
        le::put_u64(&mut out, 20, self.generation);
        le::put_u32(&mut out, 28, self.payload_len);
        le::put_u32(&mut out, 32, self.payload_offset);
        le::put_u32(&mut out, 36, self.payload_crc32);
        out
    }

    /// Decodes a record, refusing any other length, version or nonzero reserved bytes.
    ///
    /// # Errors
    ///
    /// [`Error::CorruptMetadata`].
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let corrupt = |reason: &str| Error::CorruptMetadata {
            reason: reason.to_owned(),
        };
        let bytes: &[u8; MAP_ENTRY_BYTES] = bytes
            .try_into()
            .map_err(|_| corrupt("map entry of the wrong length"))?;
        if bytes[0] != MAP_ENTRY_VERSION || bytes[1..4] != [0, 0, 0] {
            return Err(corrupt("map entry of an unknown version"));
        }
        Ok(Self {
            extent_offset_bytes: le::u64_at(bytes, 4),
            extent_len_bytes: le::u64_at(bytes, 12),
            generation: le::u64_at(bytes, 20),
            payload_len: le::u32_at(bytes, 28),
            payload_offset: le::u32_at(bytes, 32),
            payload_crc32: le::u32_at(bytes, 36),
        })
    }

    /// Bytes of the block on NVMe.
    pub fn block_len(&self) -> u64 {
        u64::from(self.payload_offset) + u64::from(self.payload_len)
    }
}

/// What the `node` column family says about the directory.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NodeInfo {
    /// Created once, when the directory is first opened.
    pub node_id: [u8; 16],
    /// The layout version.
    pub format_version: u32,
    /// Size the data file was created with.
    pub nvme_capacity_bytes: u64,
}

/// The RocksDB database of a data directory.
pub(crate) struct MetaStore {
    db: DB,
    sync: WriteOptions,
}

impl std::fmt::Debug for MetaStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetaStore")
            .field("path", &self.db.path())
            .finish()
    }
}

fn rocks(action: &'static str) -> impl FnOnce(rocksdb::Error) -> Error {
    move |source| Error::Metadata { action, source }
}

fn options(create: bool) -> Options {
    let mut options = Options::default();
    options.create_if_missing(create);
    options.create_missing_column_families(create);
    // Metadata is small; a modest memtable and no compression keep opening fast.
    options.set_write_buffer_size(16 << 20);
    options.set_compression_type(rocksdb::DBCompressionType::Lz4);
    // The block map lives in the log until a flush. RocksDB's default recovery stops replaying
    // at the first damaged record and opens without the rest, silently. This mode reports any
    // damage, the last record's included: a torn last record would only be a write a crash
    // cut short (every map write is synced before its answer), but damage to an acknowledged
    // last record looks the same, and `kvctl salvage` is the safe answer to both. A SIGKILL
    // leaves no torn record (60 kill cycles of the crash test opened cleanly).
    options.set_wal_recovery_mode(rocksdb::DBRecoveryMode::AbsoluteConsistency);
    options.set_paranoid_checks(true);
    options
}

impl MetaStore {
    /// Reads the node info of an existing database without writing anything, or `None` if
    /// there is no database at `path`.
    ///
    /// # Errors
    ///
    /// [`Error::Metadata`] if the database exists but cannot be read;
    /// [`Error::CorruptMetadata`] if its node records are malformed.
    pub(crate) fn peek(path: &Path) -> Result<Option<NodeInfo>> {
        if !path.join("CURRENT").exists() {
            return Ok(None);
        }
        let db = DB::open_cf_for_read_only(&options(false), path, [CF_BLOCKS, CF_NODE], false)
            .map_err(rocks("open the metadata read-only"))?;
        Self::read_node_info(&db).map(Some)
    }

    /// Opens (creating if missing) the database read-write. A new database gets a fresh node
    /// id and records `nvme_capacity_bytes`.
    ///
    /// # Errors
    ///
    /// [`Error::Metadata`] for RocksDB errors.
    pub(crate) fn open(path: &Path, nvme_capacity_bytes: u64) -> Result<(Self, NodeInfo)> {
        let cfs =
            [CF_BLOCKS, CF_NODE].map(|name| ColumnFamilyDescriptor::new(name, Options::default()));
        let db = DB::open_cf_descriptors(&options(true), path, cfs)
            .map_err(rocks("open the metadata"))?;
        let mut sync = WriteOptions::default();
        sync.set_sync(true);
        let store = Self { db, sync };
        let node = store.cf(CF_NODE);
        let existing = store
            .db
            .get_cf(node, KEY_VERSION)
            .map_err(rocks("read the node info"))?;
        if existing.is_none() {
            let mut batch = WriteBatch::default();
            batch.put_cf(node, KEY_VERSION, DATA_DIR_VERSION.to_le_bytes());
            batch.put_cf(node, KEY_NODE_ID, new_node_id());
            batch.put_cf(node, KEY_NVME_CAPACITY, nvme_capacity_bytes.to_le_bytes());
            store
                .db
                .write_opt(batch, &store.sync)
                .map_err(rocks("write the node info"))?;
        }
        let info = Self::read_node_info(&store.db)?;
        Ok((store, info))
    }

    /// Opens an existing database read-only (for offline inspection): writes nothing.
    ///
    /// # Errors
    ///
    /// [`Error::Metadata`]; [`Error::CorruptMetadata`] if the node records are malformed.
    pub(crate) fn open_read_only(path: &Path) -> Result<(Self, NodeInfo)> {
        let db = DB::open_cf_for_read_only(&options(false), path, [CF_BLOCKS, CF_NODE], false)
            .map_err(rocks("open the metadata read-only"))?;
        let info = Self::read_node_info(&db)?;
        Ok((
            Self {
                db,
                sync: WriteOptions::default(),
            },
            info,
        ))
    }

    fn read_node_info(db: &DB) -> Result<NodeInfo> {
        let corrupt = |reason: &str| Error::CorruptMetadata {
            reason: reason.to_owned(),
        };
        let node = db
            .cf_handle(CF_NODE)
            .ok_or_else(|| corrupt("no `node` column family"))?;
        let get = |key: &[u8]| -> Result<Vec<u8>> {
            db.get_cf(node, key)
                .map_err(rocks("read the node info"))?
                .ok_or_else(|| corrupt("node info missing"))
        };
        let format_version = u32::from_le_bytes(
            get(KEY_VERSION)?
                .try_into()
                .map_err(|_| corrupt("format_version is not 4 bytes"))?,
        );
        let node_id = get(KEY_NODE_ID)?
            .try_into()
            .map_err(|_| corrupt("node_id is not 16 bytes"))?;
        let nvme_capacity_bytes = u64::from_le_bytes(
            get(KEY_NVME_CAPACITY)?
                .try_into()
                .map_err(|_| corrupt("nvme_capacity_bytes is not 8 bytes"))?,
        );
        Ok(NodeInfo {
            node_id,
            format_version,
            nvme_capacity_bytes,
        })
    }

    fn cf(&self, name: &str) -> &rocksdb::ColumnFamily {
        self.db
            .cf_handle(name)
            .expect("column families are created at open")
    }

    /// Applies puts and deletes of map entries atomically and durably (one synced write).
    ///
    /// # Errors
    ///
    /// [`Error::Metadata`].
    pub(crate) fn commit(&self, puts: &[(&[u8], MapEntry)], deletes: &[&[u8]]) -> Result<()> {
        if puts.is_empty() && deletes.is_empty() {
            return Ok(());
        }
        let blocks = self.cf(CF_BLOCKS);
        let mut batch = WriteBatch::default();
        for key in deletes {
            batch.delete_cf(blocks, key);
        }
        for (key, entry) in puts {
            batch.put_cf(blocks, key, entry.encode());
        }
        self.db
            .write_opt(batch, &self.sync)
            .map_err(rocks("commit map entries"))
    }

    /// The map entry of `key`, if any.
    ///
    /// # Errors
    ///
    /// [`Error::Metadata`]; [`Error::CorruptMetadata`] for a malformed entry.
    pub(crate) fn get(&self, key: &[u8]) -> Result<Option<MapEntry>> {
        let value = self
            .db
            .get_cf(self.cf(CF_BLOCKS), key)
            .map_err(rocks("read a map entry"))?;
        value.map(|v| MapEntry::decode(&v)).transpose()
    }

    /// Calls `each` for every map entry, in key order. Malformed entries are passed as errors
    /// so the caller can report them and go on.
    ///
    /// # Errors
    ///
    /// [`Error::Metadata`] if iteration itself fails.
    pub(crate) fn for_each_entry(
        &self,
        mut each: impl FnMut(&[u8], Result<MapEntry>),
    ) -> Result<()> {
        for item in self.db.iterator_cf(self.cf(CF_BLOCKS), IteratorMode::Start) {
            let (key, value) = item.map_err(rocks("scan the block map"))?;
            each(&key, MapEntry::decode(&value));
        }
        Ok(())
    }
}

/// What the engine asks of its block map, durably: the seam under which a test puts a store
/// that fails. [`MetaStore`] (RocksDB) is the one the engine opens.
pub(crate) trait MetadataStore: Send + Sync + std::fmt::Debug + 'static {
    /// As [`MetaStore::commit`]: puts and deletes, atomically and durably.
    fn commit(&self, puts: &[(&[u8], MapEntry)], deletes: &[&[u8]]) -> Result<()>;
    /// As [`MetaStore::get`].
    fn get(&self, key: &[u8]) -> Result<Option<MapEntry>>;
    /// As [`MetaStore::for_each_entry`].
    fn for_each_entry(&self, each: &mut dyn FnMut(&[u8], Result<MapEntry>)) -> Result<()>;
}

impl MetadataStore for MetaStore {
    fn commit(&self, puts: &[(&[u8], MapEntry)], deletes: &[&[u8]]) -> Result<()> {
        MetaStore::commit(self, puts, deletes)
    }

    fn get(&self, key: &[u8]) -> Result<Option<MapEntry>> {
        MetaStore::get(self, key)
    }

    fn for_each_entry(&self, each: &mut dyn FnMut(&[u8], Result<MapEntry>)) -> Result<()> {
        MetaStore::for_each_entry(self, each)
    }
}

/// 16 random bytes from the kernel, as a node's identity.
fn new_node_id() -> [u8; 16] {
    let mut id = [0u8; 16];
    // getrandom(2) does not fail for 16 bytes once the pool is initialised; if it does,
    // fall back to time and pid, which is still unique enough for an identity.
    if rustix::rand::getrandom(&mut id, rustix::rand::GetRandomFlags::empty()).is_err() {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        id = (nanos ^ u128::from(std::process::id()) << 96).to_le_bytes();
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    proptest! {
        #[test]
        fn map_entries_round_trip(
            a in any::<u64>(), b in any::<u64>(), c in any::<u64>(),
            d in any::<u32>(), e in any::<u32>(), f in any::<u32>(),
        ) {
            let entry = MapEntry {
                extent_offset_bytes: a, extent_len_bytes: b, generation: c,
                payload_len: d, payload_offset: e, payload_crc32: f,
            };
            prop_assert_eq!(MapEntry::decode(&entry.encode()).unwrap(), entry);
        }

        #[test]
        fn malformed_entries_are_errors(bytes in proptest::collection::vec(any::<u8>(), 0..80)) {
            if let Ok(entry) = MapEntry::decode(&bytes) {
                prop_assert_eq!(&entry.encode()[..], &bytes[..]);
            }
        }
    }
}
