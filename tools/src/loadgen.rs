//! `kvctl bench --connections N`: many connections driven by a few threads, so that one
//! process can load a node with thousands of connections without the load generator being
//! what is measured. Each thread runs an event loop (epoll) over its share of the
//! connections and keeps one get in flight on every one of them: a lookup whose answer
//! brings the block inline, checked (header, key and payload CRCs, then the value's own
//! pattern) as the library's reads check it. A get's latency runs from when its request was
//! ready, which in this closed loop is when the connection's previous answer was complete.

use std::io::{ErrorKind, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use mooncake_kv_replication::proto::{
    FRAME_HEADER_BYTES, FrameHeader, Outcome, Request, Response, decode_response, encode_body,
    read_frame, write_frame,
};
use rustix::event::epoll;

use crate::bench::{
    BenchOptions, BenchReport, KeyPicker, Tally, bench_key, check_value, summarize, thread_rng,
};

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
    let threads = o.concurrency.clamp(1, connections.max(1));
    let mut shares: Vec<Vec<TcpStream>> = (0..threads).map(|_| Vec::new()).collect();
    for i in 0..connections.max(1) {
        shares[i % threads].push(hello(addr, token)?);
    }
    let started = Instant::now();
    let measure_from = started + o.warm_up;
    let until = measure_from + o.duration;
    let tallies: std::io::Result<Vec<Tally>> = std::thread::scope(|scope| {
        let handles: Vec<_> = shares
            .into_iter()
            .enumerate()
            .map(|(t, share)| scope.spawn(move || drive(share, o, t as u64, measure_from, until)))
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
    write_frame(&mut stream, 0, &encode_body(&Request::Hello { token }))?;
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
        };
        send(&mut conn, o, next_key())?;
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
            if let Some(done) = receive(conn, into)? {
                into.read_ns
                    .push(u64::try_from((done - conn.sent_at).as_nanos()).unwrap_or(u64::MAX));
                send(conn, o, next_key())?;
            }
        }
    }
    tally.wrong += warm.wrong;
    tally.errors += warm.errors;
    tally.first_error = tally.first_error.or(warm.first_error);
    Ok(tally)
}

/// Sends a get of key index `index` on `conn`.
fn send(conn: &mut Conn, o: &BenchOptions, index: u64) -> std::io::Result<()> {
    let key = bench_key(&o.key_prefix, index);
    let request = Request::Lookup {
        keys: vec![key.as_slice()],
        release: Vec::new(),
        stale_reads: 0,
        cached_reads: 0,
        cached_keys: Vec::new(),
        inline: true,
    };
    let mut frame = Vec::with_capacity(128);
    write_frame(&mut frame, index, &encode_body(&request))?;
    conn.index = index;
    conn.stage = Stage::Header;
    conn.expect(FRAME_HEADER_BYTES);
    conn.sent_at = Instant::now();
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
            match conn.stream.read(&mut conn.buf[conn.filled..conn.want]) {
                Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
                Ok(n) => conn.filled += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(None),
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
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
