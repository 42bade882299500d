//! The shared-memory transport, for a reader on the owner's host. The owner serves a Unix
//! socket: to each reader it first hands its control table (the epoch of every region slot),
//! then, on request and after checking the remote key, a region's memfd. The reader maps the
//! region read-only once; a read is then a bounds check, an epoch check, a `memcpy`, and the
//! epoch check again. Unregistering a region changes its epoch, so later reads fail with
//! [`Error::UnknownRegion`]; the reader's mapping keeps the memory alive, so no read ever
//! touches unmapped memory. That mapping would also keep a dead owner's memory readable: the
//! reader peeks at the owner's socket every 10 ms and refuses reads once it has closed.

use std::collections::HashMap;
use std::fs::File;
use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use parking_lot::Mutex;
use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

use crate::conns::{AtLimit, OpenConnections};
use crate::memory::{ControlTable, MemorySource, RemoteMapping, copy_out, prefetch};
use crate::registry::{MAX_REGIONS, Registry, split};
use crate::wire::{
    FrameError, MAP_REQUEST_BYTES, MAP_RESPONSE_BYTES, MapRequest, MapResponse, Status,
};
use crate::{Error, MAX_READ_BYTES, ReadOp, RemoteSlice, Result, Transport};

/// The owner's Unix-socket listener. Dropping it stops accepting, closes every connection,
/// joins its threads and removes the socket file.
pub struct ShmServer {
    path: PathBuf,
    /// The listening socket, to wake the acceptor at drop even when the socket file is gone
    /// (a connection to the path would then fail and leave it waiting for good).
    listener: OwnedFd,
    stop: Arc<AtomicBool>,
    connections: Arc<OpenConnections>,
    acceptor: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for ShmServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShmServer")
            .field("path", &self.path)
            .finish()
    }
}

impl ShmServer {
    /// Listens on a Unix socket at `path` (which must not exist) and serves `registry`'s
    /// memfd-backed regions.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the socket cannot be bound.
    pub fn bind(path: impl AsRef<Path>, registry: Arc<Registry>) -> Result<Self> {
        let path = path.as_ref().to_owned();
        let listener =
            UnixListener::bind(&path).map_err(Error::io("bind the shared-memory socket"))?;
        // Only the owner's user may connect (connecting needs write permission), whatever
        // the umask: this socket hands out the region's memory with no token asked, and its
        // connections are not closed when quiet (readers watch them to see the owner die).
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
            .map_err(Error::io("restrict the shared-memory socket to its owner"))?;
        let stop = Arc::new(AtomicBool::new(false));
        let connections = Arc::new(OpenConnections::default());
        let waker = OwnedFd::from(
            listener
                .try_clone()
                .map_err(Error::io("clone the shared-memory socket"))?,
        );
        let acceptor = {
            let (stop, connections) = (Arc::clone(&stop), Arc::clone(&connections));
            std::thread::Builder::new()
                .name("mooncake-shm-accept".into())
                .spawn(move || {
                    for stream in listener.incoming() {
                        if stop.load(Ordering::Acquire) {
                            break;
                        }
                        let Ok(stream) = stream else {
                            // Out of descriptors, say: let some connections end first.
                            std::thread::sleep(std::time::Duration::from_millis(10));
                            continue;
                        };
                        let admitted = stream
                            .try_clone()
                            .ok()
                            .and_then(|c| connections.admit(OwnedFd::from(c), AtLimit::Refuse));
                        let Some((id, _)) = admitted else {
                            tracing::warn!("too many shared-memory connections; refusing one");
                            continue;
                        };
                        let registry = Arc::clone(&registry);
                        let spawned =
                            connections.spawn(id, "mooncake-shm-serve".into(), move || {
                                if let Err(error) = serve(stream, &registry) {
                                    tracing::debug!(%error, "shared-memory connection closed");
                                }
                            });
                        if let Err(error) = spawned {
                            tracing::warn!(%error, "cannot start a thread for a shared-memory connection; refusing it");
                        }
                    }
                })
                .map_err(Error::io("start the shared-memory acceptor"))?
        };
        Ok(Self {
            path,
            listener: waker,
            stop,
            connections,
            acceptor: Some(acceptor),
        })
    }

