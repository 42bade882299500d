//! [`DeviceMemory`] on an NVIDIA GPU through the CUDA driver API (cudarc, with `libcuda`
//! loaded at run time, so this builds and links on machines without CUDA).
//!
//! Host-to-device and device-to-host copies go through two page-locked staging buffers on two
//! streams: while the GPU copies one buffer, the CPU fills (or drains) the other. Device to
//! device copies are direct.

#![expect(
    unsafe_code,
    reason = "the CUDA driver API: raw device pointers and page-locked host buffers"
)]

use std::sync::Arc;

use cudarc::driver::{CudaContext, CudaStream, DriverError, result, sys};
use parking_lot::Mutex;

use crate::device::{DeviceMemory, DeviceRange, ToDevice, ToHost, copy_within_then_read};
use crate::{Error, Result};

/// Bytes per staging buffer, and per piece of a copy between host and device. Pieces
/// alternate between the two lanes, so the CPU fills or drains one buffer while the GPU
/// copies the other. Measured on an H200 against 1 and 8 MiB: gets of 2 MiB blocks 10%
/// faster than with 8 MiB (one piece, nothing overlapped), puts the same.
const STAGING_BYTES: usize = 256 << 10;

/// A GPU, by CUDA ordinal, in its primary context: the one the CUDA runtime (and so PyTorch)
/// uses, so device pointers from either are valid here.
pub struct CudaDevice {
    ordinal: usize,
    name: String,
    context: Arc<CudaContext>,
    /// Two streams, each with its staging buffer; held for a whole batch.
    lanes: Mutex<[Lane; 2]>,
}

struct Lane {
    stream: Arc<CudaStream>,
    staging: PinnedBuffer,
}

/// Page-locked host memory from `cuMemHostAlloc`.
struct PinnedBuffer {
    context: Arc<CudaContext>,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the buffer is a uniquely owned host allocation; it is only used under the device's
// lanes lock, by one thread at a time.
unsafe impl Send for PinnedBuffer {}

impl PinnedBuffer {
    fn new(context: &Arc<CudaContext>, len: usize) -> Result<Self, DriverError> {
        context.bind_to_thread()?;
        // SAFETY: a plain allocation of `len` bytes with no flags (not write-combined: the
        // CPU reads these buffers back after device-to-host copies).
        let ptr = unsafe { result::malloc_host(len, 0) }?.cast::<u8>();
        Ok(Self {
            context: Arc::clone(context),
            ptr,
            len,
        })
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        // SAFETY: `ptr` is a live allocation of `len` bytes owned by self, borrowed mutably.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl Drop for PinnedBuffer {
    fn drop(&mut self) {
        if self.context.bind_to_thread().is_ok() {
            // SAFETY: `ptr` came from cuMemHostAlloc and is freed once; the lanes' streams were
            // synchronized after the last copy that used it.
            let _ = unsafe { result::free_host(self.ptr.cast()) };
        }
    }
}

impl std::fmt::Debug for CudaDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CudaDevice")
            .field("ordinal", &self.ordinal)
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

fn device_error(device: &str, action: &'static str, error: DriverError) -> Error {
    Error::Device {
        device: device.to_owned(),
        action,
        reason: error.to_string(),
    }
}

impl CudaDevice {
    /// Opens GPU `ordinal`: checks for the driver library before touching it (cudarc panics
    /// when it is missing), creates a context, two streams and two staging buffers.
    ///
    /// # Errors
    ///
    /// [`Error::Device`] when the machine has no CUDA driver, no GPU of that ordinal, or the
    /// driver refuses.
    pub fn open(ordinal: usize) -> Result<Self> {
        let label = format!("cuda device {ordinal}");
        // SAFETY: only tries to dlopen the driver library by its usual names.
        if !unsafe { sys::is_culib_present() } {
            return Err(Error::Device {
                device: label,
                action: "open",
                reason: "no CUDA driver library (libcuda.so) on this machine".into(),
            });
        }
        let count = CudaContext::device_count().map_err(|e| device_error(&label, "open", e))?;
        if usize::try_from(count).map_or(true, |count| ordinal >= count) {
            return Err(Error::Device {
                device: label,
                action: "open",
                reason: format!("the machine has {count} CUDA devices"),
            });
        }
        let context = CudaContext::new(ordinal).map_err(|e| device_error(&label, "open", e))?;
        let name = format!(
            "{} ({label})",
            context.name().unwrap_or_else(|_| "unknown GPU".into())
        );
        let lane = || -> Result<Lane, DriverError> {
            Ok(Lane {
                stream: context.new_stream()?,
                staging: PinnedBuffer::new(&context, STAGING_BYTES)?,
            })
        };
        let lanes = [lane(), lane()];
        let [a, b] = lanes;
        let lanes = [
            a.map_err(|e| device_error(&name, "set up streams", e))?,
            b.map_err(|e| device_error(&name, "set up streams", e))?,
        ];
        Ok(Self {
            ordinal,
            name,
            context,
            lanes: Mutex::new(lanes),
        })
    }

