//! The control plane: accepting connections, authenticating them, reading frames and
//! answering each request (lookups and their leases, puts received straight into DRAM,
//! stats).

use std::fmt::Write as _;

use super::workers::{Job, park};
use super::*;

pub(super) fn accept_loop(listener: &TcpListener, shared: &Arc<Shared>) {
    let mut warned = RateLimit::default();
    for stream in listener.incoming() {
        if shared.stopping.load(Ordering::Acquire) {
            break;
        }
        let stream = match stream {
            Ok(stream) => stream,
            Err(error) => {
                // Out of descriptors (EMFILE, ENFILE) or memory: say so, and give the
                // connections being served a moment to end before accepting again.
                if warned.due() {
                    tracing::warn!(%error, "cannot accept a control connection");
                }
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        // Bounds a read or write in the middle of a request; between requests the poller
        // closes a connection quiet for as long.
        let _ = stream.set_read_timeout(Some(shared.idle_timeout));
        let _ = stream.set_write_timeout(Some(shared.idle_timeout));
        let id = shared.next_connection.fetch_add(1, Ordering::Relaxed);
        {
            let mut connections = shared.connections.lock();
            if connections.unauthenticated >= shared.max_unauthenticated
                && connections.close_oldest_unauthenticated()
            {
                // The oldest one that has not authenticated gives way: a flood of sockets
                // that never say Hello cannot keep a client that does from being served.
                shared
                    .metrics
                    .refused_connections
                    .fetch_add(1, Ordering::Relaxed);
                if warned.due() {
                    tracing::warn!(
                        limit = shared.max_unauthenticated,
                        "as many connections as allowed have not authenticated; closing the \
                         oldest of them to make room for new ones (each is counted in \
                         mooncake_refused_connections_total)"
                    );
                }
            }
            connections.open.insert(
                id,
                Connection {
                    fd: stream.as_raw_fd(),
                    authenticated: false,
                    hello_deadline: Some(Instant::now() + shared.hello_timeout),
                },
            );
            connections.unauthenticated += 1;
        }
        // Its loop hands it to a worker once its Hello is whole in the socket.
        let job = Job {
            stream,
            id,
            authenticated: false,
            unsent: None,
        };
        if let Err(job) = park(shared, job) {
            shared.forget(job.id);
        }
    }
}

/// Serves `job` until it goes quiet (then parks it with its event loop) or ends.
pub(super) fn run(shared: &Arc<Shared>, mut job: Job) {
    match serve(&job.stream, shared, job.id, &mut job.authenticated) {
        Ok(Next::Park) => {
            if let Err(job) = park(shared, job) {
                shared.forget(job.id);
            }
        }
        Ok(Next::Yield) => super::workers::dispatch(shared, job),
        Ok(Next::Close) => shared.forget(job.id),
        Err(error) => {
            tracing::debug!(%error, "control connection closed");
            shared.forget(job.id);
        }
    }
}

/// What to do with a connection a worker is done with for now.
enum Next {
    /// Nothing more is coming now: give it to the poller.
    Park,
    /// Its next request is there, but other connections wait for a worker: to the back of
    /// their queue.
    Yield,
    /// It ended, or was refused.
    Close,
}

/// Whether `stream` has bytes to read (or its end) within `wait`: polled without sleeping
/// for the first `awake` of it (see [`crate::NodeConfig::poll_before_sleep`]), asleep after.
fn readable_within(stream: &TcpStream, wait: Duration, awake: Duration) -> bool {
    let mut fds = [rustix::event::PollFd::new(
        stream,
        rustix::event::PollFlags::IN,
    )];
    let awake = awake.min(wait);
    if !awake.is_zero() {
        let zero = rustix::event::Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        let began = Instant::now();
        while began.elapsed() < awake {
            match rustix::event::poll(&mut fds, Some(&zero)) {
                // Nothing yet: let any thread waiting for this core run first (the client,
                // another node's worker, on a host with few cores), so that polling takes
                // only a core nothing else wants. Spinning instead halved the speed of a
                // replicated put from three nodes and their client on two cores.
                Ok(0) | Err(rustix::io::Errno::INTR) => std::thread::yield_now(),
                // Readable, or an error the read will report.
                Ok(_) | Err(_) => return true,
            }
        }
    }
    let asleep = wait - awake;
    let timeout = rustix::event::Timespec::try_from(asleep).unwrap_or(rustix::event::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    });
    loop {
        match rustix::event::poll(&mut fds, Some(&timeout)) {
            Ok(n) => return n > 0,
            Err(rustix::io::Errno::INTR) => {}
            // Let the read report it.
            Err(_) => return true,
        }
    }
}

/// At most one warning per interval for an event that can repeat thousands of times a second.
#[derive(Default)]
struct RateLimit(Option<Instant>);

impl RateLimit {
    const INTERVAL: Duration = Duration::from_secs(10);

    fn due(&mut self) -> bool {
        let now = Instant::now();
        let due = self
            .0
            .is_none_or(|last| now.duration_since(last) >= Self::INTERVAL);
        if due {
            self.0 = Some(now);
        }
        due
    }
}

impl Shared {
    /// Lets connection `id` through `Hello`; `Err` with the number served when the
    /// authenticated ones are at their limit (or the connection was just closed to make
    /// room).
    fn authenticate(&self, id: u64) -> Result<(), usize> {
        let mut connections = self.connections.lock();
        let Some(connection) = connections.open.get(&id) else {
            return Err(connections.authenticated());
        };
        if connection.authenticated {
            return Ok(());
        }
        let served = connections.authenticated();
        if served >= self.max_connections {
            return Err(served);
        }
        if let Some(connection) = connections.open.get_mut(&id) {
            connection.authenticated = true;
            connection.hello_deadline = None;
        }
        connections.unauthenticated -= 1;
        Ok(())
    }

    /// Forgets connection `id`, whose thread has ended (or never started).
    pub(super) fn forget(&self, id: u64) {
        let mut connections = self.connections.lock();
        if connections
            .open
            .remove(&id)
            .is_some_and(|c| !c.authenticated)
        {
            connections.unauthenticated -= 1;
        }
        if connections.open.is_empty() {
            self.idle.notify_all();
        }
    }

    /// Whether the node closed connection `id` for not authenticating (past its Hello
    /// deadline, or to make room): a socket shut down with bytes still queued reads them
    /// before its end, so a loop holding one asks here.
    pub(super) fn closed_before_hello(&self, id: u64) -> bool {
        self.connections
            .lock()
            .open
            .get(&id)
            .is_none_or(|c| !c.authenticated && c.hello_deadline.is_none())
    }

    /// The connections open now: those that have authenticated, and those that have not.
    pub(super) fn connection_counts(&self) -> (u64, u64) {
        let connections = self.connections.lock();
        (
            connections.authenticated() as u64,
            connections.unauthenticated as u64,
        )
    }
}

pub(super) fn sweep_leases(shared: &Arc<Shared>) {
    let mut sweeps = 0u32;
    let mut taken = 0;
    while !shared.stopping.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(20));
        super::workers::unstick(shared, &mut taken);
        let now = Instant::now();
        shared.leases.lock().expire(now);
        // Dropping a reservation returns its space to the engine.
        shared
            .reservations
            .lock()
            .retain(|_, reserved| reserved.deadline > now);
        // Every 100 ms: a connection that has not authenticated in time is closed, however
        // it trickles its bytes (a read timeout alone restarts with each byte).
        sweeps = sweeps.wrapping_add(1);
        if sweeps % 5 == 0 {
            let closed = shared.connections.lock().close_late(now);
            if closed > 0 {
                shared
                    .metrics
                    .hello_timeouts
                    .fetch_add(closed, Ordering::Relaxed);
                tracing::debug!(
                    closed,
                    "closed connections that did not authenticate in time"
                );
            }
        }
    }
}

