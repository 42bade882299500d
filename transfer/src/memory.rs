//! Registered memory and the few operations on raw pointers the transports need. This is the
//! only module of the crate with `unsafe`.
//!
//! Memory registered for one-sided reads can be written by its owner while a peer reads it:
//! that is the nature of one-sided access, and why the layer above verifies every block it
//! reads. So this crate never makes a Rust reference (`&[u8]`) to registered memory. The tcp
//! server hands raw pointers to the kernel (`send(2)`), which copies from them; the
//! shared-memory reader copies with `ptr::copy_nonoverlapping` from a read-only mapping of
//! another process's memory. A concurrent writer can make the copied bytes torn, never make
//! this process touch memory that is not mapped: every access is bounds-checked against the
//! region, and the region's memory is kept alive (by `Arc`, or by the reader's own mapping)
//! for as long as any access to it is in flight.
#![expect(
    unsafe_code,
    reason = "raw-pointer access to registered memory; the invariants are in the module docs"
)]

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::sync::atomic::{AtomicU64, Ordering};

use memmap2::{MmapOptions, MmapRaw};
use rustix::fs::{MemfdFlags, memfd_create};

use crate::{Error, Result};

/// Memory a process registers so that peers can read it one-sidedly.
///
/// # Safety
///
/// An implementation promises that `as_ptr()..as_ptr() + len()` stays mapped and readable,
/// at the same address, for as long as the value lives; and that `memfd()`, if it returns a
/// file, maps (at the given page-aligned offset) to the same bytes.
pub unsafe trait MemorySource: Send + Sync + 'static {
    /// Start of the memory.
    fn as_ptr(&self) -> *const u8;
    /// Length in bytes.
    fn len(&self) -> usize;
    /// Whether the memory is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The memfd holding the memory and the offset of `as_ptr()` in it, for local peers that
    /// map it (the shared-memory transport). `None` when the memory is not shareable.
    fn memfd(&self) -> Option<(BorrowedFd<'_>, u64)> {
        None
    }
}

/// A memfd-backed region owned by this crate: registered memory for anyone who does not
/// already have some (tests, benchmarks, staging buffers).
#[derive(Debug)]
pub struct MemfdRegion {
    map: MmapRaw,
    file: File,
}

impl MemfdRegion {
    /// A zero-filled region of `len` bytes (at least one page is mapped).
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the memfd cannot be created, sized or mapped.
    pub fn new(len: usize) -> Result<Self> {
        let fd = memfd_create("mooncake-transfer", MemfdFlags::CLOEXEC).map_err(|e| Error::Io {
            action: "create a memfd",
            source: e.into(),
        })?;
        let file = File::from(fd);
        file.set_len(len.max(1) as u64)
            .map_err(Error::io("size a memfd"))?;
        let map = MmapOptions::new()
            .len(len.max(1))
            .map_raw(&file)
            .map_err(Error::io("map a memfd"))?;
        Ok(Self { map, file })
    }

    /// Writes `bytes` at `offset`. The owner's side of one-sided access: peers may be reading
    /// concurrently and can see a mix of old and new bytes.
    ///
    /// # Panics
    ///
    /// If the write does not fit in the region.
    pub fn write(&self, offset: usize, bytes: &[u8]) {
        let end = offset
            .checked_add(bytes.len())
            .expect("write end overflows");
        assert!(end <= self.map.len(), "write beyond the region");
        // SAFETY: in bounds of the live mapping (checked above). No Rust reference to the
        // mapping exists anywhere (module docs), so writing through the raw pointer aliases
        // nothing; concurrent readers copy raw bytes and tolerate tearing.
        unsafe {
            std::ptr::copy_nonoverlapping(
                bytes.as_ptr(),
                self.map.as_mut_ptr().add(offset),
                bytes.len(),
            );
        }
    }
}

