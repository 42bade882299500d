//! Owned wrappers over the few libibverbs objects the RDMA transport uses: a device context,
//! a protection domain, a completion queue, reliable-connected queue pairs and memory
//! registrations. Each wrapper frees its object on drop, in an order the fields make
//! explicit (a queue pair before the completion queue and protection domain it was made
//! from; a registration before the memory it covers). This and `memory` are the only modules
//! with `unsafe`.
//!
//! Nothing here is exercised by the test suite on machines without an RDMA device: what can
//! be tested without hardware (the queue-pair attributes, the read plan, the mapping of
//! completions to errors) lives in plain functions in `super` and is tested there.
#![expect(
    unsafe_code,
    reason = "FFI to libibverbs; each call's contract is stated where it is made"
)]

use std::any::Any;
use std::ffi::CStr;
use std::io;
use std::ptr::NonNull;
use std::sync::Arc;

use ibverbs_sys as ffi;

use crate::{Error, Result};

fn verbs_error(action: &'static str) -> Error {
    Error::Rdma {
        action,
        source: io::Error::last_os_error(),
    }
}

fn errno_error(action: &'static str, errno: i32) -> Error {
    Error::Rdma {
        action,
        source: io::Error::from_raw_os_error(errno),
    }
}

/// What the transport needs to know of the port it uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PortInfo {
    /// Port number, from 1.
    pub(crate) port: u8,
    /// Local identifier (InfiniBand).
    pub(crate) lid: u16,
    /// Active MTU, as the verbs enumeration gives it.
    pub(crate) mtu: u8,
    /// Index of the GID used, and the GID (all zero when the table has none).
    pub(crate) gid_index: u8,
    pub(crate) gid: [u8; 16],
    /// Limits of the device for outstanding RDMA READs per queue pair (initiator, responder).
    pub(crate) max_rd_atomic: u8,
    pub(crate) max_dest_rd_atomic: u8,
    /// Most work requests a queue pair may hold.
    pub(crate) max_qp_wr: u32,
}

/// An open device.
pub(crate) struct Context {
    ctx: NonNull<ffi::ibv_context>,
    pub(crate) name: String,
    pub(crate) port: PortInfo,
}

// SAFETY: an `ibv_context` may be used from any thread; libibverbs serialises what needs it.
unsafe impl Send for Context {}
// SAFETY: as above; every verb taking a context is thread-safe per the libibverbs docs.
unsafe impl Sync for Context {}

/// The names of the devices present.
pub(crate) fn device_names() -> Result<Vec<String>> {
    with_devices(|list| {
        Ok(list
            .iter()
            .map(|&dev| {
                // SAFETY: `dev` comes from the live device list; the name it returns is a
                // NUL-terminated string owned by the device, copied out before the list is
                // freed.
                let name = unsafe { ffi::ibv_get_device_name(dev) };
                if name.is_null() {
                    "unnamed".to_owned()
                } else {
                    // SAFETY: non-null and NUL-terminated, as above.
                    unsafe { CStr::from_ptr(name) }
                        .to_string_lossy()
                        .into_owned()
                }
            })
            .collect())
    })
}

/// Runs `f` over the device list, freeing the list after.
fn with_devices<T>(f: impl FnOnce(&[*mut ffi::ibv_device]) -> Result<T>) -> Result<T> {
    let mut n = 0;
    // SAFETY: `n` is a valid out-pointer; a null return is an error with errno set.
    let list = unsafe { ffi::ibv_get_device_list(&raw mut n) };
    if list.is_null() {
        return Err(Error::NoRdmaDevice {
            reason: io::Error::last_os_error().to_string(),
        });
    }
    let len = usize::try_from(n).unwrap_or(0);
    // SAFETY: libibverbs returns an array of `n` device pointers (NULL-terminated after them),
    // valid until `ibv_free_device_list`, which runs below after the last use of the slice.
    let devices = unsafe { std::slice::from_raw_parts(list, len) };
    let result = if devices.is_empty() {
        Err(Error::NoRdmaDevice {
            reason: "the device list is empty".to_owned(),
        })
    } else {
        f(devices)
    };
    // SAFETY: `list` came from `ibv_get_device_list` and is freed once. Opened contexts
    // stay valid after the list is freed (libibverbs reference-counts devices).
    unsafe { ffi::ibv_free_device_list(list) };
    result
}

