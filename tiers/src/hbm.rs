//! GPU memory as a tier: one device allocation made at open, carved by the same best-fit
//! [`ExtentAllocator`] as DRAM, filled and read through a [`DeviceMemory`] in batches.

#![expect(
    unsafe_code,
    reason = "device copies need the extents' exclusivity, which this module upholds"
)]

use std::sync::Arc;
use std::sync::atomic::Ordering;

use crate::allocator::Carver;
use crate::device::{DeviceMemory, DeviceRange, ToDevice, ToHost};
use crate::mmap::NEXT_REGION_ID;
use crate::{Error, Extent, Result, Tier, TierKind, TierUsage, range_within};

/// How an [`HbmTier`] is set up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HbmConfig {
    /// Device memory the tier takes at open. A multiple of the allocation unit, at least
    /// 1 MiB, and no more than the device has free.
    pub capacity_bytes: u64,
    /// Allocation granularity. Default: 4 KiB. A power of two from 256 bytes to 2 MiB.
    pub allocation_unit_bytes: u64,
}

impl Default for HbmConfig {
    fn default() -> Self {
        Self {
            capacity_bytes: 1 << 30,
            allocation_unit_bytes: 4096,
        }
    }
}

/// GPU memory holding blocks. Thread-safe; every transfer goes through the device in batches.
#[derive(Debug)]
pub struct HbmTier {
    device: Arc<dyn DeviceMemory>,
    arena: DeviceRange,
    carver: Carver,
}

/// An extent and the pieces to write into it: `(offset in the extent, bytes)`.
pub type ExtentParts<'a> = (&'a mut Extent, &'a [(u64, &'a [u8])]);

/// One write of a batch: `source` at `offset_bytes` of `extent`.
#[derive(Debug)]
pub struct HbmWrite<'a> {
    /// Where.
    pub extent: &'a mut Extent,
    /// Offset in the extent.
    pub offset_bytes: u64,
    /// The bytes.
    pub source: &'a [u8],
}

/// One read of a batch: `target.len()` bytes at `offset_bytes` of `extent`.
#[derive(Debug)]
pub struct HbmRead<'a> {
    /// From where.
    pub extent: &'a Extent,
    /// Offset in the extent.
    pub offset_bytes: u64,
    /// Where the bytes go.
    pub target: &'a mut [u8],
}

impl HbmTier {
    /// Takes `config.capacity_bytes` of the device's memory.
    ///
    /// # Errors
    ///
    /// [`Error::Config`] for an invalid config or more than the device has free (nothing is
    /// allocated); [`Error::Device`] if the device refuses.
    pub fn open(device: Arc<dyn DeviceMemory>, config: HbmConfig) -> Result<Self> {
        let bad = |field, reason| Err(Error::Config { field, reason });
        let unit = config.allocation_unit_bytes;
        if !unit.is_power_of_two() || !(256..=(2 << 20)).contains(&unit) {
            return bad(
                "allocation_unit_bytes",
                format!("{unit} is not a power of two from 256 bytes to 2 MiB"),
            );
        }
        if config.capacity_bytes < 1 << 20 || config.capacity_bytes % unit != 0 {
            return bad(
                "capacity_bytes",
                format!(
                    "{} is not a multiple of the allocation unit ({unit} bytes) of at least 1 MiB",
                    config.capacity_bytes
                ),
            );
        }
        let (free, total) = device.memory_info()?;
        if config.capacity_bytes > free {
            return bad(
                "capacity_bytes",
                format!(
                    "{} bytes asked of {}, which has {free} free of {total}",
                    config.capacity_bytes,
                    device.name()
                ),
            );
        }
        let arena = device.allocate(config.capacity_bytes)?;
        tracing::info!(
            device = %device.name(),
            capacity_bytes = config.capacity_bytes,
            test_device = device.is_test_device(),
            "HBM tier allocated"
        );
        Ok(Self {
            device,
            arena,
            carver: Carver::new(
                NEXT_REGION_ID.fetch_add(1, Ordering::Relaxed),
                config.capacity_bytes,
                unit,
            ),
        })
    }

    /// The device behind the tier.
    pub fn device(&self) -> &Arc<dyn DeviceMemory> {
        &self.device
    }

    /// The device memory of `extent`.
    ///
    /// # Panics
    ///
    /// If the extent came from another tier.
    pub fn device_range(&self, extent: &Extent) -> DeviceRange {
        self.check_extent(extent);
        DeviceRange {
            ptr: self.arena.ptr + extent.offset_bytes,
            len: extent.len_bytes,
        }
    }

