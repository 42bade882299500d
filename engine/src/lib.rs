//! The embeddable mooncake KVCache engine: one node's store of KVCache blocks across HBM,
//! DRAM and NVMe.
//!
//! Open an [`Engine`] with an [`EngineConfig`], then `put`, `get`, `get_into` (one copy, into
//! your buffer), `pin` (no copy; the block stays put while you read it), `prefix_match`,
//! `put_chain` / `end_chain` (hints for eviction), `remove`, their batch forms, `flush` and
//! `stats`. The engine is `Send + Sync`: share it with `Arc`.
//!
//! ```
//! use mooncake_kv_engine::{Engine, EngineConfig};
//!
//! let engine = Engine::open(EngineConfig {
//!     dram_capacity_bytes: 64 << 20,
//!     ..EngineConfig::default()
//! })?;
//! engine.put(b"prefix/0", b"kv bytes")?;
//! assert_eq!(engine.get(b"prefix/0")?.as_deref(), Some(&b"kv bytes"[..]));
//! assert_eq!(engine.prefix_match(&[b"prefix/0", b"prefix/1"]), 1);
//! # Ok::<(), mooncake_kv_engine::Error>(())
//! ```
//!
//! # What it is not
//!
//! Single-node: serving an engine to peers, replication and clients are the replication and
//! client crates'. The block format is the format crate's; the media are the tiers crate's.
//! A cache, not a database: a block may be evicted at any time, and without
//! [`Durability::WriteThrough`] or [`Engine::flush`] a crash loses what is only in memory.
//!
//! # Modules
//!
//! - `engine/`: the [`Engine`] handle and its roles, one file each (the write path, the read
//!   path, pins, chains, residency, reclaiming, promotion, persistence, recovery, stats,
//!   verification); `engine/mod.rs` has the map.
//! - [`eviction`]: the policies (adaptive, prefix-aware, S3-FIFO, LRU) behind one trait.
//! - `index`: key to block, sharded. `slot`: a block and its copies on each tier.
//! - `store` and `meta`: the data directory: the NVMe file, and the block map in RocksDB
//!   behind a small `MetadataStore` seam.
//! - [`offline`]: a stopped node's data directory, read only (what `kvctl` inspects).
//!
//! # Locks and their order
//!
//! `Store::meta_lock` → index shard → a block's `locations` → residency (one per tier). A
//! thread holding a lock only ever takes locks to its right. Map commits and the location
//! changes that depend on them happen under `meta_lock`, so a block removed or overwritten
//! while it is being persisted either is skipped by the commit or has its new map entry
//! deleted right after. A block's pin count changes under a read lock of its index shard and
//! is checked under the write lock, so a mover either ran before a pin or sees it.
//!
//! # Errors and poisoning
//!
//! Operating errors are [`Error`]s. After a failed data or metadata sync, or a panic of the
//! background reclaimer, what the device holds is unknown: the engine persists nothing more
//! and returns [`Error::Poisoned`] for anything that would, until it is reopened (reads and
//! memory-only puts go on).
//!
//! # Limits
//!
//! Keys of 1 to [`MAX_KEY_BYTES`] bytes, values up to [`MAX_VALUE_BYTES`]; a put waits at most
//! 2 s for space others are about to free before it returns [`Error::NoSpace`]; a read
//! retried because its block was replaced under it gives up after 8 tries.

mod assert;
mod config;
mod engine;
mod error;
pub mod eviction;
mod index;
mod meta;
pub mod offline;
mod slot;
mod store;

pub use config::{EngineConfig, HbmSettings};
pub use engine::{
    ChainEnd, ChainPut, Durability, Engine, EngineStats, PinnedBlock, Reservation, TierStats,
};
pub use error::{Error, Result};
pub use eviction::EvictionPolicyKind;
pub use index::seeded_key_hash;
pub use mooncake_kv_format as format;
pub use mooncake_kv_format::{MAX_KEY_BYTES, MAX_VALUE_BYTES};
/// A GPU through the CUDA driver API (its primary context, which PyTorch shares): for
/// [`Engine::open_with_device`], or to allocate the device memory `get_into_device` fills.
#[cfg(feature = "cuda")]
pub use mooncake_kv_tiers::CudaDevice;
/// What [`Error::Tier`] carries: a tier's own failure (a device, the file, the memory map).
pub use mooncake_kv_tiers::Error as TierError;
pub use mooncake_kv_tiers::{
    AlignedBuf, DeviceMemory, DeviceRange, DramTier, HostTestDevice, HugePageMode, HugePages,
    IoBackendKind, TierKind, ToDevice, ToHost,
};
