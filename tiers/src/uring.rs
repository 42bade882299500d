//! io_uring submission of batches of positioned reads and writes, with a bounded number in
//! flight.
//!
//! The kernel reads and writes the caller's buffers asynchronously, so soundness rests on one
//! rule: [`Uring::run`] does not return while any operation it submitted is in flight. Buffers
//! are borrowed for the duration of the call, which therefore covers every kernel access. If
//! waiting for completions fails for a reason other than an interrupted system call, the
//! process aborts: returning would let the kernel write into memory the caller may free.
//! Entries are pushed only when the queue is known to have room and are submitted at once,
//! so no entry is ever left behind in the queue for a later call to submit.
#![expect(
    unsafe_code,
    reason = "io_uring entries carry raw buffer pointers; the invariants are in the module docs"
)]

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};

use io_uring::{IoUring, opcode, types};
use parking_lot::Mutex;

/// One positioned transfer between a buffer and the file.
#[derive(Debug)]
pub(crate) enum IoOp<'a> {
    /// Fill `buf` from the file at `offset`.
    Read {
        /// Byte offset in the file.
        offset: u64,
        /// Where the bytes go.
        buf: &'a mut [u8],
    },
    /// Write `buf` to the file at `offset`.
    Write {
        /// Byte offset in the file.
        offset: u64,
        /// The bytes.
        buf: &'a [u8],
    },
}

impl IoOp<'_> {
    fn len(&self) -> usize {
        match self {
            IoOp::Read { buf, .. } => buf.len(),
            IoOp::Write { buf, .. } => buf.len(),
        }
    }
}

/// A few rings, each used by one thread at a time.
pub(crate) struct Uring {
    rings: Box<[Mutex<IoUring>]>,
    depth: usize,
}

impl Uring {
    /// Sets up `rings` rings of `depth` entries.
    pub(crate) fn new(rings: usize, depth: u32) -> io::Result<Self> {
        let rings = (0..rings.max(1))
            .map(|_| IoUring::new(depth).map(Mutex::new))
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Self {
            rings: rings.into_boxed_slice(),
            depth: depth as usize,
        })
    }

    /// Runs every operation with up to the ring depth in flight at once, and returns one result
    /// per operation, in order. A transfer shorter than its buffer is an error
    /// (`UnexpectedEof`); the tier preallocates its file, so that means a broken device.
    pub(crate) fn run(&self, fd: BorrowedFd<'_>, ops: &mut [IoOp<'_>]) -> Vec<io::Result<()>> {
        let mut ring = self.lock_any();
        let mut results: Vec<Option<io::Result<()>>> = (0..ops.len()).map(|_| None).collect();
        let fd = types::Fd(fd.as_raw_fd());
        let mut next = 0;
        let mut in_flight = 0;
        while next < ops.len() || in_flight > 0 {
            // Push as many as the depth allows, then submit them all before anything else.
            let mut pushed = 0;
            while next < ops.len() && in_flight + pushed < self.depth {
                let entry = match &mut ops[next] {
                    IoOp::Read { offset, buf } => {
                        opcode::Read::new(fd, buf.as_mut_ptr(), buf_len(buf.len()))
                            .offset(*offset)
                            .build()
                    }
                    IoOp::Write { offset, buf } => {
                        opcode::Write::new(fd, buf.as_ptr(), buf_len(buf.len()))
                            .offset(*offset)
                            .build()
                    }
                }
                .user_data(next as u64);
                // SAFETY: the entry points into `ops[next]`'s buffer, which `ops` borrows for
                // the whole call, and this function does not return until the operation has
                // completed (module docs). The queue has room: at most `depth` entries are
                // outstanding and the ring has `depth` slots.
                unsafe {
                    ring.submission()
                        .push(&entry)
                        .expect("submission queue has room for `depth` entries");
                }
                next += 1;
                pushed += 1;
            }
            in_flight += pushed;
            // Wait for at least one completion (and submit what was pushed).
            loop {
                match ring.submit_and_wait(1) {
                    Ok(_) => break,
                    Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                    Err(e) if e.raw_os_error() == Some(rustix::io::Errno::BUSY.raw_os_error()) => {
                        // The completion queue is full: drain it below, then retry.
                        break;
                    }
                    Err(e) => {
                        // Operations may be in flight on buffers we would hand back: the only
                        // sound way out is not to return.
                        tracing::error!(error = %e, in_flight, "io_uring wait failed; aborting");
                        std::process::abort();
                    }
                }
            }
            for cqe in ring.completion() {
                let index = cqe.user_data() as usize;
                let expected = ops[index].len();
                let result = cqe.result();
                results[index] = Some(if result < 0 {
                    Err(io::Error::from_raw_os_error(-result))
                } else if result as usize != expected {
                    Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("short transfer: {result} of {expected} bytes"),
                    ))
                } else {
                    Ok(())
                });
                in_flight -= 1;
            }
        }
        results
            .into_iter()
            .map(|r| r.expect("every operation completed"))
            .collect()
    }

    fn lock_any(&self) -> parking_lot::MutexGuard<'_, IoUring> {
        for ring in self.rings.iter() {
            if let Some(guard) = ring.try_lock() {
                return guard;
            }
        }
        self.rings[0].lock()
    }
}

impl std::fmt::Debug for Uring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Uring")
            .field("rings", &self.rings.len())
            .field("depth", &self.depth)
            .finish()
    }
}

fn buf_len(len: usize) -> u32 {
    u32::try_from(len).expect("one transfer is at most a block, far below 4 GiB")
}
