//! The DRAM region: one memfd, mapped shared and read-write once, and the only place in this
//! crate that turns its pointer into slices.
//!
//! Soundness rests on three facts, each enforced here or by the type system:
//!
//! 1. The mapping lives exactly as long as the [`Region`]; every slice borrows the region.
//! 2. Slices are only made for an [`Extent`] of this region (checked by id and bounds), and
//!    extents are disjoint (the allocator's invariant, asserted in its tests).
//! 3. [`Extent`] is neither `Clone` nor `Copy`: a shared slice borrows `&Extent`, a mutable
//!    slice borrows `&mut Extent`, so Rust's borrow rules on the token are the aliasing rules
//!    on the bytes. Freeing consumes the token, so no slice can outlive its extent.
//!
//! The memfd is never truncated while mapped. It may later be handed to other processes
//! (the shared-memory transport), which must map it read-only: their reads of bytes we are
//! writing are outside this process's memory model and cannot cause undefined behaviour here.
#![expect(
    unsafe_code,
    reason = "slices over the mapped DRAM region; the invariants are in the module docs"
)]

use std::fs::File;
use std::os::fd::{AsFd, BorrowedFd};
use std::sync::atomic::{AtomicU64, Ordering};

use memmap2::{Advice, MmapOptions, MmapRaw};
use rustix::fs::{MemfdFlags, memfd_create};

use crate::{Error, Extent, HugePageMode, HugePages, Result};

/// Size of the huge pages MAP_HUGETLB uses here (x86_64 and aarch64 default).
const HUGE_PAGE_BYTES: u64 = 2 << 20;

pub(crate) static NEXT_REGION_ID: AtomicU64 = AtomicU64::new(1);

/// A memfd-backed shared mapping.
#[derive(Debug)]
pub(crate) struct Region {
    id: u64,
    map: MmapRaw,
    memfd: File,
    huge_page_mode: HugePageMode,
}

impl Region {
    /// Creates and maps a region of `len_bytes`. Tries explicit huge pages first when asked,
    /// then transparent huge pages, then plain pages, and reports which one it got.
    pub(crate) fn create(
        name: &str,
        len_bytes: u64,
        huge_pages: HugePages,
        populate: bool,
    ) -> Result<Self> {
        let len = usize::try_from(len_bytes).map_err(|_| Error::Config {
            field: "capacity_bytes",
            reason: format!("{len_bytes} bytes does not fit this platform's address space"),
        })?;
        if huge_pages == HugePages::Auto && len_bytes % HUGE_PAGE_BYTES == 0 {
            match Self::map(name, len, MemfdFlags::HUGETLB, populate) {
                Ok((memfd, map)) => {
                    return Ok(Self::new(map, memfd, HugePageMode::HugeTlb));
                }
                Err(error) => tracing::info!(
                    %error,
                    "explicit huge pages unavailable for the DRAM region, trying transparent huge pages"
                ),
            }
        }
        let (memfd, map) = Self::map(name, len, MemfdFlags::empty(), populate)?;
        let mut mode = HugePageMode::None;
        if huge_pages != HugePages::Off {
            match map.advise(Advice::HugePage) {
                Ok(()) => mode = HugePageMode::Transparent,
                Err(error) => {
                    tracing::warn!(%error, "transparent huge pages refused; using 4 KiB pages")
                }
            }
        }
        Ok(Self::new(map, memfd, mode))
    }

    fn new(map: MmapRaw, memfd: File, huge_page_mode: HugePageMode) -> Self {
        Self {
            id: NEXT_REGION_ID.fetch_add(1, Ordering::Relaxed),
            map,
            memfd,
            huge_page_mode,
        }
    }

    fn map(
        name: &str,
        len: usize,
        extra_flags: MemfdFlags,
        populate: bool,
    ) -> Result<(File, MmapRaw)> {
        let fd = memfd_create(name, MemfdFlags::CLOEXEC | extra_flags).map_err(|e| Error::Io {
            action: "create memfd",
            source: e.into(),
        })?;
        let memfd = File::from(fd);
        memfd.set_len(len as u64).map_err(|source| Error::Io {
            action: "size memfd",
            source,
        })?;
        let mut options = MmapOptions::new();
        options.len(len);
        if populate {
            options.populate();
        }
        let map = options.map_raw(&memfd).map_err(|source| Error::Io {
            action: "map memfd",
            source,
        })?;
        Ok((memfd, map))
    }

    /// Identity stamped into every extent of this region.
    pub(crate) fn id(&self) -> u64 {
        self.id
    }

    pub(crate) fn len_bytes(&self) -> u64 {
        self.map.len() as u64
    }

    pub(crate) fn base_addr(&self) -> usize {
        self.map.as_ptr() as usize
    }

    pub(crate) fn memfd(&self) -> BorrowedFd<'_> {
        self.memfd.as_fd()
    }

    pub(crate) fn huge_page_mode(&self) -> HugePageMode {
        self.huge_page_mode
    }

    fn check(&self, extent: &Extent) -> (usize, usize) {
        assert_eq!(
            extent.region_id, self.id,
            "extent belongs to another region"
        );
        let end = extent.offset_bytes + extent.len_bytes;
        assert!(end <= self.len_bytes(), "extent beyond the region");
        // Both fit in usize: they are bounded by the mapping's length, itself a usize.
        (extent.offset_bytes as usize, extent.len_bytes as usize)
    }

    /// The bytes of `extent`, shared.
    ///
    /// # Panics
    ///
    /// If `extent` was not allocated from this region.
    pub(crate) fn bytes<'a>(&'a self, extent: &'a Extent) -> &'a [u8] {
        let (offset, len) = self.check(extent);
        // SAFETY: `offset + len` is within the live mapping (checked above; the mapping lives as
        // long as `self`, which the slice borrows). No `&mut` slice over these bytes can exist
        // while this one does: extents are disjoint, and a mutable slice needs `&mut Extent`,
        // which cannot coexist with the `&Extent` borrowed here (module docs, facts 2 and 3).
        // The memory is initialised: a fresh memfd reads as zeros.
        unsafe { std::slice::from_raw_parts(self.map.as_ptr().add(offset), len) }
    }

    /// The bytes of `extent`, exclusive.
    ///
    /// # Panics
    ///
    /// If `extent` was not allocated from this region.
    pub(crate) fn bytes_mut<'a>(&'a self, extent: &'a mut Extent) -> &'a mut [u8] {
        let (offset, len) = self.check(extent);
        // SAFETY: in bounds of the live mapping as for `bytes`. Exclusive: extents are disjoint
        // and this one is borrowed mutably for the slice's lifetime, so no other slice, shared
        // or mutable, can cover these bytes (module docs, facts 2 and 3).
        unsafe { std::slice::from_raw_parts_mut(self.map.as_mut_ptr().add(offset), len) }
    }
}
