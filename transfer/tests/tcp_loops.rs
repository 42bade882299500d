//! The tcp data plane's event loops, over real sockets in this process: connections cost no
//! thread each, and a peer that sends requests without reading the answers is served only as
//! fast as it reads, while other readers are served at once and exactly.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mooncake_kv_transfer::wire::{RESPONSE_BYTES, ReadRequest, ReadResponse, Status};
use mooncake_kv_transfer::{
    MemfdRegion, RegionHandle, Registry, RemoteSlice, TcpServer, TcpTransport, Transport,
};

const REGION_BYTES: usize = 8 << 20;

fn pattern(i: usize) -> u8 {
    (i as u8).wrapping_mul(13) ^ (i >> 9) as u8
}

fn server() -> (Arc<Registry>, TcpServer, RegionHandle) {
    let registry = Arc::new(Registry::new().expect("registry"));
    let server = TcpServer::bind("127.0.0.1:0", Arc::clone(&registry)).expect("bind");
    let region = MemfdRegion::new(REGION_BYTES).expect("region");
    let bytes: Vec<u8> = (0..REGION_BYTES).map(pattern).collect();
    region.write(0, &bytes);
    let handle = registry.register(Arc::new(region)).expect("register");
    (registry, server, handle)
}

fn threads() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:")?.trim().parse().ok())
        .expect("a Threads line")
}

/// Reads `len` bytes at `offset` through a new transport and checks every byte.
fn read_exact_bytes(server: &TcpServer, handle: &RegionHandle, offset: usize, len: usize) {
    let transport =
        TcpTransport::new(server.local_addr(), 1, Duration::from_secs(5)).expect("transport");
    let mut buf = vec![0u8; len];
    transport
        .read(
            RemoteSlice {
                region_id: handle.region_id,
                offset: offset as u64,
                remote_key: handle.remote_key,
            },
            &mut buf,
        )
        .expect("read");
    assert!(
        buf.iter()
            .enumerate()
            .all(|(i, &b)| b == pattern(offset + i)),
        "wrong bytes at offset {offset}"
    );
}

#[test]
fn a_thousand_connections_take_no_thread_each() {
    let (_registry, server, handle) = server();
    let before = threads();
    let quiet: Vec<TcpStream> = (0..1000)
        .map(|_| TcpStream::connect(server.local_addr()).expect("connect"))
        .collect();
    // Let the acceptor take them all.
    std::thread::sleep(Duration::from_millis(300));
    let during = threads();
    assert!(
        during <= before + 4,
        "{} threads with 1,000 connections open, {before} before",
        during
    );
    read_exact_bytes(&server, &handle, 12_345, 1 << 20);
    drop(quiet);
}

#[test]
fn a_peer_that_does_not_read_its_answers_holds_back_only_itself() {
    let (_registry, server, handle) = server();
    // 4,096 requests of 1 MiB each, sent without reading a byte: 4 GiB of answers.
    let mut greedy = TcpStream::connect(server.local_addr()).expect("connect");
    let requests: Vec<u8> = (0..4096u64)
        .flat_map(|i| {
            ReadRequest {
                request_id: i,
                region_id: handle.region_id,
                offset: (i % 7) << 20,
                remote_key: handle.remote_key,
                len: 1 << 20,
            }
            .encode()
        })
        .collect();
    let writer = {
        let mut greedy = greedy.try_clone().expect("clone");
        std::thread::spawn(move || {
            // Blocks once the node stops reading (its answers are not taken): that is the
            // point. Ends when the socket is closed below.
            let _ = greedy.write_all(&requests);
        })
    };
    std::thread::sleep(Duration::from_millis(300));
    // Others are served at once, and exactly.
    let started = Instant::now();
    for offset in [0, 3 << 20, (6 << 20) + 17] {
        read_exact_bytes(&server, &handle, offset, 1 << 20);
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "other readers waited {:?} behind a peer that does not read",
        started.elapsed()
    );
    // The greedy peer's first answers are whole and right.
    greedy
        .set_read_timeout(Some(Duration::from_secs(5)))
        .expect("timeout");
    let mut payload = vec![0u8; 1 << 20];
    for i in 0..8u64 {
        let mut header = [0u8; RESPONSE_BYTES];
        greedy.read_exact(&mut header).expect("an answer's header");
        let response = ReadResponse::decode(&header).expect("a response");
        assert_eq!(
            (response.request_id, response.status, response.len),
            (i, Status::Ok, 1 << 20)
        );
        greedy.read_exact(&mut payload).expect("an answer's bytes");
        let offset = ((i % 7) << 20) as usize;
        assert!(
            payload
                .iter()
                .enumerate()
                .all(|(j, &b)| b == pattern(offset + j)),
            "answer {i} has wrong bytes"
        );
    }
    greedy.shutdown(std::net::Shutdown::Both).expect("shutdown");
    writer.join().expect("the writer");
}