/// Serves one connection's requests while they come (each soon after the last answer: see
/// [`super::workers::Workers::linger`]), until it goes quiet, closes, sends a frame that fails its checks, or fails
/// authentication.
fn serve(
    stream: &TcpStream,
    shared: &Shared,
    id: u64,
    authenticated: &mut bool,
) -> std::io::Result<Next> {
    // Small read-ahead: put values that follow a frame are read straight into the space
    // reserved for them; at most this much of one is copied out of the buffer. Both buffers
    // live while a worker serves the connection, not while it is parked.
    let mut reader = BufReader::with_capacity(4096, stream);
    let mut writer = BufWriter::with_capacity(16 << 10, stream);
    let mut body = Vec::new();
    let mut served = false;
    // Poll before sleeping while the client's requests come within twice the window of it
    // (back to back); one that pauses longer costs the window once per pause, not per request.
    let window = shared.poll_before_sleep;
    let mut poll = window;
    loop {
        // Read-ahead is empty between requests (a client waits for each answer), unless it
        // sent several at once (then those are served in this turn: the read-ahead cannot
        // wait in the queue).
        if reader.buffer().is_empty() {
            let (wait, _turn) = shared.workers.linger();
            let began = Instant::now();
            if !readable_within(stream, wait, poll) {
                return Ok(Next::Park);
            }
            poll = if began.elapsed() <= 2 * window {
                window
            } else {
                Duration::ZERO
            };
            if served && shared.workers.others_waiting() {
                return Ok(Next::Yield);
            }
        }
        served = true;
        let authenticated_now = *authenticated;
        // Before Hello, nothing larger than a Hello is read.
        let limit = if authenticated_now {
            MAX_BODY_BYTES
        } else {
            MAX_HELLO_BODY_BYTES
        };
        let header = match read_frame_within(&mut reader, &mut body, limit) {
            Ok(Some(header)) => header,
            Ok(None) => return Ok(Next::Close),
            Err(ReadFrameError::Io(e)) => return Err(e),
            Err(ReadFrameError::Frame(error)) => {
                // The stream is out of step: say why, then close.
                shared
                    .metrics
                    .rejected_frames
                    .fetch_add(1, Ordering::Relaxed);
                let before = if authenticated_now {
                    ""
                } else {
                    " before Hello"
                };
                let reply = refuse(ErrorCode::BadRequest, format!("bad frame{before}: {error}"));
                write_frame(&mut writer, 0, &encode_body(&reply))?;
                writer.flush()?;
                return Ok(Next::Close);
            }
        };
        let (response, close) = match decode_request(&body) {
            Err(error) => {
                shared.metrics.errors.fetch_add(1, Ordering::Relaxed);
                (refuse(ErrorCode::BadRequest, error.to_string()), false)
            }
            Ok(Request::Hello { token }) => {
                if !token_ok(shared.token.as_deref(), token) {
                    shared.metrics.unauthorized.fetch_add(1, Ordering::Relaxed);
                    (
                        refuse(ErrorCode::Unauthorized, "missing or wrong token".to_owned()),
                        true,
                    )
                } else if let Err(served) = shared.authenticate(id) {
                    shared
                        .metrics
                        .refused_connections
                        .fetch_add(1, Ordering::Relaxed);
                    (
                        refuse(
                            ErrorCode::Busy,
                            format!(
                                "the node serves {served} connections, its limit; try again \
                                 later"
                            ),
                        ),
                        true,
                    )
                } else {
                    *authenticated = true;
                    (Response::Hello(shared.hello.clone()), false)
                }
            }
            Ok(_) if !authenticated_now => (
                refuse(
                    ErrorCode::Unauthorized,
                    "send Hello (with the token, if the node has one) first".to_owned(),
                ),
                true,
            ),
            Ok(Request::Put {
                items,
                durable,
                chain,
            }) => {
                match put_from_stream(shared, &mut reader, &items, durable, chain)? {
                    Ok(response) => (response, false),
                    // The values cannot be skipped sensibly: answer, then close.
                    Err(refusal) => (refusal, true),
                }
            }
            Ok(request) => {
                let (response, inline) = handle(shared, request, id);
                let body = encode_body(&response);
                if inline.is_empty() {
                    write_frame(&mut writer, header.request_id, &body)?;
                    writer.flush()?;
                } else {
                    writer.flush()?;
                    write_with_blocks(stream, header.request_id, &body, &inline)?;
                }
                continue;
            }
        };
        write_frame(&mut writer, header.request_id, &encode_body(&response))?;
        writer.flush()?;
        if close {
            return Ok(Next::Close);
        }
    }
}