    /// The socket's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for ShmServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        // Shutting a listening socket down ends the accept it waits in (Linux).
        let _ = rustix::net::shutdown(&self.listener, rustix::net::Shutdown::Both);
        let _ = UnixStream::connect(&self.path);
        if let Some(handle) = self.acceptor.take() {
            let _ = handle.join();
        }
        // Nothing admits connections now: close them and wait for their threads, which hold
        // the registry (and so its regions' memory).
        self.connections.close_all_and_join();
        let _ = std::fs::remove_file(&self.path);
    }
}

fn send_with_fd(stream: &UnixStream, frame: &[u8], fd: Option<BorrowedFd<'_>>) -> Result<()> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    let fds;
    if let Some(fd) = fd {
        fds = [fd];
        control.push(SendAncillaryMessage::ScmRights(&fds));
    }
    let sent = rustix::net::sendmsg(
        stream,
        &[IoSlice::new(frame)],
        &mut control,
        SendFlags::empty(),
    )
    .map_err(|e| Error::Io {
        action: "send a frame",
        source: e.into(),
    })?;
    // The descriptor went with the first byte; the rest is plain data.
    (&*stream)
        .write_all(&frame[sent..])
        .map_err(Error::io("send a frame"))
}

fn recv_with_fd<const N: usize>(stream: &UnixStream) -> Result<([u8; N], Option<OwnedFd>)> {
    let mut frame = [0u8; N];
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let received = rustix::net::recvmsg(
        stream,
        &mut [IoSliceMut::new(&mut frame)],
        &mut control,
        RecvFlags::CMSG_CLOEXEC,
    )
    .map_err(|e| Error::Io {
        action: "receive a frame",
        source: e.into(),
    })?;
    if received.bytes == 0 {
        return Err(Error::Io {
            action: "receive a frame",
            source: std::io::ErrorKind::UnexpectedEof.into(),
        });
    }
    let mut fd = None;
    for message in control.drain() {
        if let RecvAncillaryMessage::ScmRights(fds) = message {
            // Keep the first; any others close when dropped.
            for received_fd in fds {
                fd.get_or_insert(received_fd);
            }
        }
    }
    (&*stream)
        .read_exact(&mut frame[received.bytes..])
        .map_err(Error::io("receive a frame"))?;
    Ok((frame, fd))
}

fn serve(stream: UnixStream, registry: &Registry) -> Result<()> {
    // Hello: the control table, so the reader can see unregistrations.
    let hello = MapResponse {
        status: Status::Ok,
        len: (MAX_REGIONS * 8) as u64,
        memfd_offset: 0,
    }
    .encode();
    let control = read_only(registry.control.memfd())?;
    send_with_fd(&stream, &hello, Some(control.as_fd()))?;
    loop {
        let mut frame = [0u8; MAP_REQUEST_BYTES];
        match (&stream).read_exact(&mut frame) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => {
                return Err(Error::Io {
                    action: "read a map request",
                    source: e,
                });
            }
        }
        let request = MapRequest::decode(&frame)?;
        match registry.lookup(request.region_id, request.remote_key) {
            Ok(region) => match region.memory.memfd() {
                Some((fd, offset)) => {
                    let response = MapResponse {
                        status: Status::Ok,
                        len: region.handle.len,
                        memfd_offset: offset,
                    };
                    let fd = read_only(fd)?;
                    send_with_fd(&stream, &response.encode(), Some(fd.as_fd()))?;
                }
                None => send_with_fd(&stream, &refusal(Status::NotShareable), None)?,
            },
            Err(Error::BadRemoteKey { .. }) => {
                send_with_fd(&stream, &refusal(Status::BadRemoteKey), None)?
            }
            Err(_) => send_with_fd(&stream, &refusal(Status::UnknownRegion), None)?,
        }
    }
}