impl Context {
    /// Opens the device named `device` (the first one when `None`) and reads what the
    /// transport needs of `port` and GID `gid_index`.
    pub(crate) fn open(device: Option<&str>, port: u8, gid_index: u8) -> Result<Arc<Self>> {
        let (ctx, name) = with_devices(|devices| {
            for &dev in devices {
                // SAFETY: as in `device_names`.
                let raw_name = unsafe { ffi::ibv_get_device_name(dev) };
                let name = if raw_name.is_null() {
                    String::new()
                } else {
                    // SAFETY: non-null and NUL-terminated.
                    unsafe { CStr::from_ptr(raw_name) }
                        .to_string_lossy()
                        .into_owned()
                };
                if device.is_some_and(|wanted| wanted != name) {
                    continue;
                }
                // SAFETY: `dev` is from the live list; a null return is an error.
                let ctx = NonNull::new(unsafe { ffi::ibv_open_device(dev) })
                    .ok_or_else(|| verbs_error("open the RDMA device"))?;
                return Ok((ctx, name));
            }
            Err(Error::NoRdmaDevice {
                reason: format!("no device named {:?}", device.unwrap_or_default()),
            })
        })?;
        // From here `Context`'s drop closes the device on every path.
        let mut context = Self {
            ctx,
            name,
            port: PortInfo {
                port,
                lid: 0,
                mtu: 0,
                gid_index,
                gid: [0; 16],
                max_rd_atomic: 0,
                max_dest_rd_atomic: 0,
                max_qp_wr: 0,
            },
        };
        context.port = context.query(port, gid_index)?;
        Ok(Arc::new(context))
    }

    fn query(&self, port: u8, gid_index: u8) -> Result<PortInfo> {
        let mut attr = ffi::ibv_port_attr::default();
        // SAFETY: the exported `ibv_query_port` fills the leading, compatible part of
        // `ibv_port_attr` (`_compat_ibv_port_attr` is its prefix); `attr` is large enough.
        let errno = unsafe { ffi::ibv_query_port(self.ctx.as_ptr(), port, (&raw mut attr).cast()) };
        if errno != 0 {
            return Err(errno_error("query the RDMA port", errno));
        }
        if attr.state != ffi::ibv_port_state::IBV_PORT_ACTIVE {
            return Err(Error::NoRdmaDevice {
                reason: format!("port {port} of {} is not active", self.name),
            });
        }
        let mut gid = ffi::ibv_gid::default();
        // SAFETY: `gid` is a valid out-pointer for one entry.
        let errno =
            unsafe { ffi::ibv_query_gid(self.ctx.as_ptr(), port, gid_index.into(), &raw mut gid) };
        // No GID at that index is fine on InfiniBand (LID routing); RoCE needs one, and the
        // peer's connect then fails with a clear error from the device.
        let gid = if errno == 0 {
            // SAFETY: every bit pattern is a valid `[u8; 16]`.
            unsafe { gid.raw }
        } else {
            [0; 16]
        };
        let mut device = ffi::ibv_device_attr::default();
        // SAFETY: `device` is a valid out-pointer.
        let errno = unsafe { ffi::ibv_query_device(self.ctx.as_ptr(), &raw mut device) };
        if errno != 0 {
            return Err(errno_error("query the RDMA device", errno));
        }
        let clamp = |x: i32| u8::try_from(x.clamp(1, 16)).unwrap_or(1);
        Ok(PortInfo {
            port,
            lid: attr.lid,
            mtu: u8::try_from(attr.active_mtu).unwrap_or(3),
            gid_index,
            gid,
            max_rd_atomic: clamp(device.max_qp_init_rd_atom),
            max_dest_rd_atomic: clamp(device.max_qp_rd_atom),
            max_qp_wr: u32::try_from(device.max_qp_wr).unwrap_or(0),
        })
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: opened in `open`, closed once; every object made from it holds an `Arc` of
        // this context, so none outlives it.
        let errno = unsafe { ffi::ibv_close_device(self.ctx.as_ptr()) };
        if errno != 0 {
            tracing::warn!(errno, "closing an RDMA device failed");
        }
    }
}

/// A protection domain.
pub(crate) struct Pd {
    pd: NonNull<ffi::ibv_pd>,
    pub(crate) context: Arc<Context>,
}

// SAFETY: protection domains are usable from any thread (libibverbs is thread-safe).
unsafe impl Send for Pd {}
// SAFETY: as above.
unsafe impl Sync for Pd {}

impl Pd {
    pub(crate) fn new(context: &Arc<Context>) -> Result<Arc<Self>> {
        // SAFETY: the context is open; a null return is an error.
        let pd = NonNull::new(unsafe { ffi::ibv_alloc_pd(context.ctx.as_ptr()) })
            .ok_or_else(|| verbs_error("allocate a protection domain"))?;
        Ok(Arc::new(Self {
            pd,
            context: Arc::clone(context),
        }))
    }
}

