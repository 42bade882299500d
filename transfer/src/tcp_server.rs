//! The tcp data plane's server: event loops (epoll), not a thread per connection.
//!
//! A reader keeps up to 16 read requests in flight per connection (fixed-size frames); each
//! is answered with a response header and, when the read is allowed, the bytes straight from
//! registered memory (`send(2)` from the region: no copy in user space, no Rust reference to
//! memory its owner may be writing). Each loop owns its connections: it reads what requests
//! have arrived, queues their answers, and sends as much as each socket takes without
//! waiting; an answer the socket cannot take whole waits for the socket to be writable, and a
//! connection with many answers queued is not read from until they drain. So a connection
//! costs a socket and a few KiB whether it is quiet or not, and the threads are the loops'
//! (one per two cores, at least one) and the acceptor's.
//!
//! At the limit of connections (1,024) the one quiet longest is closed to make room for a new
//! one (its reader reconnects), and a connection quiet for [`IDLE_TIMEOUT`] with nothing left
//! to send is closed, so quiet connections never lock readers out.

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rustix::event::epoll;

use crate::conns::{Activity, AtLimit, IDLE_TIMEOUT, OpenConnections};
use crate::memory::send_some_from;
use crate::registry::{Registered, Registry};
use crate::wire::{REQUEST_BYTES, RESPONSE_BYTES, ReadRequest, ReadResponse, Status};
use crate::{Error, Result};

/// Requests read ahead of their answers, per connection.
const READ_AHEAD: usize = 64;
/// Answers queued on one connection before it is read from again.
const MAX_QUEUED: usize = 64;
/// The event data of a loop's waker (connection ids start at 1).
const WAKER: u64 = 0;
/// How often a loop looks for connections quiet too long.
const SWEEP: Duration = Duration::from_secs(1);

/// One answer: its header, then (when the read is allowed) `len` bytes of the region from
/// `offset`; the `Arc` keeps the memory alive until they are sent, even if the region is
/// unregistered meanwhile.
struct Answer {
    header: [u8; RESPONSE_BYTES],
    header_sent: usize,
    body: Option<(Arc<Registered>, usize, usize)>,
    body_sent: usize,
}

/// A connection, owned by one loop.
struct Conn {
    stream: TcpStream,
    activity: Arc<Activity>,
    /// Requests received, not yet answered: `inbuf[..filled]`.
    inbuf: Box<[u8; READ_AHEAD * REQUEST_BYTES]>,
    filled: usize,
    out: VecDeque<Answer>,
    /// What the loop watches the socket for now.
    interest: epoll::EventFlags,
    /// When it last received a request (or was opened).
    last: Instant,
}

/// One event loop: its epoll set, what wakes it, and its connections.
struct Loop {
    epoll: OwnedFd,
    waker: OwnedFd,
    conns: Mutex<HashMap<u64, Conn>>,
}

struct Shared {
    registry: Arc<Registry>,
    stop: AtomicBool,
    open: OpenConnections,
    loops: Vec<Loop>,
}

/// The running server: its acceptor and its loops. Dropping it stops accepting, closes
/// every connection and joins the threads.
pub(crate) struct LoopServer {
    local_addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
    loops: Vec<JoinHandle<()>>,
}

impl LoopServer {
    /// Serves reads of `registry`'s regions on `listener`.
    pub(crate) fn spawn(listener: TcpListener, registry: Arc<Registry>) -> Result<Self> {
        let local_addr = listener
            .local_addr()
            .map_err(Error::io("read the bound address"))?;
        let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
        let loops = (0..(cores / 2).max(1))
            .map(|_| {
                let epoll = epoll::create(epoll::CreateFlags::CLOEXEC)
                    .map_err(|e| Error::io("create an epoll set")(e.into()))?;
                let waker = rustix::event::eventfd(
                    0,
                    rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
                )
                .map_err(|e| Error::io("create an eventfd")(e.into()))?;
                epoll::add(
                    &epoll,
                    &waker,
                    epoll::EventData::new_u64(WAKER),
                    epoll::EventFlags::IN,
                )
                .map_err(|e| Error::io("watch an eventfd")(e.into()))?;
                Ok(Loop {
                    epoll,
                    waker,
                    conns: Mutex::new(HashMap::new()),
                })
            })
            .collect::<Result<Vec<_>>>()?;
        let shared = Arc::new(Shared {
            registry,
            stop: AtomicBool::new(false),
            open: OpenConnections::default(),
            loops,
        });
        let mut server = Self {
            local_addr,
            shared: Arc::clone(&shared),
            acceptor: None,
            loops: Vec::new(),
        };
        for index in 0..shared.loops.len() {
            let shared = Arc::clone(&shared);
            server.loops.push(
                std::thread::Builder::new()
                    .name(format!("mooncake-tcp-loop-{index}"))
                    .spawn(move || run_loop(&shared, index))
                    .map_err(Error::io("start a data-plane loop"))?,
            );
        }
        server.acceptor = Some(
            std::thread::Builder::new()
                .name("mooncake-tcp-accept".into())
                .spawn(move || accept_loop(&listener, &shared))
                .map_err(Error::io("start the data-plane acceptor"))?,
        );
        Ok(server)
    }