/// A new read-only descriptor of the memfd behind `fd` (opened again through `/proc`): what a
/// reader is handed, so that it can map the memory for reading and not for writing (the
/// kernel refuses a shared writable mapping of a descriptor opened read-only), nor write or
/// resize it.
fn read_only(fd: BorrowedFd<'_>) -> Result<OwnedFd> {
    rustix::fs::open(
        format!("/proc/self/fd/{}", fd.as_raw_fd()),
        rustix::fs::OFlags::RDONLY | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
    .map_err(|e| Error::Io {
        action: "open a read-only descriptor of shared memory",
        source: e.into(),
    })
}

fn refusal(status: Status) -> [u8; MAP_RESPONSE_BYTES] {
    MapResponse {
        status,
        len: 0,
        memfd_offset: 0,
    }
    .encode()
}

/// A region mapped into this process.
struct Mapped {
    remote_key: u64,
    len: u64,
    mapping: RemoteMapping,
}

/// The reader's side: a connection to one owner on this host and the regions mapped from it.
pub struct ShmTransport {
    stream: Mutex<UnixStream>,
    control: ControlTable,
    regions: Mutex<HashMap<u64, Arc<Mapped>>>,
    /// When the owner's socket was last looked at, on the coarse clock
    /// ([`coarse_clock_ns`](crate::coarse_clock_ns)), read on every read: about 3 ns where the
    /// precise clock takes about 20 (measured on a VM with a TSC clock source).
    owner_checked: AtomicU64,
    /// The owner's socket closed: it stopped or died, and its memory is no longer served.
    owner_gone: AtomicBool,
}

/// How often a reader looks at the owner's socket to see whether it is still there. Its
/// mapping would keep a dead owner's memory readable; this bounds how long reads go on
/// after the owner is gone.
const OWNER_CHECK_INTERVAL: Duration = Duration::from_millis(10);

impl std::fmt::Debug for ShmTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ShmTransport")
            .field("mapped", &self.regions.lock().len())
            .finish()
    }
}

impl ShmTransport {
    /// Connects to the owner's socket at `path`.
    ///
    /// # Errors
    ///
    /// [`Error::Io`] if the socket cannot be reached; [`Error::Protocol`] if the owner's hello
    /// is malformed.
    pub fn connect(path: impl AsRef<Path>) -> Result<Self> {
        let stream =
            UnixStream::connect(path).map_err(Error::io("connect to the shared-memory socket"))?;
        let (frame, fd) = recv_with_fd::<MAP_RESPONSE_BYTES>(&stream)?;
        let hello = MapResponse::decode(&frame)?;
        let fd = fd.ok_or(FrameError::BadField {
            field: "control_fd",
            value: 0,
        })?;
        if hello.status != Status::Ok || hello.len != (MAX_REGIONS * 8) as u64 {
            return Err(FrameError::BadField {
                field: "control_len",
                value: hello.len,
            }
            .into());
        }
        let control = ControlTable::map_remote(File::from(fd), MAX_REGIONS)?;
        Ok(Self {
            stream: Mutex::new(stream),
            control,
            regions: Mutex::new(HashMap::new()),
            owner_checked: AtomicU64::new(0),
            owner_gone: AtomicBool::new(false),
        })
    }

    /// Fails once the owner's socket has closed (the owner stopped or died). Looks at the
    /// socket at most every [`OWNER_CHECK_INTERVAL`], without blocking: a peek that finds
    /// the end of the stream.
    fn check_owner(&self) -> Result<()> {
        let gone = || Error::Io {
            action: "read the owner's memory (its shared-memory socket has closed)",
            source: std::io::ErrorKind::ConnectionReset.into(),
        };
        if self.owner_gone.load(Ordering::Relaxed) {
            return Err(gone());
        }
        let now = crate::coarse_clock_ns();
        let last = self.owner_checked.load(Ordering::Relaxed);
        if now.saturating_sub(last) < OWNER_CHECK_INTERVAL.as_nanos() as u64
            || self
                .owner_checked
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_err()
        {
            return Ok(());
        }
        // Busy with a map request: that exchange will see a closed socket itself.
        let Some(stream) = self.stream.try_lock() else {
            return Ok(());
        };
        let mut byte = [0u8; 1];
        match rustix::net::recv(&*stream, &mut byte, RecvFlags::PEEK | RecvFlags::DONTWAIT) {
            // The owner never writes unasked, so a byte here is not a sign of life or death.
            Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) | Ok((1.., _)) => Ok(()),
            Ok(_) | Err(_) => {
                self.owner_gone.store(true, Ordering::Relaxed);
                Err(gone())
            }
        }
    }

    fn current(&self, region_id: u64) -> bool {
        let (slot, epoch) = split(region_id);
        slot < MAX_REGIONS && self.control.load(slot) == epoch
    }

    fn mapped(&self, src: &RemoteSlice) -> Result<Arc<Mapped>> {
        if let Some(m) = self.regions.lock().get(&src.region_id) {
            if m.remote_key == src.remote_key {
                return Ok(Arc::clone(m));
            }
        }
        // Ask the owner, who checks the key.
        let stream = self.stream.lock();
        send_with_fd(
            &stream,
            &MapRequest {
                region_id: src.region_id,
                remote_key: src.remote_key,
            }
            .encode(),
            None,
        )?;
        let (frame, fd) = recv_with_fd::<MAP_RESPONSE_BYTES>(&stream)?;
        drop(stream);
        let response = MapResponse::decode(&frame)?;
        let region_id = src.region_id;
        match response.status {
            Status::Ok => {}
            Status::BadRemoteKey => return Err(Error::BadRemoteKey { region_id }),
            Status::UnknownRegion => return Err(Error::UnknownRegion { region_id }),
            Status::NotShareable => return Err(Error::NotShareable { region_id }),
            other => return Err(Error::UnexpectedStatus(other)),
        }
        let fd = fd.ok_or(FrameError::BadField {
            field: "memfd",
            value: 0,
        })?;
        if response.memfd_offset % 4096 != 0 || response.len == 0 {
            return Err(FrameError::BadField {
                field: "memfd_offset",
                value: response.memfd_offset,
            }
            .into());
        }
        let mapping = RemoteMapping::map(&File::from(fd), response.memfd_offset, response.len)?;
        let mapped = Arc::new(Mapped {
            remote_key: src.remote_key,
            len: response.len,
            mapping,
        });
        self.regions.lock().insert(region_id, Arc::clone(&mapped));
        Ok(mapped)
    }
}