impl Drop for Pd {
    fn drop(&mut self) {
        // SAFETY: allocated in `new`, freed once; queue pairs and registrations hold an `Arc`
        // of it, so none outlives it.
        let errno = unsafe { ffi::ibv_dealloc_pd(self.pd.as_ptr()) };
        if errno != 0 {
            tracing::warn!(errno, "freeing a protection domain failed");
        }
    }
}

/// A registration of memory with the device.
pub(crate) struct Mr {
    mr: NonNull<ffi::ibv_mr>,
    _pd: Arc<Pd>,
    /// Keeps the registered memory mapped until after the registration is gone (fields drop
    /// after `drop` runs).
    _memory: Arc<dyn Any + Send + Sync>,
}

// SAFETY: a registration is an immutable handle once made; deregistration is thread-safe.
unsafe impl Send for Mr {}
// SAFETY: as above; only its keys are read through `&self`.
unsafe impl Sync for Mr {}

impl Mr {
    /// Registers `len` bytes at `addr` with `access` (verbs access flags).
    ///
    /// # Safety
    ///
    /// `addr..addr + len` must stay mapped for as long as `memory` lives; the registration
    /// keeps `memory` alive until it is deregistered. With local write access the device may
    /// write that memory, so the caller must not hold Rust references into it while reads
    /// complete into it.
    pub(crate) unsafe fn register(
        pd: &Arc<Pd>,
        addr: *mut u8,
        len: usize,
        access: u32,
        memory: Arc<dyn Any + Send + Sync>,
    ) -> Result<Self> {
        let access = i32::try_from(access).map_err(|_| Error::Rdma {
            action: "register memory",
            source: io::Error::from(io::ErrorKind::InvalidInput),
        })?;
        // SAFETY: the memory is mapped for as long as `memory` lives (the caller's contract),
        // and `memory` outlives the registration (field order and `Drop`).
        let mr = unsafe { ffi::ibv_reg_mr(pd.pd.as_ptr(), addr.cast(), len, access) };
        let mr = NonNull::new(mr).ok_or_else(|| verbs_error("register memory with the device"))?;
        Ok(Self {
            mr,
            _pd: Arc::clone(pd),
            _memory: memory,
        })
    }

    fn raw(&self) -> &ffi::ibv_mr {
        // SAFETY: the registration is live until drop; libibverbs does not change these
        // fields after `ibv_reg_mr` returns.
        unsafe { self.mr.as_ref() }
    }

    pub(crate) fn lkey(&self) -> u32 {
        self.raw().lkey
    }

    pub(crate) fn rkey(&self) -> u32 {
        self.raw().rkey
    }

    pub(crate) fn addr(&self) -> u64 {
        self.raw().addr as u64
    }
}

impl Drop for Mr {
    fn drop(&mut self) {
        // SAFETY: registered in `register`, deregistered once, before `_memory` is released.
        // After this returns the device neither reads nor writes the memory.
        let errno = unsafe { ffi::ibv_dereg_mr(self.mr.as_ptr()) };
        if errno != 0 {
            tracing::error!(errno, "deregistering memory failed; leaking its mapping");
            // The device may still reach the memory: never unmap it.
            std::mem::forget(Arc::clone(&self._memory));
        }
    }
}

/// A completion queue.
pub(crate) struct Cq {
    cq: NonNull<ffi::ibv_cq>,
    _context: Arc<Context>,
}

// SAFETY: completion queues are usable from any thread; the transport polls each from one
// thread at a time (it sits behind the connection's mutex).
unsafe impl Send for Cq {}
// SAFETY: as above.
unsafe impl Sync for Cq {}

impl Cq {
    pub(crate) fn new(context: &Arc<Context>, entries: u32) -> Result<Arc<Self>> {
        let entries = i32::try_from(entries).unwrap_or(i32::MAX);
        // SAFETY: the context is open; no channel, no context pointer; null is an error.
        let cq = unsafe {
            ffi::ibv_create_cq(
                context.ctx.as_ptr(),
                entries,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                0,
            )
        };
        let cq = NonNull::new(cq).ok_or_else(|| verbs_error("create a completion queue"))?;
        Ok(Arc::new(Self {
            cq,
            _context: Arc::clone(context),
        }))
    }