    fn fail(&self, action: &'static str) -> impl Fn(DriverError) -> Error + '_ {
        move |error| device_error(&self.name, action, error)
    }

    /// Binds the context to this thread for `action` on `len` bytes, and returns the length
    /// as a size.
    fn bind_for(&self, len: u64, action: &'static str) -> Result<usize> {
        self.context.bind_to_thread().map_err(self.fail(action))?;
        usize::try_from(len).map_err(|_| Error::Device {
            device: self.name.clone(),
            action,
            reason: format!("{len} bytes do not fit this machine's address space"),
        })
    }
}

impl DeviceMemory for CudaDevice {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn memory_info(&self) -> Result<(u64, u64)> {
        let (free, total) = self
            .context
            .mem_get_info()
            .map_err(self.fail("read memory info"))?;
        Ok((free as u64, total as u64))
    }

    fn allocate(&self, len: u64) -> Result<DeviceRange> {
        let size = self.bind_for(len, "allocate")?;
        // SAFETY: a plain cuMemAlloc in the context bound above.
        let ptr = unsafe { result::malloc_sync(size.max(1)) }.map_err(self.fail("allocate"))?;
        Ok(DeviceRange { ptr, len })
    }

    unsafe fn free(&self, range: DeviceRange) {
        if self.context.bind_to_thread().is_ok() {
            // SAFETY: the caller promises `range` came from `allocate` and is no longer used.
            let _ = unsafe { result::free_sync(range.ptr) };
        }
    }