/// Bytes copied at a time when checksumming a read as it is copied.
const CRC_PIECE: usize = 64 << 10;

impl ShmTransport {
    /// One read; with `crc`, checksums each piece right after copying it.
    fn read_into(
        &self,
        src: RemoteSlice,
        dst: &mut [u8],
        crc: Option<&mut crc32fast::Hasher>,
    ) -> Result<()> {
        let len = dst.len() as u64;
        if len > MAX_READ_BYTES {
            return Err(Error::TooLarge {
                len,
                max: MAX_READ_BYTES,
            });
        }
        let mapped = self.mapped_range(&src, len)?;
        // Bounds checked against the region's length, which the mapping covers.
        let memory = &mapped.mapping as &dyn MemorySource;
        match crc {
            None => copy_out(memory, src.offset as usize, dst),
            Some(hasher) => {
                for (i, piece) in dst.chunks_mut(CRC_PIECE).enumerate() {
                    copy_out(memory, src.offset as usize + i * CRC_PIECE, piece);
                    hasher.update(piece);
                }
            }
        }
        self.still_current(&src)
    }

    /// The mapping of `src`'s region, once the owner is known to be there, the region still
    /// registered, and `len` bytes at `src` inside it.
    fn mapped_range(&self, src: &RemoteSlice, len: u64) -> Result<Arc<Mapped>> {
        self.check_owner()?;
        self.still_current(src)?;
        let mapped = self.mapped(src)?;
        if src
            .offset
            .checked_add(len)
            .is_none_or(|end| end > mapped.len)
        {
            return Err(Error::OutOfBounds {
                region_id: src.region_id,
                offset: src.offset,
                len,
            });
        }
        Ok(mapped)
    }

    /// Fails if `src`'s region was unregistered (checked after a copy too: then the bytes may
    /// be from whatever reuses the memory).
    fn still_current(&self, src: &RemoteSlice) -> Result<()> {
        if self.current(src.region_id) {
            return Ok(());
        }
        self.regions.lock().remove(&src.region_id);
        Err(Error::UnknownRegion {
            region_id: src.region_id,
        })
    }
}

impl Transport for ShmTransport {
    fn read(&self, src: RemoteSlice, dst: &mut [u8]) -> Result<()> {
        self.read_into(src, dst, None)
    }

