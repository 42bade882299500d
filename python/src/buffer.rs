//! Python buffers without a copy: the buffer protocol (any `bytes`, `bytearray`,
//! `memoryview`, numpy array, `mmap`, ...), and raw addresses checked against the ranges a
//! caller registered (Mooncake's pointer API).
//!
//! The buffer protocol entered the limited API only in CPython 3.11, and this module is
//! built for the stable ABI of 3.9 (one wheel for every CPython from 3.9 on), so PyO3 does
//! not offer it there. Every CPython 3 exports `PyObject_GetBuffer` and `PyBuffer_Release`,
//! and the layout of `Py_buffer` has not changed since 3.3 (3.11 froze it in the stable
//! ABI), so they are declared here.

#![expect(
    unsafe_code,
    reason = "the buffer protocol and registered raw addresses"
)]

use std::ffi::{c_char, c_int, c_void};

use parking_lot::RwLock;
use pyo3::ffi;
use pyo3::prelude::*;

use crate::errors::{Result, StoreError};

/// `Py_buffer`, as CPython 3.3 and later lay it out (`Include/pybuffer.h`).
#[repr(C)]
struct RawView {
    buf: *mut c_void,
    obj: *mut ffi::PyObject,
    len: ffi::Py_ssize_t,
    itemsize: ffi::Py_ssize_t,
    readonly: c_int,
    ndim: c_int,
    format: *mut c_char,
    shape: *mut ffi::Py_ssize_t,
    strides: *mut ffi::Py_ssize_t,
    suboffsets: *mut ffi::Py_ssize_t,
    internal: *mut c_void,
}

/// `PyBUF_SIMPLE`: one contiguous run of bytes, no shape (an exporter that cannot give that,
/// such as a strided view, refuses with `BufferError`).
const PYBUF_SIMPLE: c_int = 0;
/// `PyBUF_WRITABLE`: and writable (a read-only exporter refuses).
const PYBUF_WRITABLE: c_int = 0x0001;

// SAFETY: both functions are part of every CPython 3 (and of the stable ABI since 3.11),
// with these signatures; the extension module resolves them from the interpreter that loads
// it.
unsafe extern "C" {
    fn PyObject_GetBuffer(obj: *mut ffi::PyObject, view: *mut RawView, flags: c_int) -> c_int;
    fn PyBuffer_Release(view: *mut RawView);
}

/// A buffer exported by a Python object: its bytes stay where they are, and the object
/// cannot resize or free them, until this is dropped. Not `Send`: it is made and dropped
/// with the interpreter attached (releasing it calls into the interpreter).
pub(crate) struct View {
    // Boxed: the exporter may keep pointers into the struct until it is released.
    raw: Box<RawView>,
}

impl View {
    /// `obj`'s bytes, read-only.
    pub(crate) fn read(obj: &Bound<'_, PyAny>) -> PyResult<Self> {
        Self::get(obj, PYBUF_SIMPLE)
    }

    /// `obj`'s bytes, to write into.
    pub(crate) fn write(obj: &Bound<'_, PyAny>) -> PyResult<Self> {
        Self::get(obj, PYBUF_WRITABLE)
    }

    fn get(obj: &Bound<'_, PyAny>, flags: c_int) -> PyResult<Self> {
        let mut raw = Box::new(RawView {
            buf: std::ptr::null_mut(),
            obj: std::ptr::null_mut(),
            len: 0,
            itemsize: 0,
            readonly: 0,
            ndim: 0,
            format: std::ptr::null_mut(),
            shape: std::ptr::null_mut(),
            strides: std::ptr::null_mut(),
            suboffsets: std::ptr::null_mut(),
            internal: std::ptr::null_mut(),
        });
        // SAFETY: `obj` is a live object (borrowed with the interpreter attached, which
        // `Bound` proves), `raw` a writable `Py_buffer` that outlives the export (it is
        // released in `drop`, only if this call succeeded).
        let status = unsafe { PyObject_GetBuffer(obj.as_ptr(), &raw mut *raw, flags) };
        if status != 0 {
            return Err(PyErr::fetch(obj.py()));
        }
        let view = Self { raw };
        if view.raw.len < 0 || (view.raw.buf.is_null() && view.raw.len > 0) {
            return Err(StoreError::invalid("the object exported an invalid buffer").into());
        }
        Ok(view)
    }

