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
/// A GPU through the CUDA driver API (its primary context, which PyTorch shares): for
/// [`Engine::open_with_device`], or to allocate the device memory `get_into_device` fills.
#[cfg(feature = "cuda")]
pub use mooncake_kv_tiers::CudaDevice;
pub use mooncake_kv_tiers::{
    AlignedBuf, DeviceMemory, DeviceRange, DramTier, HostTestDevice, HugePageMode, HugePages,
    IoBackendKind, TierKind, ToDevice, ToHost,
};
