//! The device memory seam: what the HBM tier needs from a GPU, and a host-memory stand-in for
//! testing the tier's logic where there is no GPU.
//!
//! A [`DeviceMemory`] allocates and frees device memory, reports its capacity, and copies
//! between host and device (and within the device) in batches: a batch is issued
//! asynchronously on the device's streams and the call returns when all of it has landed.
//! The real implementation is `CudaDevice` (feature `cuda`, on cudarc with the driver loaded at
//! run time). [`HostTestDevice`] implements the same trait over host memory; it exists only
//! so the tier and the engine can be tested on machines without a GPU, is named as a test
//! device everywhere it shows, and no config can select it.

#![expect(
    unsafe_code,
    reason = "the device seam copies through raw device addresses; each copy is checked or its contract stated"
)]

use std::collections::BTreeMap;
use std::fmt;

use parking_lot::Mutex;

use crate::{Error, Result};

/// A range of device memory: a device address and a length in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct DeviceRange {
    /// The device address of the first byte.
    pub ptr: u64,
    /// Length in bytes.
    pub len: u64,
}

impl DeviceRange {
    /// The sub-range `offset..offset + len`, if it lies inside this one.
    pub fn sub(&self, offset: u64, len: u64) -> Option<DeviceRange> {
        let end = offset.checked_add(len)?;
        (end <= self.len).then(|| DeviceRange {
            ptr: self.ptr + offset,
            len,
        })
    }
}

/// One host-to-device copy of a batch: `source` to device address `target`.
#[derive(Debug)]
pub struct ToDevice<'a> {
    /// Device address of the first byte written.
    pub target: u64,
    /// The bytes.
    pub source: &'a [u8],
}

/// One device-to-host copy of a batch: `target.len()` bytes from device address `source`.
#[derive(Debug)]
pub struct ToHost<'a> {
    /// Device address of the first byte read.
    pub source: u64,
    /// Where the bytes go.
    pub target: &'a mut [u8],
}