/// Writes a frame and the inline blocks that follow it, straight from the pinned DRAM copies,
/// in as few system calls as the socket takes (usually one, so the reader is woken once).
fn write_with_blocks(
    stream: &TcpStream,
    request_id: u64,
    body: &[u8],
    blocks: &[PinnedBlock],
) -> std::io::Result<()> {
    let header = frame_header(request_id, body)?;
    let mut slices = Vec::with_capacity(2 + blocks.len());
    slices.extend([IoSlice::new(&header), IoSlice::new(body)]);
    slices.extend(blocks.iter().map(|b| IoSlice::new(b.block_bytes())));
    write_slices(stream, &mut slices)
}

/// Well under every system's IOV_MAX.
const MAX_SLICES: usize = 512;

/// Writes every byte of `slices` (blocking).
fn write_slices(mut stream: &TcpStream, slices: &mut [IoSlice<'_>]) -> std::io::Result<()> {
    let mut pending = slices;
    while !pending.is_empty() {
        let at_most = pending.len().min(MAX_SLICES);
        let written = match stream.write_vectored(&pending[..at_most]) {
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            result => result?,
        };
        if written == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut pending, written);
    }
    Ok(())
}

/// What an event loop did with a connection that became ready.
pub(super) enum Ready {
    /// It served one request (or found nothing to read yet): the connection waits in the
    /// loop for its next one.
    Served,
    /// Its answer is partly sent (`job.unsent`): the loop sends the rest when the socket
    /// takes more.
    Sending,
    /// A worker serves it (see the module comment of `workers`).
    ToWorker,
    /// It has not authenticated and its Hello is not whole in the socket yet: it stays with
    /// the loop, which looks again shortly (a worker would wait on it, and a flood of such
    /// connections would hold every worker until the Hello deadline).
    Incomplete,
    /// It failed: close it.
    Close,
}

/// An answer an event loop began to send: its frame, the blocks that follow it (pinned
/// until the last byte is sent), and how many bytes of them went out.
pub(super) struct Unsent {
    frame: Vec<u8>,
    blocks: Vec<PinnedBlock>,
    sent: usize,
}