    unsafe fn copy_to_device(&self, copies: &[ToDevice<'_>]) -> Result<()> {
        self.context
            .bind_to_thread()
            .map_err(self.fail("copy to device"))?;
        let mut lanes = self.lanes.lock();
        let mut turn = 0;
        for copy in copies {
            for (index, chunk) in copy.source.chunks(STAGING_BYTES).enumerate() {
                let lane = &mut lanes[turn % 2];
                turn += 1;
                // The lane's previous copy must be done before its buffer is refilled.
                lane.stream
                    .synchronize()
                    .map_err(self.fail("copy to device"))?;
                let staged = &mut lane.staging.bytes_mut()[..chunk.len()];
                staged.copy_from_slice(chunk);
                let target = copy.target + (index * STAGING_BYTES) as u64;
                // SAFETY: the caller promises the target range is device memory it may write;
                // the staging buffer is page-locked and stays untouched until this lane's
                // stream is synchronized.
                unsafe { result::memcpy_htod_async(target, staged, lane.stream.cu_stream()) }
                    .map_err(self.fail("copy to device"))?;
            }
        }
        for lane in lanes.iter() {
            lane.stream
                .synchronize()
                .map_err(self.fail("copy to device"))?;
        }
        Ok(())
    }

    unsafe fn copy_to_host(&self, copies: &mut [ToHost<'_>]) -> Result<()> {
        // SAFETY: the caller's promise, passed on.
        unsafe { self.copy_to_host_observed(copies, &mut |_, _| {}) }
    }

    unsafe fn copy_to_host_observed(
        &self,
        copies: &mut [ToHost<'_>],
        observe: &mut dyn FnMut(usize, &[u8]),
    ) -> Result<()> {
        self.context
            .bind_to_thread()
            .map_err(self.fail("copy to host"))?;
        let mut lanes = self.lanes.lock();
        // The chunk in flight on each lane: (item, offset in its target, length).
        let mut pending: [Option<(usize, usize, usize)>; 2] = [None, None];
        // Waits for a lane's chunk, moves it into its target and shows it to `observe` (while
        // the other lane's chunk is still being copied).
        let mut land = |lane: &mut Lane,
                        chunk: Option<(usize, usize, usize)>,
                        copies: &mut [ToHost<'_>]|
         -> Result<()> {
            if let Some((item, at, n)) = chunk {
                lane.stream
                    .synchronize()
                    .map_err(self.fail("copy to host"))?;
                let landed = &mut copies[item].target[at..at + n];
                landed.copy_from_slice(&lane.staging.bytes_mut()[..n]);
                observe(item, landed);
            }
            Ok(())
        };
        let mut turn = 0;
        for item in 0..copies.len() {
            let (source, len) = (copies[item].source, copies[item].target.len());
            for start in (0..len).step_by(STAGING_BYTES) {
                let chunk = STAGING_BYTES.min(len - start);
                let which = turn % 2;
                turn += 1;
                let lane = &mut lanes[which];
                // The lane's previous chunk (the oldest in flight) lands before its buffer is
                // reused.
                land(lane, pending[which].take(), copies)?;
                let staged = &mut lane.staging.bytes_mut()[..chunk];
                // SAFETY: the caller promises the source range is device memory it may read;
                // the staging buffer is not read until this lane is synchronized.
                unsafe {
                    result::memcpy_dtoh_async(
                        staged,
                        source + start as u64,
                        lane.stream.cu_stream(),
                    )
                }
                .map_err(self.fail("copy to host"))?;
                pending[which] = Some((item, start, chunk));
            }
        }
        // The rest land oldest first: the lane the next chunk would have used.
        for which in [turn % 2, (turn + 1) % 2] {
            land(&mut lanes[which], pending[which].take(), copies)?;
        }
        Ok(())
    }

    unsafe fn copy_within(&self, target: u64, source: u64, len: u64) -> Result<()> {
        let size = self.bind_for(len, "copy on device")?;
        let lanes = self.lanes.lock();
        let stream = &lanes[0].stream;
        // SAFETY: the caller promises both ranges are device memory it may use and that they
        // do not overlap.
        unsafe { result::memcpy_dtod_async(target, source, size, stream.cu_stream()) }
            .map_err(self.fail("copy on device"))?;
        stream.synchronize().map_err(self.fail("copy on device"))
    }

    unsafe fn copy_within_and_read(
        &self,
        target: u64,
        source: u64,
        len: u64,
        reads: &mut [ToHost<'_>],
    ) -> Result<()> {
        let staged_len: usize = reads.iter().map(|r| r.target.len()).sum();
        if staged_len > STAGING_BYTES {
            // More than one staging buffer holds: one after the other.
            // SAFETY: the caller's promises, passed on.
            return unsafe { copy_within_then_read(self, target, source, len, reads) };
        }
        let size = self.bind_for(len, "copy on device")?;
        let mut lanes = self.lanes.lock();
        // The device copy on one stream, the reads on the other: they run at once.
        let [copying, reading] = &mut *lanes;
        // SAFETY: the caller promises both ranges are device memory it may use and that they
        // do not overlap.
        unsafe { result::memcpy_dtod_async(target, source, size, copying.stream.cu_stream()) }
            .map_err(self.fail("copy on device"))?;
        let mut at = 0;
        for read in reads.iter() {
            let n = read.target.len();
            let staged = &mut reading.staging.bytes_mut()[at..at + n];
            // SAFETY: the caller promises the source range is device memory it may read; the
            // staging buffer is not read until its stream is synchronized below.
            unsafe { result::memcpy_dtoh_async(staged, read.source, reading.stream.cu_stream()) }
                .map_err(self.fail("copy to host"))?;
            at += n;
        }
        for lane in [&*copying, &*reading] {
            lane.stream
                .synchronize()
                .map_err(self.fail("copy on device"))?;
        }
        let mut at = 0;
        for read in reads.iter_mut() {
            let n = read.target.len();
            read.target
                .copy_from_slice(&reading.staging.bytes_mut()[at..at + n]);
            at += n;
        }
        Ok(())
    }
}