    /// Moves up to `out.len()` completions into `out`; returns how many.
    pub(crate) fn poll(&self, out: &mut [ffi::ibv_wc]) -> Result<usize> {
        // SAFETY: `cq` is live; its context's ops table is filled by the provider.
        let poll = unsafe { (*(*self.cq.as_ptr()).context).ops.poll_cq }.ok_or(Error::Rdma {
            action: "poll a completion queue",
            source: io::Error::from(io::ErrorKind::Unsupported),
        })?;
        let len = i32::try_from(out.len()).unwrap_or(i32::MAX);
        // SAFETY: `out` has room for `len` completions.
        let n = unsafe { poll(self.cq.as_ptr(), len, out.as_mut_ptr()) };
        usize::try_from(n).map_err(|_| errno_error("poll a completion queue", -n))
    }
}

impl Drop for Cq {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed once, after every queue pair using it (they hold
        // an `Arc` of it).
        let errno = unsafe { ffi::ibv_destroy_cq(self.cq.as_ptr()) };
        if errno != 0 {
            tracing::warn!(errno, "destroying a completion queue failed");
        }
    }
}

/// One RDMA READ: `len` bytes at `remote_addr` (checked by the owner's device against `rkey`)
/// into local registered memory at `local_addr` (`lkey`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ReadWr {
    pub(crate) wr_id: u64,
    pub(crate) local_addr: u64,
    pub(crate) lkey: u32,
    pub(crate) len: u32,
    pub(crate) remote_addr: u64,
    pub(crate) rkey: u32,
}

/// A reliable-connected queue pair.
pub(crate) struct Qp {
    qp: NonNull<ffi::ibv_qp>,
    _cq: Arc<Cq>,
    _pd: Arc<Pd>,
}

// SAFETY: queue pairs are usable from any thread; the transport posts to each from one
// thread at a time.
unsafe impl Send for Qp {}
// SAFETY: as above.
unsafe impl Sync for Qp {}

impl Qp {
    pub(crate) fn new(pd: &Arc<Pd>, cq: &Arc<Cq>, max_send_wr: u32) -> Result<Self> {
        let mut init = ffi::ibv_qp_init_attr {
            send_cq: cq.cq.as_ptr(),
            recv_cq: cq.cq.as_ptr(),
            cap: ffi::ibv_qp_cap {
                max_send_wr,
                max_recv_wr: 1,
                max_send_sge: 1,
                max_recv_sge: 1,
                max_inline_data: 0,
            },
            qp_type: ffi::ibv_qp_type::IBV_QPT_RC,
            sq_sig_all: 0,
            ..Default::default()
        };
        // SAFETY: the protection domain and completion queue are live (and kept alive by the
        // `Arc`s stored below); `init` is a valid attribute block.
        let qp = unsafe { ffi::ibv_create_qp(pd.pd.as_ptr(), &raw mut init) };
        let qp = NonNull::new(qp).ok_or_else(|| verbs_error("create a queue pair"))?;
        Ok(Self {
            qp,
            _cq: Arc::clone(cq),
            _pd: Arc::clone(pd),
        })
    }

    pub(crate) fn num(&self) -> u32 {
        // SAFETY: live queue pair; `qp_num` is set at creation and never changes.
        unsafe { self.qp.as_ref() }.qp_num
    }

    /// Applies one state transition (see `super::transitions`).
    pub(crate) fn modify(&self, mut attr: ffi::ibv_qp_attr, mask: u32) -> Result<()> {
        let mask = i32::try_from(mask).unwrap_or(i32::MAX);
        // SAFETY: live queue pair; `attr` is a valid attribute block for `mask`.
        let errno = unsafe { ffi::ibv_modify_qp(self.qp.as_ptr(), &raw mut attr, mask) };
        if errno != 0 {
            return Err(errno_error("change the state of a queue pair", errno));
        }
        Ok(())
    }