impl Unsent {
    /// Sends what the socket takes now, without waiting; `Ok(true)` once all is sent.
    fn send_some(&mut self, stream: &TcpStream) -> rustix::io::Result<bool> {
        let mut slices = Vec::with_capacity(1 + self.blocks.len());
        slices.push(IoSlice::new(&self.frame));
        slices.extend(self.blocks.iter().map(|b| IoSlice::new(b.block_bytes())));
        let mut pending = &mut slices[..];
        IoSlice::advance_slices(&mut pending, self.sent);
        while !pending.is_empty() {
            let at_most = pending.len().min(MAX_SLICES);
            match rustix::net::sendmsg(
                stream,
                &pending[..at_most],
                &mut rustix::net::SendAncillaryBuffer::default(),
                rustix::net::SendFlags::DONTWAIT | rustix::net::SendFlags::NOSIGNAL,
            ) {
                Ok(0) => return Err(rustix::io::Errno::PIPE),
                Ok(n) => {
                    self.sent += n;
                    IoSlice::advance_slices(&mut pending, n);
                }
                Err(rustix::io::Errno::INTR) => {}
                Err(rustix::io::Errno::AGAIN) => return Ok(false),
                Err(error) => return Err(error),
            }
        }
        Ok(true)
    }
}

/// An event loop's buffers, kept from one request to the next.
pub(super) struct LoopBuffers {
    /// What a readable socket holds, looked at without taking it.
    peek: Vec<u8>,
    /// Where the request is taken from the socket, once it is known to be whole and quick.
    taken: Vec<u8>,
}

/// Largest request an event loop serves itself (a lookup of a few hundred keys); a larger
/// one goes to a worker.
const LOOP_FRAME_BYTES: usize = 64 << 10;

impl Default for LoopBuffers {
    fn default() -> Self {
        Self {
            peek: vec![0; LOOP_FRAME_BYTES],
            taken: vec![0; LOOP_FRAME_BYTES],
        }
    }
}

/// Serves, in the event loop's thread, one request of `job` if it is quick (a lookup, exists,
/// a prefix match, health), whole in the socket already, and from a connection that has
/// authenticated; its answer is sent without waiting (what the socket cannot take at once
/// waits in `job.unsent`, its blocks still pinned, and goes out as the socket drains: no
/// request of the connection is read meanwhile). Anything else is left in the socket,
/// untouched, for a worker.
pub(super) fn serve_ready(shared: &Shared, job: &mut Job, buffers: &mut LoopBuffers) -> Ready {
    use rustix::net::{RecvFlags, recv};
    if let Some(unsent) = job.unsent.as_mut() {
        return match unsent.send_some(&job.stream) {
            Ok(true) => {
                // The last byte is out: the pins end here.
                job.unsent = None;
                Ready::Served
            }
            Ok(false) => Ready::Sending,
            Err(_) => Ready::Close,
        };
    }
    let LoopBuffers { peek, taken } = buffers;
    if !job.authenticated {
        if shared.closed_before_hello(job.id) {
            return Ready::Close;
        }
        return hello_ready(&job.stream, peek);
    }
    let seen = match recv(
        &job.stream,
        &mut peek[..],
        RecvFlags::PEEK | RecvFlags::DONTWAIT,
    ) {
        Ok((n, _)) => n,
        Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => return Ready::Served,
        // The end, or an error: a worker reads it and closes the connection as it should.
        Err(_) => return Ready::ToWorker,
    };
    let Some(whole) = peek.get(..seen) else {
        return Ready::ToWorker;
    };
    let Some((header, frame_len)) = whole_frame(whole) else {
        return Ready::ToWorker;
    };
    let Some(body) = whole.get(FRAME_HEADER_BYTES..frame_len) else {
        return Ready::ToWorker;
    };
    let request = match decode_request(body) {
        Ok(
            request @ (Request::Lookup { .. }
            | Request::Exists { .. }
            | Request::PrefixMatch { .. }
            | Request::Health),
        ) => request,
        _ => return Ready::ToWorker,
    };
    // The request is whole and quick: take it from the socket (the bytes just looked at).
    match recv(&job.stream, &mut taken[..frame_len], RecvFlags::DONTWAIT) {
        Ok((n, _)) if n == frame_len => {}
        // Only this thread reads the socket now, and the bytes were there: out of step.
        _ => return Ready::Close,
    }
    let (response, blocks) = handle(shared, request, job.id);
    shared
        .metrics
        .served_in_loops
        .fetch_add(1, Ordering::Relaxed);
    let mut frame = Vec::with_capacity(64);
    if write_frame(&mut frame, header.request_id, &encode_body(&response)).is_err() {
        return Ready::Close;
    }
    let mut unsent = Unsent {
        frame,
        blocks,
        sent: 0,
    };
    match unsent.send_some(&job.stream) {
        Ok(true) => Ready::Served,
        Ok(false) => {
            shared
                .metrics
                .answers_sent_in_parts
                .fetch_add(1, Ordering::Relaxed);
            job.unsent = Some(unsent);
            Ready::Sending
        }
        Err(_) => Ready::Close,
    }
}