/// Device memory a tier can live in.
///
/// # Safety
///
/// The copy methods are `unsafe`: the caller promises that every device range they name lies
/// inside memory this device allocated (or that the caller owns on it) and that nothing else
/// writes those bytes, or reads bytes being written, until the call returns. The HBM tier keeps
/// that promise with its extents, which only one owner holds at a time.
pub trait DeviceMemory: Send + Sync + fmt::Debug + 'static {
    /// The device, for logs and errors (e.g. "NVIDIA H100 80GB HBM3 (cuda device 0)").
    fn name(&self) -> String;

    /// Bytes of device memory free now, and in all.
    ///
    /// # Errors
    ///
    /// [`Error::Device`] if the device cannot say.
    fn memory_info(&self) -> Result<(u64, u64)>;

    /// Allocates `len` bytes of device memory.
    ///
    /// # Errors
    ///
    /// [`Error::Device`] if the device refuses (out of memory, a broken context).
    fn allocate(&self, len: u64) -> Result<DeviceRange>;

    /// Frees memory [`allocate`](Self::allocate) returned.
    ///
    /// # Safety
    ///
    /// `range` came from `allocate` on this device, is freed once, and no copy uses it anymore.
    unsafe fn free(&self, range: DeviceRange);

    /// Copies every item host to device, issued asynchronously, and returns when all landed.
    ///
    /// # Safety
    ///
    /// See the trait: the targets are device memory the caller may write.
    ///
    /// # Errors
    ///
    /// [`Error::Device`]; after an error, the targets' bytes are unspecified.
    unsafe fn copy_to_device(&self, copies: &[ToDevice<'_>]) -> Result<()>;

    /// Copies every item device to host, issued asynchronously, and returns when all landed.
    ///
    /// # Safety
    ///
    /// See the trait: the sources are device memory the caller may read.
    ///
    /// # Errors
    ///
    /// [`Error::Device`]; after an error, the targets' bytes are unspecified.
    unsafe fn copy_to_host(&self, copies: &mut [ToHost<'_>]) -> Result<()>;

    /// As [`copy_to_host`](Self::copy_to_host), and shows `observe` each piece of the targets
    /// as it lands, as `(item, bytes)`, in order within each item: a caller can checksum the
    /// bytes while later pieces are still being copied. The default copies everything, then
    /// shows each target whole.
    ///
    /// # Safety
    ///
    /// As [`copy_to_host`](Self::copy_to_host).
    ///
    /// # Errors
    ///
    /// As [`copy_to_host`](Self::copy_to_host); pieces shown before an error are not
    /// shown again.
    unsafe fn copy_to_host_observed(
        &self,
        copies: &mut [ToHost<'_>],
        observe: &mut dyn FnMut(usize, &[u8]),
    ) -> Result<()> {
        // SAFETY: the caller's promise, passed on.
        unsafe { self.copy_to_host(copies) }?;
        for (item, copy) in copies.iter().enumerate() {
            observe(item, copy.target);
        }
        Ok(())
    }

    /// Copies `len` bytes from device address `source` to device address `target`.
    ///
    /// # Safety
    ///
    /// See the trait; the two ranges do not overlap.
    ///
    /// # Errors
    ///
    /// [`Error::Device`].
    unsafe fn copy_within(&self, target: u64, source: u64, len: u64) -> Result<()>;

    /// [`copy_within`](Self::copy_within) and the device-to-host `reads` in one trip: all are
    /// issued, then waited for once. For a reader that checks a block's header after moving
    /// its payload, rather than waiting for the header first. The default does one after the
    /// other.
    ///
    /// # Safety
    ///
    /// As [`copy_within`](Self::copy_within) and [`copy_to_host`](Self::copy_to_host).
    ///
    /// # Errors
    ///
    /// [`Error::Device`]; after an error, every target's bytes are unspecified.
    unsafe fn copy_within_and_read(
        &self,
        target: u64,
        source: u64,
        len: u64,
        reads: &mut [ToHost<'_>],
    ) -> Result<()> {
        // SAFETY: the caller's promises, passed on.
        unsafe { copy_within_then_read(self, target, source, len, reads) }
    }

    /// Whether this is [`HostTestDevice`]: host memory standing in for a GPU in tests.
    fn is_test_device(&self) -> bool {
        false
    }
}

/// [`DeviceMemory::copy_within_and_read`] in two trips, one after the other.
///
/// # Safety
///
/// As [`DeviceMemory::copy_within_and_read`].
pub(crate) unsafe fn copy_within_then_read<D: DeviceMemory + ?Sized>(
    device: &D,
    target: u64,
    source: u64,
    len: u64,
    reads: &mut [ToHost<'_>],
) -> Result<()> {
    // SAFETY: the caller's promises, passed on.
    unsafe {
        device.copy_within(target, source, len)?;
        device.copy_to_host(reads)
    }
}

/// Host memory posing as a device, **for tests only**: allocations are boxed host buffers
/// whose addresses serve as device addresses, and every copy is a bounds-checked `memcpy`
/// (an address outside every allocation is an [`Error::Device`], where a GPU would fault). It
/// lets the HBM tier's logic (allocation, demotion, pinning, promotion, running out of
/// space) run where there is no GPU. It is never a configured HBM tier.
#[derive(Debug)]
pub struct HostTestDevice {
    capacity: u64,
    /// Batches of host-to-device copies made so far (for tests of batching).
    batches_to_device: std::sync::atomic::AtomicU64,
    /// Allocation start -> its buffer.
    allocations: Mutex<BTreeMap<u64, HostBuffer>>,
}

/// A heap buffer owned through a raw pointer, so copies can address two of them at once
/// without two mutable borrows of the map.
#[derive(Debug)]
struct HostBuffer {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: a HostBuffer is a uniquely owned heap allocation (from Box::into_raw); its bytes are
// only touched by copies made under the device's lock, or freed once under it.
unsafe impl Send for HostBuffer {}

impl Drop for HostBuffer {
    fn drop(&mut self) {
        // SAFETY: ptr and len came from Box::<[u8]>::into_raw in `allocate`, dropped once.
        drop(unsafe { Box::from_raw(std::ptr::slice_from_raw_parts_mut(self.ptr, self.len)) });
    }
}

impl HostTestDevice {
    /// A test device with `capacity` bytes of "device" memory.
    pub fn new(capacity: u64) -> Self {
        Self {
            capacity,
            batches_to_device: std::sync::atomic::AtomicU64::new(0),
            allocations: Mutex::new(BTreeMap::new()),
        }
    }

    /// Calls to [`DeviceMemory::copy_to_device`] so far: each is one trip to a real device.
    pub fn batches_to_device(&self) -> u64 {
        self.batches_to_device
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Checks `ptr..ptr + len` against the allocations, and returns the host pointer to it.
    fn check(allocations: &BTreeMap<u64, HostBuffer>, ptr: u64, len: usize) -> Result<*mut u8> {
        let fault = || Error::Device {
            device: "host test device".into(),
            action: "copy",
            reason: format!("{len} bytes at {ptr:#x} are not inside one allocation"),
        };
        let (&start, buffer) = allocations.range(..=ptr).next_back().ok_or_else(fault)?;
        let offset = usize::try_from(ptr - start).map_err(|_| fault())?;
        let end = offset.checked_add(len).ok_or_else(fault)?;
        if end > buffer.len {
            return Err(fault());
        }
        // SAFETY: offset + len <= buffer.len, so the result stays inside the allocation.
        Ok(unsafe { buffer.ptr.add(offset) })
    }
}

impl DeviceMemory for HostTestDevice {
    fn name(&self) -> String {
        "host test device (not a GPU)".into()
    }

    fn memory_info(&self) -> Result<(u64, u64)> {
        let used: u64 = self
            .allocations
            .lock()
            .values()
            .map(|b| b.len as u64 - 1)
            .sum();
        Ok((self.capacity.saturating_sub(used), self.capacity))
    }

    fn allocate(&self, len: u64) -> Result<DeviceRange> {
        let (free, _) = self.memory_info()?;
        let refuse = |reason: String| Error::Device {
            device: self.name(),
            action: "allocate",
            reason,
        };
        if len > free {
            return Err(refuse(format!("{len} bytes asked, {free} free")));
        }
        let size = usize::try_from(len).map_err(|_| refuse("too large".into()))?;
        // One byte more, so a zero-length allocation still has an address of its own.
        let buffer = Box::into_raw(vec![0u8; size + 1].into_boxed_slice());
        let buffer = HostBuffer {
            ptr: buffer.cast::<u8>(),
            len: size + 1,
        };
        let ptr = buffer.ptr as u64;
        self.allocations.lock().insert(ptr, buffer);
        Ok(DeviceRange { ptr, len })
    }

    unsafe fn free(&self, range: DeviceRange) {
        self.allocations.lock().remove(&range.ptr);
    }

    unsafe fn copy_to_device(&self, copies: &[ToDevice<'_>]) -> Result<()> {
        self.batches_to_device
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let allocations = self.allocations.lock();
        for copy in copies {
            let target = Self::check(&allocations, copy.target, copy.source.len())?;
            // SAFETY: `check` found `source.len()` bytes at `target` inside one live
            // allocation, which the lock keeps alive; a host slice cannot overlap a boxed
            // allocation the caller does not own.
            unsafe {
                std::ptr::copy_nonoverlapping(copy.source.as_ptr(), target, copy.source.len())
            };
        }
        Ok(())
    }

    unsafe fn copy_to_host(&self, copies: &mut [ToHost<'_>]) -> Result<()> {
        let allocations = self.allocations.lock();
        for copy in copies.iter_mut() {
            let source = Self::check(&allocations, copy.source, copy.target.len())?;
            // SAFETY: as in `copy_to_device`, with the roles swapped.
            unsafe {
                std::ptr::copy_nonoverlapping(source, copy.target.as_mut_ptr(), copy.target.len())
            };
        }
        Ok(())
    }

    unsafe fn copy_within(&self, target: u64, source: u64, len: u64) -> Result<()> {
        let len = usize::try_from(len).map_err(|_| Error::Device {
            device: self.name(),
            action: "copy",
            reason: "too large".into(),
        })?;
        let allocations = self.allocations.lock();
        let from = Self::check(&allocations, source, len)?;
        let to = Self::check(&allocations, target, len)?;
        // SAFETY: both ranges are inside live allocations (checked above, kept alive by the
        // lock); the caller promises they do not overlap, and `copy` tolerates it anyway.
        unsafe { std::ptr::copy(from, to, len) };
        Ok(())
    }

    fn is_test_device(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_round_trip_and_stray_addresses_fault() {
        let device = HostTestDevice::new(1 << 20);
        let a = device.allocate(4096).unwrap();
        let b = device.allocate(4096).unwrap();
        assert_eq!(device.memory_info().unwrap(), ((1 << 20) - 8192, 1 << 20));
        let data: Vec<u8> = (0..100).collect();
        // SAFETY: the test owns both allocations.
        unsafe {
            device
                .copy_to_device(&[ToDevice {
                    target: a.ptr + 10,
                    source: &data,
                }])
                .unwrap();
            device.copy_within(b.ptr, a.ptr + 10, 100).unwrap();
            let mut back = vec![0u8; 100];
            device
                .copy_to_host(&mut [ToHost {
                    source: b.ptr,
                    target: &mut back,
                }])
                .unwrap();
            assert_eq!(back, data);
            // Past the end of an allocation, or nowhere at all: an error, not a write.
            let over = device.copy_to_device(&[ToDevice {
                target: a.ptr + 4090,
                source: &data,
            }]);
            assert!(matches!(over, Err(Error::Device { .. })));
            assert!(device.copy_within(1, 2, 3).is_err());
            device.free(a);
            device.free(b);
        }
        assert!(matches!(
            device.allocate(2 << 20),
            Err(Error::Device { .. })
        ));
        assert!(device.is_test_device());
    }

    #[test]
    fn sub_ranges_stay_inside() {
        let r = DeviceRange {
            ptr: 1000,
            len: 100,
        };
        assert_eq!(r.sub(10, 90), Some(DeviceRange { ptr: 1010, len: 90 }));
        assert_eq!(r.sub(10, 91), None);
        assert_eq!(r.sub(u64::MAX, 2), None);
    }
}
