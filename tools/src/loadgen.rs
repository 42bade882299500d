//! `kvctl bench --connections N`: many connections driven by a few threads, so that one
//! process can load a node with thousands of connections without the load generator being
//! what is measured. Each thread runs an event loop (epoll) over its share of the
//! connections and keeps one get in flight on every one of them: a lookup whose answer
//! brings the block inline, checked (header, key and payload CRCs, then the value's own
//! pattern) as the library's reads check it. A get's latency runs from when its request was
//! ready, which in this closed loop is when the connection's previous answer was complete.
//!
//! The same loop speaks Redis's protocol too ([`run_redis`]: `GET`, each value checked
//! against its pattern), so that a Redis server can be measured the way a node is: same
//! threads, same connections, same clock. `redis-benchmark` times a request from when it is
//! written, after it waited in its own client, to the first read event of its reply (the
//! bytes after the first read are "parsing" to it): with many connections its latencies
//! are well under what Little's law allows for its own throughput, and with large values
//! they leave out the value's own transfer. So each get's time to the first bytes of its
//! answer is reported as well ([`BenchReport::read_first_byte`]), the figure to set next
//! to `redis-benchmark`'s.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use mooncake_kv_replication::proto::{
    FRAME_HEADER_BYTES, FrameHeader, Outcome, Request, Response, decode_response, encode_body,
    encode_frame, read_frame, write_frame,
};
use rustix::event::epoll;

use crate::bench::{
    BenchOptions, BenchReport, KeyPicker, Tally, bench_key, check_value, summarize, thread_rng,
};

/// What the load generator speaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Protocol {
    /// A node's: an inline lookup, answered with the block.
    Node,
    /// Redis's (RESP): `GET key`, answered with a bulk string.
    Redis,
}

/// Longest reply line read before a Redis value (`$67108864` and CRLF, or an error).
const REDIS_LINE_BYTES: usize = 256;

/// Where a connection is in receiving its current answer.
enum Stage {
    /// The frame header.
    Header,
    /// The frame body (as long as the buffer).
    Body,
    /// The inline block (as long as the buffer).
    Block,
}

struct Conn {
    stream: TcpStream,
    /// The current stage's bytes: `buf[..want]`, of which `filled` have arrived. The buffer
    /// only grows, so a value's bytes are not zeroed again for every answer.
    buf: Vec<u8>,
    want: usize,
    filled: usize,
    stage: Stage,
    index: u64,
    sent_at: Instant,
    /// When the first bytes of the current answer came: what `redis-benchmark` calls a
    /// request's latency (it stops its clock at the first read event).
    first_byte_at: Option<Instant>,
}

impl Conn {
    /// The next stage is `len` bytes long.
    fn expect(&mut self, len: usize) {
        if self.buf.len() < len {
            self.buf.resize(len, 0);
        }
        self.want = len;
        self.filled = 0;
    }