/// Whether a connection that has not authenticated has a frame for a worker: its Hello whole
/// in the socket, a header the worker refuses at once (too long, malformed), or its end. A
/// worker then reads without waiting; until then the connection stays with its loop.
fn hello_ready(stream: &TcpStream, peek: &mut [u8]) -> Ready {
    use rustix::net::{RecvFlags, recv};
    let limit = FRAME_HEADER_BYTES + MAX_HELLO_BODY_BYTES;
    let Some(window) = peek.get_mut(..limit) else {
        return Ready::ToWorker;
    };
    let seen = match recv(stream, &mut *window, RecvFlags::PEEK | RecvFlags::DONTWAIT) {
        // Its end: the worker finds it and closes the connection.
        Ok((0, _)) => return Ready::ToWorker,
        Ok((n, _)) => n,
        Err(rustix::io::Errno::AGAIN | rustix::io::Errno::INTR) => return Ready::Served,
        Err(_) => return Ready::ToWorker,
    };
    let Some(raw) = window
        .get(..FRAME_HEADER_BYTES)
        .filter(|_| seen >= FRAME_HEADER_BYTES)
        .and_then(|h| <&[u8; FRAME_HEADER_BYTES]>::try_from(h).ok())
    else {
        return Ready::Incomplete;
    };
    match FrameHeader::decode(raw) {
        Ok(header) if (header.body_len as usize) <= MAX_HELLO_BODY_BYTES => {
            if seen >= FRAME_HEADER_BYTES + header.body_len as usize {
                Ready::ToWorker
            } else {
                Ready::Incomplete
            }
        }
        // Refused from its header, without waiting for the body.
        _ => Ready::ToWorker,
    }
}

/// A frame that `bytes` holds whole, checked as [`read_frame_within`] checks one: its header
/// and its length in all. `None` if it is not whole there or does not check (a worker reads
/// it and says why).
fn whole_frame(bytes: &[u8]) -> Option<(FrameHeader, usize)> {
    let raw: &[u8; FRAME_HEADER_BYTES] = bytes.get(..FRAME_HEADER_BYTES)?.try_into().ok()?;
    let header = FrameHeader::decode(raw).ok()?;
    let len = FRAME_HEADER_BYTES.checked_add(header.body_len as usize)?;
    let body = bytes.get(FRAME_HEADER_BYTES..len)?;
    (crc32fast::hash(body) == header.body_crc32).then_some((header, len))
}

/// Serves a put whose values follow the frame: each value is received straight into the DRAM
/// space reserved for its block, then sealed and published. A value the engine refuses is
/// read and dropped, so the stream stays in step. `Ok(Err(_))` when the lengths are beyond
/// the limits (the connection is then closed); `Err` when the stream fails.
fn put_from_stream(
    shared: &Shared,
    reader: &mut impl Read,
    items: &[(&[u8], u32)],
    durable: bool,
    chain: Option<ChainLinks<'_>>,
) -> std::io::Result<Result<Response, Response>> {
    let started = Instant::now();
    let metrics = &shared.metrics;
    if let Some(&(_, len)) = items
        .iter()
        .find(|(_, len)| *len as usize > mooncake_kv_engine::MAX_VALUE_BYTES)
    {
        metrics.errors.fetch_add(1, Ordering::Relaxed);
        return Ok(Err(refuse(
            ErrorCode::TooLarge,
            format!(
                "value of {len} bytes exceeds the limit of {}",
                mooncake_kv_engine::MAX_VALUE_BYTES
            ),
        )));
    }
    let durability = if durable {
        Durability::WriteThrough
    } else {
        Durability::Memory
    };
    // A chain's blocks are linked as they are committed; a plain batch's are not.
    let mut linked = chain.map(|c| shared.engine.chain(c.parent));
    let partial_end = chain.is_some_and(|c| c.partial_end);
    let mut outcomes = Vec::with_capacity(items.len());
    for (index, &(key, len)) in items.iter().enumerate() {
        metrics.bytes_in.fetch_add(len.into(), Ordering::Relaxed);
        let end = if partial_end && index + 1 == items.len() {
            ChainEnd::Partial
        } else {
            ChainEnd::Full
        };
        let reserved = match linked.as_mut() {
            Some(linked) => linked.reserve(key, len as usize),
            None => shared.engine.reserve(key, len as usize),
        };
        let outcome = match reserved {
            Ok(mut reservation) => {
                // The only copy: from the socket into the block's place in DRAM.
                reader.read_exact(reservation.payload_mut())?;
                let committed = match linked.as_mut() {
                    Some(linked) => linked.commit(reservation, durability, end),
                    None => shared.engine.commit(reservation, durability),
                };
                match committed {
                    Ok(generation) => Outcome::Ok(generation),
                    Err(error) => Outcome::Err(shared.refusal(&error)),
                }
            }
            Err(error) => {
                std::io::copy(&mut reader.take(len.into()), &mut std::io::sink())?;
                Outcome::Err(shared.refusal(&error))
            }
        };
        if matches!(outcome, Outcome::Err(_)) {
            metrics.errors.fetch_add(1, Ordering::Relaxed);
        }
        outcomes.push(outcome);
    }
    metrics.record(0, started.elapsed());
    Ok(Ok(Response::Put(outcomes)))
}

