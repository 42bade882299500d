#![doc = include_str!("../../README.md")]

mod assert;
mod config;
mod engine;
mod error;
pub mod eviction;
mod index;
pub mod meta;
pub mod offline;
mod slot;
pub mod store;

pub use config::{EngineConfig, HbmSettings};
pub use engine::{
    ChainEnd, ChainPut, Durability, Engine, EngineStats, PinnedBlock, Reservation, TierStats,
};
pub use error::{Error, Result};
pub use eviction::EvictionPolicyKind;
pub use mooncake_kv_format as format;
pub use mooncake_kv_format::{MAX_KEY_BYTES, MAX_VALUE_BYTES};
pub use mooncake_kv_tiers::{
    AlignedBuf, DeviceMemory, DeviceRange, DramTier, HostTestDevice, HugePageMode, HugePages,
    IoBackendKind, TierKind, ToDevice, ToHost,
};