    /// The span: address and length, to turn back into a slice with the interpreter
    /// detached (see [`Span`]).
    pub(crate) fn span(&self) -> Span {
        Span {
            addr: self.raw.buf as usize,
            // Non-negative: checked when the view was taken.
            len: usize::try_from(self.raw.len).unwrap_or(0),
        }
    }
}

impl Drop for View {
    fn drop(&mut self) {
        // SAFETY: the view was filled by a successful `PyObject_GetBuffer` and is released
        // once. A `View` is not `Send`, and is only made with the interpreter attached, and
        // so dropped on that thread; PyO3 reattaches before any code after a `detach` runs,
        // unwinding included.
        unsafe { PyBuffer_Release(&raw mut *self.raw) }
    }
}

/// Bytes at an address that something keeps valid for as long as the span is used: a
/// [`View`] that is alive, or a range registered with [`Registry`] whose read lock is held.
/// Plain numbers, so that it can cross into code running with the interpreter detached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Span {
    pub(crate) addr: usize,
    pub(crate) len: usize,
}

impl Span {
    fn end(self) -> Option<usize> {
        self.addr.checked_add(self.len)
    }

    /// The bytes.
    ///
    /// # Safety
    ///
    /// The span's memory is valid for reads for the lifetime `'a` (a live [`View`] or a held
    /// registration), and nothing writes it meanwhile.
    pub(crate) unsafe fn bytes<'a>(self) -> &'a [u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: the caller's contract; `len > 0` so the address is that of real memory.
        unsafe { std::slice::from_raw_parts(self.addr as *const u8, self.len) }
    }

    /// The bytes, to write.
    ///
    /// # Safety
    ///
    /// As [`bytes`](Self::bytes), and the memory is writable, and no other slice of it is
    /// alive (check a batch with [`disjoint`]).
    pub(crate) unsafe fn bytes_mut<'a>(self) -> &'a mut [u8] {
        if self.len == 0 {
            return &mut [];
        }
        // SAFETY: the caller's contract.
        unsafe { std::slice::from_raw_parts_mut(self.addr as *mut u8, self.len) }
    }
}

/// Whether no two of `spans` overlap (empty spans overlap nothing): what writing into all of
/// them at once needs.
pub(crate) fn disjoint(spans: &[Span]) -> bool {
    let mut sorted: Vec<Span> = spans.iter().copied().filter(|s| s.len > 0).collect();
    sorted.sort_unstable_by_key(|s| s.addr);
    sorted
        .windows(2)
        .all(|pair| pair[0].end().is_some_and(|end| end <= pair[1].addr))
}

/// The memory ranges a caller registered (Mooncake's `register_buffer`): every raw address
/// the pointer API is handed must lie in one of them, so that a wrong address is an error
/// code rather than a crash. A call that reads or writes registered memory holds the read
/// lock throughout, so `unregister` waits for it.
#[derive(Debug, Default)]
pub(crate) struct Registry {
    ranges: RwLock<Vec<Span>>,
}

impl Registry {
    /// Records `[addr, addr + len)`. It is not touched: the caller says it is memory it owns
    /// and keeps mapped until it unregisters it.
    pub(crate) fn register(&self, addr: usize, len: usize) -> Result<()> {
        let span = Span { addr, len };
        if addr == 0 || len == 0 || span.end().is_none() {
            return Err(StoreError::invalid(format!(
                "cannot register {len} bytes at {addr:#x}"
            )));
        }
        let mut ranges = self.ranges.write();
        if !ranges.contains(&span) {
            ranges.push(span);
        }
        Ok(())
    }

    /// Forgets the range registered at `addr`, once no call is using it.
    pub(crate) fn unregister(&self, addr: usize) -> Result<()> {
        let mut ranges = self.ranges.write();
        let before = ranges.len();
        ranges.retain(|span| span.addr != addr);
        if ranges.len() == before {
            return Err(StoreError::invalid(format!(
                "no buffer is registered at {addr:#x}"
            )));
        }
        Ok(())
    }

    /// Runs `f` with the registrations held (they cannot go away meanwhile) and a check that
    /// says whether a span lies inside one of them.
    pub(crate) fn with<T>(&self, f: impl FnOnce(&dyn Fn(Span) -> bool) -> T) -> T {
        let ranges = self.ranges.read();
        let inside = |span: Span| {
            let Some(end) = span.end() else {
                return false;
            };
            span.len == 0
                || ranges
                    .iter()
                    .any(|r| r.addr <= span.addr && r.end().is_some_and(|r_end| end <= r_end))
        };
        f(&inside)
    }
}