// SAFETY: the mapping lives as long as the `MemfdRegion` and never moves; the memfd maps to
// the same bytes at offset 0.
unsafe impl MemorySource for MemfdRegion {
    fn as_ptr(&self) -> *const u8 {
        self.map.as_ptr()
    }
    fn len(&self) -> usize {
        self.map.len()
    }
    fn memfd(&self) -> Option<(BorrowedFd<'_>, u64)> {
        Some((self.file.as_fd(), 0))
    }
}

/// Copies `dst.len()` bytes starting `offset` bytes into `memory` into `dst`.
///
/// # Panics
///
/// If the range is outside `memory` (callers check bounds first and report an error).
pub(crate) fn copy_out(memory: &dyn MemorySource, offset: usize, dst: &mut [u8]) {
    let end = offset.checked_add(dst.len()).expect("copy end overflows");
    assert!(end <= memory.len(), "copy beyond the region");
    // SAFETY: in bounds (checked above) of memory that stays mapped while `memory` is
    // borrowed (the `MemorySource` contract). `dst` is a distinct, exclusively borrowed
    // buffer, so the ranges do not overlap. The source may be written concurrently by its
    // owner; the copy then holds torn bytes, which the caller's verification rejects.
    unsafe { copy_raw(memory.as_ptr().add(offset), dst) }
}

/// Copies of at least this many bytes use streaming (non-temporal) stores where the CPU has
/// them. A read that large lands in memory its caller will not read back at once (a model's
/// KV arena, a staging buffer on its way to a device), and streaming stores skip loading each
/// destination line before overwriting it: a normal copy into memory that is not in cache
/// moves three bytes for every byte copied, a streaming one two. On the 2-core development VM,
/// 57 one-MiB copies into a 256 MiB destination ran at 6.7 GB/s with `memcpy` and 8.4 to
/// 10 GB/s streamed. Below the threshold a normal copy leaves the bytes in cache for a check
/// that follows (the payload CRC reads each piece right after copying it).
const STREAM_MIN_BYTES: usize = 256 << 10;

/// Copies `dst.len()` bytes from `src` into `dst`, streaming when the copy is large.
///
/// # Safety
///
/// `src` must be valid for reads of `dst.len()` bytes, and not overlap `dst`.
unsafe fn copy_raw(src: *const u8, dst: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if dst.len() >= STREAM_MIN_BYTES {
        // SAFETY: the caller's contract, passed on.
        unsafe { stream_copy(src, dst) };
        return;
    }
    // SAFETY: the caller's contract: `src` readable for `dst.len()` bytes, no overlap.
    unsafe { std::ptr::copy_nonoverlapping(src, dst.as_mut_ptr(), dst.len()) }
}

/// [`copy_raw`] with SSE2 streaming stores (part of every x86_64 CPU): a normal copy up to the
/// first 16-byte-aligned destination address, 64 bytes per step in between, a normal copy of
/// the tail, and a store fence so that the streamed bytes are ordered before anything this
/// thread writes next (another thread, or a device, may consume them).
///
/// # Safety
///
/// As [`copy_raw`].
#[cfg(target_arch = "x86_64")]
unsafe fn stream_copy(src: *const u8, dst: &mut [u8]) {
    use std::arch::x86_64::{__m128i, _mm_loadu_si128, _mm_sfence, _mm_stream_si128};
    let len = dst.len();
    let out = dst.as_mut_ptr();
    let head = out.align_offset(16).min(len);
    // SAFETY: `head <= len`: inside both ranges (the caller's contract), which do not overlap.
    unsafe { std::ptr::copy_nonoverlapping(src, out, head) };
    let mut at = head;
    while at + 64 <= len {
        // SAFETY: `at + 64 <= len`, so the four 16-byte loads read inside `src`'s `len`
        // readable bytes (unaligned loads: `src` has any alignment) and the four streaming
        // stores write inside `dst`; `out + at` is 16-byte aligned (`head` aligned it, and
        // `at` advances by 64), as `_mm_stream_si128` requires.
        unsafe {
            let from = src.add(at).cast::<__m128i>();
            let to = out.add(at).cast::<__m128i>();
            let a = _mm_loadu_si128(from);
            let b = _mm_loadu_si128(from.add(1));
            let c = _mm_loadu_si128(from.add(2));
            let d = _mm_loadu_si128(from.add(3));
            _mm_stream_si128(to, a);
            _mm_stream_si128(to.add(1), b);
            _mm_stream_si128(to.add(2), c);
            _mm_stream_si128(to.add(3), d);
        }
        at += 64;
    }
    // SAFETY: the tail, `at..len`, is inside both ranges.
    unsafe { std::ptr::copy_nonoverlapping(src.add(at), out.add(at), len - at) };
    // SAFETY: a fence has no memory operands; SSE, which it needs, is part of x86_64.
    unsafe { _mm_sfence() };
}