    fn read_batch_crc32(&self, ops: &mut [ReadOp<'_>]) -> Vec<Result<u32>> {
        ops.iter_mut()
            .map(|op| {
                let mut crc = crc32fast::Hasher::new();
                self.read_into(op.src, op.dst, Some(&mut crc))
                    .map(|()| crc.finalize())
            })
            .collect()
    }

    fn read_batch(&self, ops: &mut [ReadOp<'_>]) -> Vec<Result<()>> {
        ops.iter_mut().map(|op| self.read(op.src, op.dst)).collect()
    }

    /// One mapping, one bounds check for the whole block, three copies.
    fn read_in_place(
        &self,
        src: RemoteSlice,
        head: &mut [u8],
        payload_offset: u64,
        payload: &mut [u8],
        check: &dyn Fn(&[u8]) -> bool,
    ) -> Result<bool> {
        let head_len = head.len() as u64;
        let payload_len = payload.len() as u64;
        if head_len.max(payload_len) > MAX_READ_BYTES {
            return Err(Error::TooLarge {
                len: head_len.max(payload_len),
                max: MAX_READ_BYTES,
            });
        }
        let span = payload_offset.max(head_len).saturating_add(payload_len);
        let mapped = self.mapped_range(&src, span)?;
        let memory = &mapped.mapping as &dyn MemorySource;
        // In bounds: `src.offset + span` fits in the region (checked above), and `span`
        // covers the head and the payload.
        let at = src.offset as usize;
        // The head loads while the payload is copied: checking it then waits on no miss.
        prefetch(memory, at, head.len());
        copy_out(memory, at + payload_offset as usize, payload);
        std::sync::atomic::fence(Ordering::Acquire);
        copy_out(memory, at, head);
        self.still_current(&src)?;
        Ok(check(head))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MemfdRegion;

    /// Maps `fd` shared and writable, as a hostile reader would try to.
    #[expect(
        unsafe_code,
        reason = "the test tries the mapping the kernel must refuse"
    )]
    fn map_writable(fd: OwnedFd, len: usize) -> std::io::Result<memmap2::MmapMut> {
        // SAFETY: a mapping of a memfd this test owns a descriptor of; if the kernel granted
        // it, the test fails without writing through it.
        unsafe {
            memmap2::MmapOptions::new()
                .len(len)
                .map_mut(&File::from(fd))
        }
    }

    fn access_mode(fd: &OwnedFd) -> rustix::fs::OFlags {
        rustix::fs::fcntl_getfl(fd).unwrap() & rustix::fs::OFlags::RWMODE
    }

    /// A reader is handed read-only descriptors: the control table's with Hello and a
    /// region's with a map answer; neither maps writable, and a region's still maps for
    /// reading and shows the owner's bytes.
    #[test]
    fn readers_get_descriptors_that_do_not_map_writable() {
        let dir = tempfile::tempdir().unwrap();
        let registry = Arc::new(Registry::new().unwrap());
        let region = MemfdRegion::new(1 << 16).unwrap();
        region.write(100, b"owner's bytes");
        let handle = registry.register(Arc::new(region)).unwrap();
        let server = ShmServer::bind(dir.path().join("s.sock"), Arc::clone(&registry)).unwrap();

        let stream = UnixStream::connect(server.path()).unwrap();
        let (_, control) = recv_with_fd::<MAP_RESPONSE_BYTES>(&stream).unwrap();
        let control = control.expect("the control table's descriptor");
        assert_eq!(access_mode(&control), rustix::fs::OFlags::RDONLY);
        let error = map_writable(control, MAX_REGIONS * 8).expect_err("a writable control table");
        assert_eq!(
            error.raw_os_error(),
            Some(rustix::io::Errno::ACCESS.raw_os_error())
        );

        let request = MapRequest {
            region_id: handle.region_id,
            remote_key: handle.remote_key,
        };
        (&stream).write_all(&request.encode()).unwrap();
        let (answer, fd) = recv_with_fd::<MAP_RESPONSE_BYTES>(&stream).unwrap();
        assert_eq!(MapResponse::decode(&answer).unwrap().status, Status::Ok);
        let fd = fd.expect("the region's descriptor");
        assert_eq!(access_mode(&fd), rustix::fs::OFlags::RDONLY);
        let file = File::from(fd.try_clone().unwrap());
        let mapping = RemoteMapping::map(&file, 0, handle.len).unwrap();
        let mut read = [0u8; 13];
        copy_out(&mapping, 100, &mut read);
        assert_eq!(&read, b"owner's bytes");
        let error = map_writable(fd, 1 << 16).expect_err("a writable region");
        assert_eq!(
            error.raw_os_error(),
            Some(rustix::io::Errno::ACCESS.raw_os_error())
        );
    }
}