    /// Reads what the socket holds of the current stage, without waiting: `false` when it
    /// holds nothing now.
    fn read_some(&mut self) -> std::io::Result<bool> {
        loop {
            match self.stream.read(&mut self.buf[self.filled..self.want]) {
                Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
                Ok(n) => {
                    self.filled += n;
                    self.first_byte_at.get_or_insert_with(Instant::now);
                    return Ok(true);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
    }
}

/// Opens `connections` connections to the node at `addr` (saying Hello with `token`) and
/// drives gets on all of them from `o.concurrency` threads for `o.warm_up` unmeasured, then
/// `o.duration`. Reads only; the keys must have been put (see [`crate::bench::prefill`]).
///
/// # Errors
///
/// If a connection cannot be opened or its Hello is refused, or a thread's event loop
/// cannot be set up. Failures of single gets are counted in the report.
pub fn run(
    addr: SocketAddr,
    token: &[u8],
    o: &BenchOptions,
    connections: usize,
) -> std::io::Result<BenchReport> {
    let streams = (0..connections.max(1))
        .map(|_| hello(addr, token))
        .collect::<std::io::Result<Vec<_>>>()?;
    drive_all(streams, o, Protocol::Node)
}

/// [`run`] against a Redis server at `addr`: the same loop, connections and clock, `GET`
/// for each key, each value checked against its pattern. With `o.prefill`, every key is
/// first `SET` to its value (`o.value_bytes` bytes, as [`crate::bench::prefill`] puts them).
///
/// # Errors
///
/// If a connection cannot be opened, or the server refuses a `SET`. Failures of single gets
/// are counted in the report.
pub fn run_redis(
    addr: SocketAddr,
    o: &BenchOptions,
    connections: usize,
) -> std::io::Result<BenchReport> {
    let streams = (0..connections.max(1))
        .map(|_| {
            let stream = TcpStream::connect(addr)?;
            stream.set_nodelay(true)?;
            stream.set_read_timeout(Some(Duration::from_secs(10)))?;
            Ok(stream)
        })
        .collect::<std::io::Result<Vec<_>>>()?;
    if o.prefill {
        if let Some(first) = streams.first() {
            redis_prefill(first, o)?;
        }
    }
    drive_all(streams, o, Protocol::Redis)
}

/// Sets every key of the bench to its value, 64 at a time (pipelined).
fn redis_prefill(mut stream: &TcpStream, o: &BenchOptions) -> std::io::Result<()> {
    let mut value = vec![0u8; o.value_bytes];
    let mut reader = std::io::BufReader::new(stream);
    let mut line = String::new();
    let mut i = 0;
    while i < o.keys {
        let n = (o.keys - i).min(64);
        let mut out = Vec::new();
        for index in i..i + n {
            let key = bench_key(&o.key_prefix, index);
            crate::bench::fill_value(index, o.seed, &mut value);
            write!(out, "*3\r\n$3\r\nSET\r\n${}\r\n", key.len())?;
            out.extend_from_slice(&key);
            write!(out, "\r\n${}\r\n", value.len())?;
            out.extend_from_slice(&value);
            out.extend_from_slice(b"\r\n");
        }
        stream.write_all(&out)?;
        for _ in 0..n {
            line.clear();
            std::io::BufRead::read_line(&mut reader, &mut line)?;
            if line != "+OK\r\n" {
                return Err(std::io::Error::other(format!(
                    "SET refused: {}",
                    line.trim_end()
                )));
            }
        }
        i += n;
    }
    Ok(())
}

/// Spreads `streams` over `o.concurrency` threads, each an event loop, and sums their tallies.
fn drive_all(
    streams: Vec<TcpStream>,
    o: &BenchOptions,
    protocol: Protocol,
) -> std::io::Result<BenchReport> {
    let threads = o.concurrency.clamp(1, streams.len().max(1));
    let mut shares: Vec<Vec<TcpStream>> = (0..threads).map(|_| Vec::new()).collect();
    for (i, stream) in streams.into_iter().enumerate() {
        shares[i % threads].push(stream);
    }
    let started = Instant::now();
    let measure_from = started + o.warm_up;
    let until = measure_from + o.duration;
    let tallies: std::io::Result<Vec<Tally>> = std::thread::scope(|scope| {
        let handles: Vec<_> = shares
            .into_iter()
            .enumerate()
            .map(|(t, share)| {
                scope.spawn(move || drive(share, o, protocol, t as u64, measure_from, until))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(std::io::Error::other("a load thread panicked")))
            })
            .collect()
    });
    Ok(summarize(tallies?, o.duration, o.value_bytes))
}

/// A connection that has said Hello.
fn hello(addr: SocketAddr, token: &[u8]) -> std::io::Result<TcpStream> {
    let mut stream = TcpStream::connect(addr)?;
    stream.set_nodelay(true)?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(&encode_frame(0, &encode_body(&Request::Hello { token }))?)?;
    let mut body = Vec::new();
    read_frame(&mut stream, &mut body)
        .map_err(|e| std::io::Error::other(e.to_string()))?
        .ok_or_else(|| std::io::Error::from(ErrorKind::UnexpectedEof))?;
    match decode_response(&body) {
        Ok(Response::Hello(_)) => Ok(stream),
        Ok(Response::Error(reply)) => Err(std::io::Error::other(format!(
            "Hello refused: {}",
            reply.message
        ))),
        _ => Err(std::io::Error::other("unexpected answer to Hello")),
    }
}

/// One thread's event loop.
fn drive(
    share: Vec<TcpStream>,
    o: &BenchOptions,
    protocol: Protocol,
    thread: u64,
    measure_from: Instant,
    until: Instant,
) -> std::io::Result<Tally> {
    let poll = epoll::create(epoll::CreateFlags::CLOEXEC)?;
    // Keys as the other bench's threads take them (--order, --seed).
    let (mut rng, mut picker) = (thread_rng(o, thread), KeyPicker::new(o, thread));
    let mut next_key = move || picker.next(&mut rng);
    let mut conns = Vec::with_capacity(share.len());
    for (i, stream) in share.into_iter().enumerate() {
        stream.set_nonblocking(true)?;
        epoll::add(
            &poll,
            &stream,
            epoll::EventData::new_u64(i as u64),
            epoll::EventFlags::IN,
        )?;
        let mut conn = Conn {
            stream,
            buf: vec![0u8; FRAME_HEADER_BYTES],
            want: FRAME_HEADER_BYTES,
            filled: 0,
            stage: Stage::Header,
            index: 0,
            sent_at: Instant::now(),
            first_byte_at: None,
        };
        send(&mut conn, o, protocol, next_key())?;
        conns.push(conn);
    }
    // Answers to requests sent before the measured part, kept apart (their wrong values and
    // errors still count).
    let (mut tally, mut warm) = (Tally::default(), Tally::default());
    let mut events = Vec::with_capacity(conns.len().max(1));
    let tick = rustix::event::Timespec {
        tv_sec: 0,
        tv_nsec: 10_000_000,
    };
    while Instant::now() < until {
        events.clear();
        match epoll::wait(
            &poll,
            rustix::buffer::spare_capacity(&mut events),
            Some(&tick),
        ) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
        for event in events.drain(..) {
            let Some(conn) = usize::try_from(event.data.u64())
                .ok()
                .and_then(|i| conns.get_mut(i))
            else {
                continue;
            };
            let measured = conn.sent_at >= measure_from;
            let into = if measured { &mut tally } else { &mut warm };
            let received = match protocol {
                Protocol::Node => receive(conn, into)?,
                Protocol::Redis => receive_redis(conn, into)?,
            };
            if let Some(done) = received {
                let since_sent = |at: Instant| {
                    u64::try_from(at.saturating_duration_since(conn.sent_at).as_nanos())
                        .unwrap_or(u64::MAX)
                };
                into.read_ns.push(since_sent(done));
                into.first_byte_ns
                    .push(since_sent(conn.first_byte_at.unwrap_or(done)));
                send(conn, o, protocol, next_key())?;
            }
        }
    }
    tally.wrong += warm.wrong;
    tally.errors += warm.errors;
    tally.first_error = tally.first_error.or(warm.first_error);
    Ok(tally)
}

/// Sends a get of key index `index` on `conn`.
fn send(conn: &mut Conn, o: &BenchOptions, protocol: Protocol, index: u64) -> std::io::Result<()> {
    let key = bench_key(&o.key_prefix, index);
    let mut frame = Vec::with_capacity(128);
    match protocol {
        Protocol::Node => {
            let request = Request::Lookup {
                keys: vec![key.as_slice()],
                release: Vec::new(),
                stale_reads: 0,
                cached_reads: 0,
                cached_keys: Vec::new(),
                inline: true,
            };
            write_frame(&mut frame, index, &encode_body(&request))?;
            conn.expect(FRAME_HEADER_BYTES);
        }
        Protocol::Redis => {
            write!(frame, "*2\r\n$3\r\nGET\r\n${}\r\n", key.len())?;
            frame.extend_from_slice(&key);
            frame.extend_from_slice(b"\r\n");
            conn.expect(REDIS_LINE_BYTES);
        }
    }
    conn.index = index;
    conn.stage = Stage::Header;
    conn.sent_at = Instant::now();
    conn.first_byte_at = None;
    // A request of a few dozen bytes on a connection with nothing else outstanding: the
    // socket's buffer takes it at once.
    let mut rest = &frame[..];
    while !rest.is_empty() {
        match conn.stream.write(rest) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => rest = &rest[n..],
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
                std::thread::yield_now();
            }
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads what `conn` has; when its answer is complete, tallies it and returns when.
fn receive(conn: &mut Conn, tally: &mut Tally) -> std::io::Result<Option<Instant>> {
    loop {
        while conn.filled < conn.want {
            if !conn.read_some()? {
                return Ok(None);
            }
        }
        match conn.stage {
            Stage::Header => {
                let raw: [u8; FRAME_HEADER_BYTES] = conn.buf[..FRAME_HEADER_BYTES]
                    .try_into()
                    .map_err(|_| std::io::Error::other("short header"))?;
                let header =
                    FrameHeader::decode(&raw).map_err(|e| std::io::Error::other(e.to_string()))?;
                let len = header.body_len as usize;
                conn.stage = Stage::Body;
                conn.expect(len);
            }
            Stage::Body => {
                let outcome = match decode_response(&conn.buf[..conn.want]) {
                    Ok(Response::Lookup(mut outcomes)) if outcomes.len() == 1 => outcomes.pop(),
                    Ok(Response::Error(reply)) => {
                        tally.failed(reply.message);
                        None
                    }
                    _ => return Err(std::io::Error::other("unexpected answer to a lookup")),
                };
                tally.reads += 1;
                match outcome {
                    Some(Outcome::Ok(Some(d))) => {
                        // The node's word: bounded before anything is allocated for it.
                        if d.payload_offset as usize
                            > mooncake_kv_engine::format::MAX_PAYLOAD_OFFSET
                            || d.payload_len as usize > mooncake_kv_engine::MAX_VALUE_BYTES
                        {
                            return Err(std::io::Error::other(format!(
                                "implausible descriptor {d:?}"
                            )));
                        }
                        let len = d.payload_offset as usize + d.payload_len as usize;
                        conn.stage = Stage::Block;
                        conn.expect(len);
                        continue;
                    }
                    Some(Outcome::Ok(None)) => tally.misses += 1,
                    Some(Outcome::Err(reply)) => tally.failed(reply.message),
                    None => {}
                }
                return Ok(Some(Instant::now()));
            }
            Stage::Block => {
                let done = Instant::now();
                match mooncake_kv_engine::format::decode(&conn.buf[..conn.want]) {
                    Ok(block) => {
                        tally.bytes += block.payload.len() as u64;
                        if !check_value(conn.index, block.payload) {
                            tally.wrong += 1;
                        }
                    }
                    Err(error) => {
                        tally.wrong += 1;
                        tally.failed(format!("a block that does not verify: {error}"));
                    }
                }
                return Ok(Some(done));
            }
        }
    }
}

/// [`receive`] for a Redis reply: the line (`$LEN`, `$-1` for a miss, `-ERR ...`), then the
/// value and its CRLF, checked against the key's pattern.
fn receive_redis(conn: &mut Conn, tally: &mut Tally) -> std::io::Result<Option<Instant>> {
    loop {
        match conn.stage {
            Stage::Header | Stage::Body => {
                if let Some(end) = conn.buf[..conn.filled]
                    .windows(2)
                    .position(|w| w == b"\r\n")
                {
                    let line = &conn.buf[..end];
                    tally.reads += 1;
                    if let Some(message) = line.strip_prefix(b"-") {
                        tally.failed(String::from_utf8_lossy(message).into_owned());
                        return Ok(Some(Instant::now()));
                    }
                    let len: i64 = line
                        .strip_prefix(b"$")
                        .and_then(|n| std::str::from_utf8(n).ok()?.parse().ok())
                        .ok_or_else(|| std::io::Error::other("unexpected Redis reply"))?;
                    if len < 0 {
                        tally.misses += 1;
                        return Ok(Some(Instant::now()));
                    }
                    // The server's word: bounded before anything is allocated for it.
                    let len = usize::try_from(len)
                        .ok()
                        .filter(|&len| len <= mooncake_kv_engine::MAX_VALUE_BYTES)
                        .ok_or_else(|| std::io::Error::other("a Redis value over the limit"))?;
                    // What came with the line is the value's beginning.
                    let (start, filled) = (end + 2, conn.filled);
                    conn.stage = Stage::Block;
                    conn.expect(len + 2);
                    let early = filled - start;
                    if early > conn.want {
                        return Err(std::io::Error::other("more than one Redis reply"));
                    }
                    conn.buf.copy_within(start..filled, 0);
                    conn.filled = early;
                    continue;
                }
                if conn.filled == conn.want {
                    return Err(std::io::Error::other("a Redis reply line too long"));
                }
            }
            Stage::Block => {
                if conn.filled == conn.want {
                    let done = Instant::now();
                    let len = conn.want - 2;
                    tally.bytes += len as u64;
                    if conn.buf[len..conn.want] != *b"\r\n"
                        || !check_value(conn.index, &conn.buf[..len])
                    {
                        tally.wrong += 1;
                    }
                    return Ok(Some(done));
                }
            }
        }
        if !conn.read_some()? {
            return Ok(None);
        }
    }
}
