//! Storage media for the mooncake KVCache engine.
//!
//! A *tier* stores opaque bytes at locations on one medium. It knows nothing of blocks, keys or
//! checksums: the engine above decides what the bytes mean and verifies them. This crate has:
//!
//! - the [`Tier`] trait, the seam every medium implements;
//! - [`DramTier`]: one large memfd-backed region mapped with memmap2 (huge pages when the system
//!   offers them), carved by a best-fit [`ExtentAllocator`];
//! - [`NvmeTier`]: a preallocated file or raw device opened with `O_DIRECT`, carved the same way
//!   in 4 KiB units, with batched io_uring I/O (or pread/pwrite when io_uring is unavailable);
//! - [`HbmTier`]: GPU memory (one device allocation carved by the same allocator) behind the
//!   [`DeviceMemory`] seam: `CudaDevice` with the `cuda` feature, [`HostTestDevice`] in tests;
//! - [`Extent`]: an owned token for an allocated range. It is not `Clone`, so whoever holds it
//!   owns the bytes, and borrowing it is what grants access to them.
//!
//! It is not a cache: eviction, promotion and demotion between tiers belong to the engine.
//!
//! # Example
//!
//! ```
//! use mooncake_kv_tiers::{DramConfig, DramTier, Tier};
//!
//! let tier = DramTier::open(DramConfig { capacity_bytes: 4 << 20, ..DramConfig::default() })?;
//! let mut extent = tier.allocate(10_000)?;
//! tier.write_at(&mut extent, 0, b"hello")?;
//! let mut back = [0u8; 5];
//! tier.read_at(&extent, 0, &mut back)?;
//! assert_eq!(&back, b"hello");
//! tier.free(extent);
//! assert_eq!(tier.used_bytes(), 0);
//! # Ok::<(), mooncake_kv_tiers::Error>(())
//! ```
//!
//! # Limits
//!
//! One DRAM region per tier, sized once at open; allocations are rounded up to the tier's
//! allocation unit ([`DramConfig::allocation_unit_bytes`], 512 bytes by default).

mod aligned;
mod allocator;
#[cfg(feature = "cuda")]
mod cuda;
mod device;
mod dram;
mod error;
mod hbm;
mod mmap;
mod nvme;
mod uring;

use std::fmt;

pub use aligned::{AlignedBuf, IO_ALIGN};
pub use allocator::{ExtentAllocator, SpaceStats};
#[cfg(feature = "cuda")]
pub use cuda::CudaDevice;
pub use device::{DeviceMemory, DeviceRange, HostTestDevice, ToDevice, ToHost};
pub use dram::{DramConfig, DramTier};
pub use error::{Error, Result};
pub use hbm::{ExtentParts, HbmConfig, HbmTier};
pub use nvme::{IoBackendKind, NVME_UNIT_BYTES, NvmeConfig, NvmeTier};

/// Which medium a tier is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TierKind {
    /// Host memory.
    Dram,
    /// A file or block device on flash.
    Nvme,
    /// GPU memory.
    Hbm,
}

impl fmt::Display for TierKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TierKind::Dram => "dram",
            TierKind::Nvme => "nvme",
            TierKind::Hbm => "hbm",
        })
    }
}

/// Whether to ask for huge pages for a memory region.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HugePages {
    /// Explicit huge pages (hugetlbfs) if the system has a pool of them, else transparent huge
    /// pages, else ordinary pages. Never fails for want of huge pages.
    #[default]
    Auto,
    /// Transparent huge pages only (madvise), falling back to ordinary pages.
    Transparent,
    /// Ordinary pages.
    Off,
}

/// What a memory region actually got.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HugePageMode {
    /// Backed by explicit huge pages.
    HugeTlb,
    /// Advised for transparent huge pages; the kernel decides page by page.
    Transparent,
    /// Ordinary pages.
    None,
}

/// An allocated range of a tier: the right to its bytes until it is freed.
///
/// Only a tier makes extents, and each names the tier it came from. An `Extent` is neither
/// `Clone` nor `Copy`: reading borrows it, writing borrows it mutably, and
/// [`Tier::free`] consumes it, so two writers, or a reader and a writer, can never share bytes.
#[derive(Debug, PartialEq, Eq)]
pub struct Extent {
    region_id: u64,
    offset_bytes: u64,
    len_bytes: u64,
}

impl Extent {
    /// Where the extent starts, in bytes from the start of its tier's space.
    pub fn offset_bytes(&self) -> u64 {
        self.offset_bytes
    }

    /// Length in bytes: the requested length rounded up to the tier's allocation unit.
    pub fn len_bytes(&self) -> u64 {
        self.len_bytes
    }
}

/// Usage figures of one tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TierUsage {
    /// Bytes the tier manages.
    pub capacity_bytes: u64,
    /// Bytes in allocated extents.
    pub used_bytes: u64,
    /// The largest extent that could be allocated now.
    pub largest_free_bytes: u64,
    /// Number of separate free extents (a measure of fragmentation).
    pub free_extents: u64,
}

/// A bounded store of bytes at locations on one medium.
///
/// Implementations are thread-safe; each method may be called from many threads at once.
/// Access to an extent's bytes is governed by borrowing its [`Extent`], so the trait needs no
/// locking contract of its own.
pub trait Tier: Send + Sync + fmt::Debug + 'static {
    /// The medium.
    fn kind(&self) -> TierKind;

    /// Bytes this tier manages.
    fn capacity_bytes(&self) -> u64;

    /// Bytes in allocated extents.
    fn used_bytes(&self) -> u64;

    /// The allocation unit: every extent's offset and length are multiples of it.
    fn allocation_unit_bytes(&self) -> u64;

    /// Usage and free-space figures.
    fn usage(&self) -> TierUsage;

    /// Allocates an extent of at least `len_bytes`.
    ///
    /// # Errors
    ///
    /// [`Error::OutOfSpace`] when no free extent is long enough.
    fn allocate(&self, len_bytes: u64) -> Result<Extent>;

    /// Returns an extent to the free space.
    ///
    /// # Panics
    ///
    /// If the extent came from another tier (a broken invariant of the caller).
    fn free(&self, extent: Extent);

    /// Copies `source` into the extent at `offset_bytes`.
    ///
    /// # Errors
    ///
    /// [`Error::OutOfBounds`] if the write does not fit in the extent; I/O errors of the medium.
    fn write_at(&self, extent: &mut Extent, offset_bytes: u64, source: &[u8]) -> Result<()>;

    /// Copies bytes of the extent at `offset_bytes` into all of `target`.
    ///
    /// # Errors
    ///
    /// [`Error::OutOfBounds`] if the read does not fit in the extent; I/O errors of the medium.
    fn read_at(&self, extent: &Extent, offset_bytes: u64, target: &mut [u8]) -> Result<()>;
}

/// Checks that `len_bytes` at `offset_bytes` fit inside `extent`; returns the range as usizes.
pub(crate) fn range_within(
    extent: &Extent,
    offset_bytes: u64,
    len_bytes: usize,
) -> Result<std::ops::Range<usize>> {
    let out_of_bounds = || Error::OutOfBounds {
        offset_bytes,
        len_bytes: len_bytes as u64,
        extent_len_bytes: extent.len_bytes,
    };
    let end = offset_bytes
        .checked_add(len_bytes as u64)
        .ok_or_else(out_of_bounds)?;
    if end > extent.len_bytes {
        return Err(out_of_bounds());
    }
    // Both are at most the extent's length, which is a usize-sized mapping's sub-range.
    Ok(offset_bytes as usize..end as usize)
}