    /// What GPUDirect RDMA needs to register the tier with an RDMA NIC: the device address
    /// ranges it holds blocks in (one: the arena). Registering them with `ibv_reg_mr` needs
    /// the `nvidia-peermem` kernel module (NVIDIA's GPUDirect RDMA peer-memory client,
    /// shipped with the driver as `nvidia_peermem`; `modprobe nvidia-peermem`), or a
    /// dma-buf export of the range (`cuMemGetHandleForAddressRange`, then
    /// `ibv_reg_dmabuf_mr`) on kernels and NICs that support it.
    #[cfg(feature = "rdma")]
    pub fn gpudirect_ranges(&self) -> Vec<DeviceRange> {
        vec![self.arena]
    }

    fn check_extent(&self, extent: &Extent) {
        self.carver.check(extent);
    }

    /// Writes every item, in one batch of host-to-device copies.
    ///
    /// # Errors
    ///
    /// [`Error::OutOfBounds`] if an item does not fit in its extent (nothing is written);
    /// [`Error::Device`].
    pub fn write_batch(&self, writes: &mut [HbmWrite<'_>]) -> Result<()> {
        let mut copies = Vec::with_capacity(writes.len());
        for write in writes.iter() {
            self.check_extent(write.extent);
            range_within(write.extent, write.offset_bytes, write.source.len())?;
            copies.push(ToDevice {
                target: self.arena.ptr + write.extent.offset_bytes + write.offset_bytes,
                source: write.source,
            });
        }
        // SAFETY: each target lies inside its extent (checked above), hence inside the arena
        // this tier allocated; the caller holds each extent mutably, so nothing else touches
        // those bytes until the batch returns.
        unsafe { self.device.copy_to_device(&copies) }
    }

    /// Writes several pieces of one extent (`(offset in the extent, bytes)`), in one batch.
    ///
    /// # Errors
    ///
    /// [`Error::OutOfBounds`] if a piece does not fit (nothing is written); [`Error::Device`].
    pub fn write_parts(&self, extent: &mut Extent, parts: &[(u64, &[u8])]) -> Result<()> {
        self.write_many(&mut [(extent, parts)])
    }

    /// Writes the pieces of several extents (`(extent, [(offset in it, bytes)])`) in one batch:
    /// one trip to the device for many blocks.
    ///
    /// # Errors
    ///
    /// [`Error::OutOfBounds`] if a piece does not fit (nothing is written); [`Error::Device`].
    pub fn write_many(&self, items: &mut [ExtentParts<'_>]) -> Result<()> {
        let mut copies = Vec::new();
        for (extent, parts) in items.iter() {
            self.check_extent(extent);
            for &(offset_bytes, source) in *parts {
                range_within(extent, offset_bytes, source.len())?;
                copies.push(ToDevice {
                    target: self.arena.ptr + extent.offset_bytes + offset_bytes,
                    source,
                });
            }
        }
        // SAFETY: every target lies inside its extent (checked above), inside the arena; the
        // caller holds each extent mutably, so nothing else touches their bytes meanwhile.
        unsafe { self.device.copy_to_device(&copies) }
    }

    /// Reads several pieces of one extent (`(offset in the extent, target)`), in one batch.
    ///
    /// # Errors
    ///
    /// [`Error::OutOfBounds`] if a piece does not fit (nothing is read); [`Error::Device`].
    pub fn read_parts(&self, extent: &Extent, parts: &mut [(u64, &mut [u8])]) -> Result<()> {
        self.read_parts_observed(extent, parts, &mut |_, _| {})
    }

    /// As [`read_parts`](Self::read_parts), showing `observe` the bytes of each piece as
    /// they land, `(index of the piece, bytes)`, in order within each piece (see
    /// [`DeviceMemory::copy_to_host_observed`]): a reader checksums a payload while the rest
    /// of it is still being copied.
    ///
    /// # Errors
    ///
    /// As [`read_parts`](Self::read_parts).
    pub fn read_parts_observed(
        &self,
        extent: &Extent,
        parts: &mut [(u64, &mut [u8])],
        observe: &mut dyn FnMut(usize, &[u8]),
    ) -> Result<()> {
        self.check_extent(extent);
        for (offset_bytes, target) in parts.iter() {
            range_within(extent, *offset_bytes, target.len())?;
        }
        let base = self.arena.ptr + extent.offset_bytes;
        let mut copies: Vec<ToHost<'_>> = parts
            .iter_mut()
            .map(|(offset_bytes, target)| ToHost {
                source: base + *offset_bytes,
                target,
            })
            .collect();
        // SAFETY: every source lies inside the extent (checked above), inside the arena; the
        // caller borrows the extent, so no writer holds it meanwhile.
        unsafe { self.device.copy_to_host_observed(&mut copies, observe) }
    }

    /// Reads every item, in one batch of device-to-host copies.
    ///
    /// # Errors
    ///
    /// [`Error::OutOfBounds`] if an item does not fit in its extent (nothing is read);
    /// [`Error::Device`].
    pub fn read_batch(&self, reads: &mut [HbmRead<'_>]) -> Result<()> {
        for read in reads.iter() {
            self.check_extent(read.extent);
            range_within(read.extent, read.offset_bytes, read.target.len())?;
        }
        let arena = self.arena.ptr;
        let mut copies: Vec<ToHost<'_>> = reads
            .iter_mut()
            .map(|read| ToHost {
                source: arena + read.extent.offset_bytes + read.offset_bytes,
                target: &mut *read.target,
            })
            .collect();
        // SAFETY: each source lies inside its extent (checked above), inside the arena; the
        // caller borrows each extent, so no writer holds it while the batch runs.
        unsafe { self.device.copy_to_host(&mut copies) }
    }

    /// Copies `len` bytes at `offset_bytes` of `extent` to device memory at `target` (an
    /// inference engine's KV pages), without passing through the host, and reads the extent's
    /// first `head.len()` bytes into `head` in the same trip (one wait for both): the caller
    /// checks the block's header after the copy instead of waiting for it first.
    ///
    /// # Safety
    ///
    /// `target..target + len` is device memory of this tier's device that the caller owns
    /// and that nothing else reads or writes until the call returns, outside this tier.
    ///
    /// # Errors
    ///
    /// [`Error::OutOfBounds`] (nothing is copied); [`Error::Device`], after which the bytes
    /// of `head` and of the target are unspecified.
    pub unsafe fn copy_to_device_buffer(
        &self,
        extent: &Extent,
        offset_bytes: u64,
        len: u64,
        target: u64,
        head: &mut [u8],
    ) -> Result<()> {
        self.check_extent(extent);
        let len_usize = usize::try_from(len).map_err(|_| Error::OutOfBounds {
            offset_bytes,
            len_bytes: len,
            extent_len_bytes: extent.len_bytes,
        })?;
        range_within(extent, offset_bytes, len_usize)?;
        range_within(extent, 0, head.len())?;
        let base = self.arena.ptr + extent.offset_bytes;
        // SAFETY: the source and the head lie inside the extent, which the caller borrows; the
        // target is the caller's, as this function's contract says.
        unsafe {
            self.device.copy_within_and_read(
                target,
                base + offset_bytes,
                len,
                &mut [ToHost {
                    source: base,
                    target: head,
                }],
            )
        }
    }
}

impl Drop for HbmTier {
    fn drop(&mut self) {
        // SAFETY: the arena came from `allocate` on this device at open; every extent borrows
        // the tier, so none outlives it and no copy can be running.
        unsafe { self.device.free(self.arena) };
    }
}

impl Tier for HbmTier {
    fn kind(&self) -> TierKind {
        TierKind::Hbm
    }

    fn capacity_bytes(&self) -> u64 {
        self.arena.len
    }

    fn used_bytes(&self) -> u64 {
        self.carver.used_bytes()
    }

    fn allocation_unit_bytes(&self) -> u64 {
        self.carver.unit_bytes()
    }

    fn usage(&self) -> TierUsage {
        self.carver.usage()
    }

    fn allocate(&self, len_bytes: u64) -> Result<Extent> {
        self.carver.allocate(len_bytes)
    }

    fn free(&self, extent: Extent) {
        self.carver.free(extent);
    }

    fn write_at(&self, extent: &mut Extent, offset_bytes: u64, source: &[u8]) -> Result<()> {
        self.write_batch(&mut [HbmWrite {
            extent,
            offset_bytes,
            source,
        }])
    }

    fn read_at(&self, extent: &Extent, offset_bytes: u64, target: &mut [u8]) -> Result<()> {
        self.read_batch(&mut [HbmRead {
            extent,
            offset_bytes,
            target,
        }])
    }
}