/// Compares in time independent of where the first difference is.
fn token_ok(expected: Option<&[u8]>, given: &[u8]) -> bool {
    let Some(expected) = expected else {
        return true;
    };
    if expected.len() != given.len() {
        return false;
    }
    expected
        .iter()
        .zip(given)
        .fold(0u8, |acc, (a, b)| acc | (a ^ b))
        == 0
}

fn refuse(code: ErrorCode, message: String) -> Response {
    Response::Error(ErrorReply { code, message })
}

fn engine_refusal(error: &mooncake_kv_engine::Error) -> ErrorReply {
    use mooncake_kv_engine::Error as E;
    let code = match error {
        E::Format(FormatError::KeyTooLong { .. } | FormatError::ValueTooLarge { .. }) => {
            ErrorCode::TooLarge
        }
        E::Format(FormatError::EmptyKey) | E::NotPersistent => ErrorCode::BadRequest,
        // A block that failed verification: the engine dropped it.
        E::Format(_) | E::BlockMismatch { .. } => ErrorCode::Corrupt,
        E::NoSpace { .. } => ErrorCode::NoSpace,
        _ => ErrorCode::Internal,
    };
    ErrorReply {
        code,
        message: error.to_string(),
    }
}

/// Serves one request; returns the response and the blocks to send after it (inline lookups).
fn handle(shared: &Shared, request: Request<'_>, connection: u64) -> (Response, Vec<PinnedBlock>) {
    let started = Instant::now();
    let engine = &shared.engine;
    let metrics = &shared.metrics;
    let count_errors = |n: usize| {
        if n > 0 {
            metrics.errors.fetch_add(n as u64, Ordering::Relaxed);
        }
    };
    let mut inline_blocks = Vec::new();
    let (kind, response) = match request {
        Request::Hello { .. } => (
            0,
            Response::Error(ErrorReply {
                code: ErrorCode::BadRequest,
                message: "Hello is only the first request".to_owned(),
            }),
        ),
        Request::Put { .. } => (
            0,
            Response::Error(ErrorReply {
                code: ErrorCode::Internal,
                message: "a put is served with its values".to_owned(),
            }),
        ),
        Request::Reserve { key, len } => (7, reserve(shared, key, len, connection)),
        Request::Commit {
            reservation,
            payload,
            durable,
        } => {
            let outcome = commit(shared, reservation, payload, durable);
            count_errors(usize::from(matches!(outcome, Outcome::Err(_))));
            (8, Response::Put(vec![outcome]))
        }
        Request::Abort { reservation } => {
            let existed = shared.reservations.lock().remove(&reservation).is_some();
            (8, Response::Flags(vec![existed]))
        }
        Request::Lookup {
            keys,
            release,
            stale_reads,
            cached_reads,
            cached_keys,
            inline,
        } => {
            // Reads the node did not serve still count as uses (at most MAX_CACHED_KEYS are
            // taken from one request; a client that names more is not trusted with them).
            shared
                .engine
                .touch(&cached_keys[..cached_keys.len().min(MAX_CACHED_KEYS)]);
            shared
                .metrics
                .stale_reads
                .fetch_add(u64::from(stale_reads), Ordering::Relaxed);
            shared
                .metrics
                .cached_reads
                .fetch_add(u64::from(cached_reads), Ordering::Relaxed);
            {
                let mut leases = shared.leases.lock();
                for id in release {
                    leases.by_id.remove(&id);
                }
            }
            let outcomes: Vec<_> = keys
                .iter()
                .map(|key| lookup(shared, key, inline.then_some(&mut inline_blocks)))
                .collect();
            count_errors(
                outcomes
                    .iter()
                    .filter(|o| matches!(o, Outcome::Err(_)))
                    .count(),
            );
            (1, Response::Lookup(outcomes))
        }
        Request::Exists { keys } => (
            2,
            Response::Flags(keys.iter().map(|key| shared.serves(key)).collect()),
        ),
        Request::PrefixMatch { keys } => {
            let count = if shared.hidden_below.load(Ordering::Acquire) == 0 {
                engine.prefix_match(&keys)
            } else {
                keys.iter().take_while(|key| shared.serves(key)).count()
            };
            (3, Response::Count(count as u64))
        }
        Request::Remove { keys, durable } => {
            let removed = engine.remove_batch(&keys);
            let committed = if durable {
                engine.commit_removals()
            } else {
                Ok(())
            };
            match committed {
                Ok(()) => (4, Response::Flags(removed)),
                Err(error) => {
                    count_errors(1);
                    let mut reply = engine_refusal(&error);
                    reply.message = format!(
                        "removed, but the removals could not be made durable (a crash may bring \
                         the blocks back): {}",
                        reply.message
                    );
                    (4, Response::Error(reply))
                }
            }
        }
        Request::Stats => (5, Response::Stats(node_stats(shared))),
        Request::Health => (
            6,
            Response::Health {
                serving: !shared.stopping.load(Ordering::Acquire),
            },
        ),
        Request::EndChain { keys } => (9, Response::Flags(vec![engine.end_chain(&keys)])),
        Request::RemoveAll => (10, Response::Count(engine.remove_all())),
        Request::ReportCorrupt { key, generation } => (
            11,
            Response::Flags(vec![drop_if_damaged(shared, key, generation)]),
        ),
    };
    metrics.record(kind, started.elapsed());
    (response, inline_blocks)
}