/// Asks the CPU to start loading the cache lines of `memory[offset..offset + len]` (at most
/// the first `PREFETCH_MAX_LINES`), so that a copy that follows, or one that waits on a
/// check of other bytes first, finds them on the way. Does nothing where the architecture
/// offers no prefetch, or when the range is outside `memory`.
pub(crate) fn prefetch(memory: &dyn MemorySource, offset: usize, len: usize) {
    #[cfg(target_arch = "x86_64")]
    {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        let Some(end) = offset.checked_add(len).filter(|&end| end <= memory.len()) else {
            return;
        };
        let base = memory.as_ptr();
        for line in (offset..end).step_by(64).take(PREFETCH_MAX_LINES) {
            // SAFETY: `line` is inside the region (checked above), so the pointer arithmetic
            // stays within one mapping. A prefetch is only a hint: it never faults and reads
            // nothing into Rust's view of memory. SSE, which it needs, is part of x86_64.
            unsafe { _mm_prefetch::<_MM_HINT_T0>(base.add(line).cast()) };
        }
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = (memory, offset, len);
}

/// Lines [`prefetch`] asks for at most (1 KiB): a block's header and a long key. Beyond that a
/// streaming copy keeps the hardware prefetcher busy on its own.
const PREFETCH_MAX_LINES: usize = 16;

/// One send, without waiting, of up to `len` bytes of `memory` starting at `offset`: how many
/// the socket took (an error of kind `WouldBlock` when it takes none now).
///
/// # Errors
///
/// The socket's, or `InvalidInput` if the range is outside `memory` (the server checks
/// bounds first and refuses the read, so this is a bug, reported rather than sent).
pub(crate) fn send_some_from(
    socket: BorrowedFd<'_>,
    memory: &dyn MemorySource,
    offset: usize,
    len: usize,
) -> std::io::Result<usize> {
    if offset.checked_add(len).is_none_or(|end| end > memory.len()) {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "send beyond the region",
        ));
    }
    loop {
        // SAFETY: the pointer and length describe bytes inside the region (checked above),
        // which stays mapped while `memory` is borrowed. The kernel only reads them; no Rust
        // reference to them is made.
        let n = unsafe {
            libc::send(
                socket.as_raw_fd(),
                memory.as_ptr().add(offset).cast(),
                len,
                libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
            )
        };
        if n >= 0 {
            return Ok(n as usize);
        }
        let error = std::io::Error::last_os_error();
        if error.kind() != std::io::ErrorKind::Interrupted {
            return Err(error);
        }
    }
}

/// A table of one `u64` per region slot, in a memfd: the owner writes each slot's current
/// epoch (0 when the slot is free); shared-memory readers map it read-only and check the epoch
/// of a region around every copy, which is how an unregistration reaches them.
#[derive(Debug)]
pub(crate) struct ControlTable {
    map: MmapRaw,
    file: File,
    slots: usize,
}