    pub(crate) fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}

impl Drop for LoopServer {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Release);
        // Wake the acceptor with a connection of our own, and each loop with its eventfd.
        let _ = TcpStream::connect_timeout(&self.local_addr, Duration::from_secs(1));
        if let Some(handle) = self.acceptor.take() {
            let _ = handle.join();
        }
        for lp in &self.shared.loops {
            // Any non-zero addition to the counter wakes the loop.
            let _ = rustix::io::write(&lp.waker, &1u64.to_le_bytes());
        }
        for handle in self.loops.drain(..) {
            let _ = handle.join();
        }
    }
}

fn accept_loop(listener: &TcpListener, shared: &Shared) {
    for stream in listener.incoming() {
        if shared.stop.load(Ordering::Acquire) {
            break;
        }
        let stream = match stream {
            Ok(stream) => stream,
            Err(error) => {
                // Out of descriptors or memory: let some connections end first.
                tracing::debug!(%error, "cannot accept a data-plane connection");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        if stream.set_nonblocking(true).is_err() {
            continue;
        }
        let _ = stream.set_nodelay(true);
        // A duplicate of the socket, by which the one quiet longest is closed to make room.
        let Some((id, activity)) = stream.try_clone().ok().and_then(|clone| {
            shared
                .open
                .admit(OwnedFd::from(clone), AtLimit::CloseQuietest)
        }) else {
            continue;
        };
        // `id` is at least 1 (0 is the waker's), and the index is below the loops' count.
        let lp = &shared.loops[(id % shared.loops.len() as u64) as usize];
        let interest = epoll::EventFlags::IN | epoll::EventFlags::RDHUP;
        let mut conns = lp.conns.lock();
        if epoll::add(&lp.epoll, &stream, epoll::EventData::new_u64(id), interest).is_err() {
            drop(conns);
            shared.open.close(id);
            continue;
        }
        conns.insert(
            id,
            Conn {
                stream,
                activity,
                inbuf: Box::new([0; READ_AHEAD * REQUEST_BYTES]),
                filled: 0,
                out: VecDeque::new(),
                interest,
                last: Instant::now(),
            },
        );
    }
}

fn run_loop(shared: &Shared, index: usize) {
    let Some(lp) = shared.loops.get(index) else {
        return;
    };
    let mut events = Vec::with_capacity(256);
    let timeout = rustix::event::Timespec::try_from(SWEEP).unwrap_or(rustix::event::Timespec {
        tv_sec: 1,
        tv_nsec: 0,
    });
    let mut last_sweep = Instant::now();
    while !shared.stop.load(Ordering::Acquire) {
        events.clear();
        match epoll::wait(
            &lp.epoll,
            rustix::buffer::spare_capacity(&mut events),
            Some(&timeout),
        ) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(error) => {
                tracing::error!(%error, "a data-plane loop failed; closing its connections");
                break;
            }
        }
        for event in events.drain(..) {
            let id = event.data.u64();
            if id == WAKER {
                let mut count = [0u8; 8];
                let _ = rustix::io::read(&lp.waker, &mut count);
                continue;
            }
            let mut conns = lp.conns.lock();
            let Some(conn) = conns.get_mut(&id) else {
                continue;
            };
            if service(conn, &shared.registry, &lp.epoll, id).is_err() {
                if let Some(conn) = conns.remove(&id) {
                    let _ = epoll::delete(&lp.epoll, &conn.stream);
                }
                drop(conns);
                shared.open.close(id);
            }
        }
        let now = Instant::now();
        if now.duration_since(last_sweep) >= SWEEP {
            last_sweep = now;
            let quiet: Vec<u64> = {
                let conns = lp.conns.lock();
                conns
                    .iter()
                    .filter(|(_, c)| c.out.is_empty() && now.duration_since(c.last) >= IDLE_TIMEOUT)
                    .map(|(&id, _)| id)
                    .collect()
            };
            for id in quiet {
                if let Some(conn) = lp.conns.lock().remove(&id) {
                    let _ = epoll::delete(&lp.epoll, &conn.stream);
                }
                shared.open.close(id);
            }
        }
    }
    let left: Vec<u64> = lp.conns.lock().drain().map(|(id, _)| id).collect();
    for id in left {
        shared.open.close(id);
    }
}

/// Why a connection is closed: its end, a socket error, or a frame that does not decode
/// (the stream is out of step).
struct Closed;

/// Reads the requests that have arrived (while few answers wait), queues their answers, sends
/// what the socket takes, and watches the socket for what comes next.
fn service(
    conn: &mut Conn,
    registry: &Registry,
    epoll_fd: &OwnedFd,
    id: u64,
) -> std::result::Result<(), Closed> {
    loop {
        send_queued(conn)?;
        if conn.out.len() >= MAX_QUEUED {
            break;
        }
        let n = match (&conn.stream).read(&mut conn.inbuf[conn.filled..]) {
            Ok(0) => return Err(Closed),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock => break,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return Err(Closed),
        };
        conn.filled += n;
        let whole = conn.filled / REQUEST_BYTES * REQUEST_BYTES;
        for frame in conn.inbuf[..whole].chunks_exact(REQUEST_BYTES) {
            conn.out.push_back(answer(registry, frame)?);
        }
        conn.inbuf.copy_within(whole..conn.filled, 0);
        conn.filled -= whole;
        if whole > 0 {
            conn.activity.touch();
            conn.last = Instant::now();
        }
    }
    let mut interest = epoll::EventFlags::RDHUP;
    if conn.out.len() < MAX_QUEUED {
        interest |= epoll::EventFlags::IN;
    }
    if !conn.out.is_empty() {
        interest |= epoll::EventFlags::OUT;
    }
    if interest != conn.interest {
        epoll::modify(
            epoll_fd,
            &conn.stream,
            epoll::EventData::new_u64(id),
            interest,
        )
        .map_err(|_| Closed)?;
        conn.interest = interest;
    }
    Ok(())
}

/// The answer to one request frame: the bytes when the region, key and bounds check, else a
/// status that says why, with none.
fn answer(registry: &Registry, frame: &[u8]) -> std::result::Result<Answer, Closed> {
    let request = ReadRequest::decode(frame).map_err(|_| Closed)?;
    let checked = registry.check(
        request.region_id,
        request.remote_key,
        request.offset,
        request.len.into(),
    );
    let status = match &checked {
        Ok(_) => Status::Ok,
        Err(Error::BadRemoteKey { .. }) => Status::BadRemoteKey,
        Err(Error::OutOfBounds { .. }) => Status::OutOfBounds,
        Err(Error::TooLarge { .. }) => Status::TooLarge,
        Err(_) => Status::UnknownRegion,
    };
    let len = if status == Status::Ok { request.len } else { 0 };
    let header = ReadResponse {
        request_id: request.request_id,
        status,
        len,
    }
    .encode();
    // Bounds were checked above; offsets and lengths fit a `usize` on the 64-bit targets
    // the crate builds for.
    let body = checked.ok().and_then(|region| {
        Some((
            region,
            usize::try_from(request.offset).ok()?,
            usize::try_from(len).ok()?,
        ))
    });
    Ok(Answer {
        header,
        header_sent: 0,
        body,
        body_sent: 0,
    })
}

/// Sends queued answers until the socket takes no more now.
fn send_queued(conn: &mut Conn) -> std::result::Result<(), Closed> {
    use rustix::net::SendFlags;
    while let Some(a) = conn.out.front_mut() {
        let body_left = a.body.as_ref().map_or(0, |(_, _, len)| len - a.body_sent);
        if a.header_sent < RESPONSE_BYTES {
            // MSG_MORE: the header and the bytes that follow it leave in one segment.
            let flags = SendFlags::DONTWAIT
                | SendFlags::NOSIGNAL
                | if body_left > 0 {
                    SendFlags::MORE
                } else {
                    SendFlags::empty()
                };
            match rustix::net::send(&conn.stream, &a.header[a.header_sent..], flags) {
                Ok(n) => a.header_sent += n,
                Err(rustix::io::Errno::AGAIN) => return Ok(()),
                Err(rustix::io::Errno::INTR) => {}
                Err(_) => return Err(Closed),
            }
            continue;
        }
        if let Some((region, offset, _)) = &a.body
            && body_left > 0
        {
            match send_some_from(
                conn.stream.as_fd(),
                region.memory.as_ref(),
                offset + a.body_sent,
                body_left,
            ) {
                Ok(n) => a.body_sent += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(()),
                Err(_) => return Err(Closed),
            }
            continue;
        }
        conn.out.pop_front();
    }
    Ok(())
}