/// A client found the block of `key` and `generation` damaged: checks it here (a client's
/// word alone drops nothing) and drops it if it fails. Returns whether it did.
fn drop_if_damaged(shared: &Shared, key: &[u8], generation: u64) -> bool {
    let damage = match shared.engine.pin(key) {
        Ok(Some(pinned)) if pinned.generation() == generation => {
            mooncake_kv_engine::format::decode(pinned.block_bytes()).err()
        }
        _ => None,
    };
    let Some(damage) = damage else {
        return false;
    };
    let dropped = shared.engine.remove_generation(key, generation);
    if dropped {
        shared
            .metrics
            .corrupt_reported
            .fetch_add(1, Ordering::Relaxed);
        tracing::error!(
            key = %String::from_utf8_lossy(key),
            generation,
            %damage,
            "a client found a block damaged in memory, and so did the node; dropped it"
        );
    }
    dropped
}

/// Pins the block of `key` and describes it; with `inline`, hands the pin over to be sent
/// after the response, else keeps it as a lease.
fn lookup(
    shared: &Shared,
    key: &[u8],
    inline: Option<&mut Vec<PinnedBlock>>,
) -> Outcome<Option<Descriptor>> {
    let pinned = match shared.engine.pin(key) {
        Ok(Some(pinned)) if !shared.hidden(pinned.generation()) => pinned,
        Ok(_) => return Outcome::Ok(None),
        Err(error) => return Outcome::Err(engine_refusal(&error)),
    };
    let mut descriptor = Descriptor {
        region_id: shared.handle.region_id,
        remote_key: shared.handle.remote_key,
        offset: pinned.block_offset(),
        block_len: pinned.block_len(),
        payload_offset: pinned.payload_offset(),
        payload_len: u32::try_from(pinned.payload().len()).unwrap_or(u32::MAX),
        generation: pinned.generation(),
        lease_ms: 0,
        lease_id: 0,
    };
    shared
        .metrics
        .bytes_described
        .fetch_add(descriptor.block_len, Ordering::Relaxed);
    if let Some(inline) = inline {
        inline.push(pinned);
        return Outcome::Ok(Some(descriptor));
    }
    let mut leases = shared.leases.lock();
    if leases.len() < shared.max_leases {
        descriptor.lease_ms = shared.hello.lease_ms;
        descriptor.lease_id = leases.grant(pinned, Instant::now() + shared.lease);
    }
    Outcome::Ok(Some(descriptor))
}

fn reserve(shared: &Shared, key: &[u8], len: u32, connection: u64) -> Response {
    let mut reservations = shared.reservations.lock();
    let refused = |message: String| {
        shared.metrics.errors.fetch_add(1, Ordering::Relaxed);
        refuse(ErrorCode::NoSpace, message)
    };
    if reservations.len() >= shared.max_reservations {
        return refused(format!(
            "{} reservations are open already, the node's limit",
            reservations.len()
        ));
    }
    if len as usize > mooncake_kv_engine::MAX_VALUE_BYTES {
        shared.metrics.errors.fetch_add(1, Ordering::Relaxed);
        return refuse(
            ErrorCode::TooLarge,
            format!(
                "value of {len} bytes exceeds the limit of {}",
                mooncake_kv_engine::MAX_VALUE_BYTES
            ),
        );
    }
    let (held, held_bytes) = reservations
        .values()
        .filter(|r| r.connection == connection)
        .fold((0u64, 0u64), |(n, bytes), r| {
            (n + 1, bytes + r.reservation.payload_len() as u64)
        });
    let budget = shared.reserved_bytes_per_connection;
    if held_bytes + u64::from(len) > budget {
        return refused(format!(
            "this connection holds {held} reservations of {held_bytes} bytes; {len} more would \
             pass its budget of {budget} bytes: commit or abort some first"
        ));
    }
    let reservation = match shared.engine.reserve(key, len as usize) {
        Ok(r) => r,
        Err(error) => {
            shared.metrics.errors.fetch_add(1, Ordering::Relaxed);
            return Response::Error(refusal_with(&error, &reservations));
        }
    };
    let id = shared.next_reservation.fetch_add(1, Ordering::Relaxed) + 1;
    let reply = ReservedReply {
        reservation: id,
        region_id: shared.handle.region_id,
        offset: reservation.payload_region_offset(),
        len,
        expires_ms: u32::try_from(shared.reservation_timeout.as_millis()).unwrap_or(u32::MAX),
    };
    reservations.insert(
        id,
        Reserved {
            deadline: Instant::now() + shared.reservation_timeout,
            reservation,
            connection,
        },
    );
    Response::Reserved(reply)
}