impl ControlTable {
    pub(crate) fn new(slots: usize) -> Result<Self> {
        let region = MemfdRegion::new(slots * 8)?;
        Ok(Self {
            map: region.map,
            file: region.file,
            slots,
        })
    }

    /// Maps a control table received from an owner, read-only.
    pub(crate) fn map_remote(file: File, slots: usize) -> Result<Self> {
        let len = file
            .metadata()
            .map_err(Error::io("stat the control table"))?
            .len();
        if len < (slots * 8) as u64 {
            return Err(Error::Protocol(crate::wire::FrameError::BadField {
                field: "control_len",
                value: len,
            }));
        }
        let map = MmapOptions::new()
            .len(slots * 8)
            .map_raw_read_only(&file)
            .map_err(Error::io("map the control table"))?;
        Ok(Self { map, file, slots })
    }

    pub(crate) fn memfd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }

    fn slot(&self, slot: usize) -> &AtomicU64 {
        assert!(slot < self.slots, "control slot out of range");
        // SAFETY: the mapping is at least `slots * 8` bytes, page-aligned (so every 8-byte slot
        // is aligned for AtomicU64), and lives as long as `self`. All access to these bytes,
        // here and in every process mapping them, is through atomics.
        unsafe { &*self.map.as_ptr().cast::<AtomicU64>().add(slot) }
    }

    pub(crate) fn load(&self, slot: usize) -> u64 {
        self.slot(slot).load(Ordering::Acquire)
    }

    /// Owner only (the reader's mapping is read-only and would fault).
    pub(crate) fn store(&self, slot: usize, epoch: u64) {
        self.slot(slot).store(epoch, Ordering::Release);
    }
}

/// A region of another process, mapped read-only.
#[derive(Debug)]
pub(crate) struct RemoteMapping {
    map: MmapRaw,
}

impl RemoteMapping {
    pub(crate) fn map(file: &File, offset: u64, len: u64) -> Result<Self> {
        let len = usize::try_from(len).map_err(|_| {
            Error::Protocol(crate::wire::FrameError::BadField {
                field: "len",
                value: len,
            })
        })?;
        let map = MmapOptions::new()
            .offset(offset)
            .len(len.max(1))
            .map_raw_read_only(file)
            .map_err(Error::io("map a shared region"))?;
        Ok(Self { map })
    }
}

// SAFETY: a read-only mapping that lives, at the same address, as long as the value. Other
// processes may write the bytes; copies out of it tolerate that (module docs).
unsafe impl MemorySource for RemoteMapping {
    fn as_ptr(&self) -> *const u8 {
        self.map.as_ptr()
    }
    fn len(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every byte arrives, at every alignment of the destination and the source, on both
    /// sides of the streaming threshold and with tails that are not a multiple of 64.
    #[test]
    fn copies_are_exact_at_every_size_and_alignment() {
        let source: Vec<u8> = (0..STREAM_MIN_BYTES * 2 + 300)
            .map(|i| (i * 7 + i / 251) as u8)
            .collect();
        let mut target = vec![0u8; source.len() + 64];
        for len in [
            0,
            1,
            63,
            4096,
            STREAM_MIN_BYTES - 1,
            STREAM_MIN_BYTES,
            STREAM_MIN_BYTES * 2 + 77,
        ] {
            for (from, to) in [(0, 0), (3, 0), (0, 5), (17, 9), (1, 15)] {
                target.fill(0xEE);
                let src = &source[from..from + len];
                // SAFETY: `src` is a live slice of `len` bytes, distinct from `target`.
                unsafe { copy_raw(src.as_ptr(), &mut target[to..to + len]) };
                assert_eq!(
                    &target[to..to + len],
                    src,
                    "len {len}, from {from}, to {to}"
                );
                assert!(
                    target[..to].iter().all(|&b| b == 0xEE),
                    "wrote before the range"
                );
                assert!(
                    target[to + len..].iter().all(|&b| b == 0xEE),
                    "wrote past the range"
                );
            }
        }
    }
}