    /// Posts RDMA READs, each signalled.
    ///
    /// # Safety
    ///
    /// Each read's local range must lie inside a live registration (its `lkey`) whose memory
    /// nobody else accesses until the read's completion has been polled or this queue pair
    /// has been dropped (destroying it stops the device from writing).
    pub(crate) unsafe fn post_reads(&self, reads: &[ReadWr]) -> Result<()> {
        if reads.is_empty() {
            return Ok(());
        }
        let mut sges: Vec<ffi::ibv_sge> = reads
            .iter()
            .map(|r| ffi::ibv_sge {
                addr: r.local_addr,
                length: r.len,
                lkey: r.lkey,
            })
            .collect();
        let mut wrs: Vec<ffi::ibv_send_wr> = Vec::with_capacity(reads.len());
        for (r, sge) in reads.iter().zip(sges.iter_mut()) {
            let mut wr = ffi::ibv_send_wr {
                wr_id: r.wr_id,
                sg_list: sge,
                num_sge: 1,
                opcode: ffi::ibv_wr_opcode::IBV_WR_RDMA_READ,
                send_flags: ffi::ibv_send_flags::IBV_SEND_SIGNALED.0,
                ..Default::default()
            };
            wr.wr.rdma = ffi::ibv_send_wr__bindgen_ty_2__bindgen_ty_1 {
                remote_addr: r.remote_addr,
                rkey: r.rkey,
            };
            wrs.push(wr);
        }
        // Link the list; `wrs` no longer grows, so the pointers stay valid.
        let base = wrs.as_mut_ptr();
        for i in 1..wrs.len() {
            // SAFETY: `i` is in bounds of `wrs`, which does not move from here on.
            wrs[i - 1].next = unsafe { base.add(i) };
        }
        let mut bad: *mut ffi::ibv_send_wr = std::ptr::null_mut();
        // SAFETY: live queue pair; its context's ops table is filled by the provider.
        let post = unsafe { (*(*self.qp.as_ptr()).context).ops.post_send }.ok_or(Error::Rdma {
            action: "post RDMA reads",
            source: io::Error::from(io::ErrorKind::Unsupported),
        })?;
        // SAFETY: `wrs` and `sges` are valid, linked, and outlive the call (the provider copies
        // them into the send queue before returning); the local memory contract is the
        // caller's.
        let errno = unsafe { post(self.qp.as_ptr(), base, &raw mut bad) };
        if errno != 0 {
            return Err(errno_error("post RDMA reads", errno));
        }
        Ok(())
    }
}

impl Drop for Qp {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed once. Once it is destroyed the device no longer
        // touches the memory of reads posted to it.
        let errno = unsafe { ffi::ibv_destroy_qp(self.qp.as_ptr()) };
        if errno != 0 {
            tracing::warn!(errno, "destroying a queue pair failed");
        }
    }
}

/// The text libibverbs gives a completion status.
pub(crate) fn status_text(status: u32) -> String {
    // SAFETY: `ibv_wc_status_str` returns a static NUL-terminated string for any value.
    let text = unsafe { ffi::ibv_wc_status_str(status) };
    if text.is_null() {
        return format!("status {status}");
    }
    // SAFETY: non-null, static, NUL-terminated.
    unsafe { CStr::from_ptr(text) }
        .to_string_lossy()
        .into_owned()
}

/// A reader's staging buffer: anonymous memory registered for local writes by the device.
pub(crate) struct Staging {
    mr: Mr,
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the buffer is owned; `ptr` points into the mapping the registration keeps alive.
unsafe impl Send for Staging {}
// SAFETY: only read through `copy_out`, whose callers hold the connection's mutex.
unsafe impl Sync for Staging {}

impl Staging {
    pub(crate) fn new(pd: &Arc<Pd>, len: usize) -> Result<Self> {
        let map = memmap2::MmapOptions::new()
            .len(len)
            .map_anon()
            .map_err(Error::io("map a staging buffer"))?;
        let map = Arc::new(memmap2::MmapRaw::from(map));
        let ptr = map.as_mut_ptr();
        // SAFETY: `ptr..ptr + len` is the mapping, kept alive by the registration (it holds
        // `map`). This process never makes a Rust reference into it; it only copies out of it
        // after the completions of the reads that wrote it.
        let mr = unsafe {
            Mr::register(
                pd,
                ptr,
                len,
                ffi::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE.0,
                map,
            )
        }?;
        Ok(Self { mr, ptr, len })
    }

    pub(crate) fn addr(&self) -> u64 {
        self.mr.addr()
    }

    pub(crate) fn lkey(&self) -> u32 {
        self.mr.lkey()
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Copies `dst.len()` bytes at `offset` of the buffer into `dst`.
    ///
    /// # Panics
    ///
    /// If the range is outside the buffer (a bug of the read plan, never input).
    pub(crate) fn copy_out(&self, offset: usize, dst: &mut [u8]) {
        assert!(
            offset
                .checked_add(dst.len())
                .is_some_and(|end| end <= self.len),
            "staging range out of bounds"
        );
        // SAFETY: in bounds (checked above) of a live mapping; `dst` is a distinct Rust
        // buffer. The reads that wrote this range have completed (the caller polled them), so
        // the device no longer writes it.
        unsafe { std::ptr::copy_nonoverlapping(self.ptr.add(offset), dst.as_mut_ptr(), dst.len()) };
    }
}