/// [`engine_refusal`], saying for a lack of space how much open reservations hold: space
/// that comes back when they are committed, aborted or expire.
fn refusal_with(
    error: &mooncake_kv_engine::Error,
    reservations: &HashMap<u64, Reserved>,
) -> ErrorReply {
    let mut reply = engine_refusal(error);
    if reply.code == ErrorCode::NoSpace && !reservations.is_empty() {
        let bytes: u64 = reservations
            .values()
            .map(|r| r.reservation.payload_len() as u64)
            .sum();
        let _ = write!(
            reply.message,
            " ({} open reservations hold {bytes} bytes until they are committed, aborted or \
             expire)",
            reservations.len()
        );
    }
    reply
}

impl Shared {
    /// [`engine_refusal`] for a put or a commit, with what reservations hold.
    fn refusal(&self, error: &mooncake_kv_engine::Error) -> ErrorReply {
        refusal_with(error, &self.reservations.lock())
    }
}

fn commit(shared: &Shared, id: u64, payload: Option<&[u8]>, durable: bool) -> Outcome<u64> {
    let refusal = |code, message: String| Outcome::Err(ErrorReply { code, message });
    let Some(Reserved {
        mut reservation, ..
    }) = shared.reservations.lock().remove(&id)
    else {
        return refusal(
            ErrorCode::BadRequest,
            format!("no reservation {id} (never made, committed, aborted, or expired)"),
        );
    };
    if let Some(payload) = payload {
        if payload.len() != reservation.payload_len() {
            return refusal(
                ErrorCode::BadRequest,
                format!(
                    "payload of {} bytes for a reservation of {}",
                    payload.len(),
                    reservation.payload_len()
                ),
            );
        }
        shared
            .metrics
            .bytes_in
            .fetch_add(payload.len() as u64, Ordering::Relaxed);
        // The one copy: from the request into the reserved space.
        reservation.payload_mut().copy_from_slice(payload);
    }
    let durability = if durable {
        Durability::WriteThrough
    } else {
        Durability::Memory
    };
    match shared.engine.commit(reservation, durability) {
        Ok(generation) => Outcome::Ok(generation),
        Err(error) => Outcome::Err(shared.refusal(&error)),
    }
}

fn node_stats(shared: &Shared) -> NodeStats {
    let stats = shared.engine.stats();
    let (authenticated, unauthenticated) = shared.connection_counts();
    NodeStats {
        tiers: stats
            .tiers
            .iter()
            .map(|t| TierFigures {
                tier: t.kind.to_string(),
                blocks: t.blocks,
                used_bytes: t.used_bytes,
                capacity_bytes: t.capacity_bytes,
                hits: t.hits,
                evictions: t.evictions,
            })
            .collect(),
        requests: shared.metrics.requests(),
        errors: shared.metrics.errors.load(Ordering::Relaxed),
        leases: shared.leases.lock().len() as u64,
        connections: authenticated,
        admission: AdmissionFigures {
            unauthenticated,
            refused: shared.metrics.refused_connections.load(Ordering::Relaxed),
            hello_timeouts: shared.metrics.hello_timeouts.load(Ordering::Relaxed),
        },
        repair: shared.repair_stats.lock().as_ref().map(|r| r.figures()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_compare_whole() {
        assert!(token_ok(None, b"anything"));
        assert!(token_ok(Some(b"secret"), b"secret"));
        assert!(!token_ok(Some(b"secret"), b"secreT"));
        assert!(!token_ok(Some(b"secret"), b"secret2"));
        assert!(!token_ok(Some(b"secret"), b""));
    }

    /// A request that comes while the worker polls, or after, is seen; none, and the wait
    /// ends once `wait` has passed in all, polling included.
    #[test]
    fn a_request_is_seen_whether_it_comes_while_polling_or_asleep() {
        use std::io::Write;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let mut client = TcpStream::connect(listener.local_addr().expect("addr")).expect("connect");
        let (server, _) = listener.accept().expect("accept");
        let ms = Duration::from_millis;

        let began = Instant::now();
        assert!(!readable_within(&server, ms(30), ms(10)));
        let waited = began.elapsed();
        assert!(waited >= ms(30) && waited < ms(1000), "{waited:?}");

        for (awake, late) in [(ms(200), ms(20)), (ms(5), ms(40)), (Duration::ZERO, ms(20))] {
            let sent = std::thread::scope(|scope| {
                scope.spawn(|| {
                    std::thread::sleep(late);
                    client.write_all(b"x").expect("send");
                });
                readable_within(&server, ms(5000), awake)
            });
            assert!(sent, "polling {awake:?}, a request {late:?} later");
            let mut byte = [0u8; 1];
            (&server).read_exact(&mut byte).expect("read");
        }
    }
}
