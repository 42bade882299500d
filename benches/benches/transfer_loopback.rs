//! One-sided reads next to their raw references, in one run on one machine:
//!
//! - `tcp_1_stream`: one 64 KiB / 512 KiB / 2 MiB read at a time over one connection of the
//!   tcp transport (owner in this process, on 127.0.0.1), next to `raw_tcp_1_stream`: a plain
//!   socket where an 8-byte request (offset, length) gets those bytes back from a buffer the
//!   size of the region. Both walk the same offsets through 64 MiB, so both read memory as
//!   cold as each other.
//! - `tcp_4_streams`: a batch of 64 reads spread over 4 connections, next to
//!   `raw_tcp_4_streams`: 4 plain sockets, 16 request/responses each, in parallel.
//! - `shm`: a read through the shared-memory transport next to `memcpy` of the same bytes (the
//!   same offsets of a 64 MiB buffer).
//!
//! Criterion's median time of `tcp_1_stream` at 64 KiB is the p50 latency of a read.
//! Run: `cargo bench -p mooncake-kv-benches --bench transfer_loopback`.

use std::hint::black_box;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::time::Duration;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use mooncake_kv_transfer::{
    MemfdRegion, ReadOp, Registry, RemoteSlice, ShmServer, ShmTransport, TcpServer, TcpTransport,
    Transport,
};

const SIZES: [usize; 3] = [64 << 10, 512 << 10, 2 << 20];
const REGION_BYTES: usize = 64 << 20;

/// The offset of the `i`th read of `size` bytes: a walk through the region.
fn offset_of(i: usize, size: usize) -> usize {
    (i * size) % (REGION_BYTES - size)
}

/// A plain TCP server: for each request (u32 offset, u32 length, little-endian) it writes
/// those bytes of a buffer as large as the registered region.
fn raw_server() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    let source: Arc<Vec<u8>> = Arc::new(vec![7u8; REGION_BYTES]);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let source = Arc::clone(&source);
            std::thread::spawn(move || {
                stream.set_nodelay(true).ok();
                let mut request = [0u8; 8];
                while stream.read_exact(&mut request).is_ok() {
                    let offset =
                        u32::from_le_bytes([request[0], request[1], request[2], request[3]]);
                    let len = u32::from_le_bytes([request[4], request[5], request[6], request[7]]);
                    let (offset, len) = (offset as usize, len as usize);
                    if stream.write_all(&source[offset..offset + len]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    addr
}

fn raw_connect(addr: std::net::SocketAddr) -> TcpStream {
    let stream = TcpStream::connect(addr).expect("connect");
    stream.set_nodelay(true).expect("nodelay");
    stream
}

fn raw_read(stream: &mut TcpStream, offset: usize, buf: &mut [u8]) {
    let mut request = [0u8; 8];
    request[..4].copy_from_slice(&(offset as u32).to_le_bytes());
    request[4..].copy_from_slice(&(buf.len() as u32).to_le_bytes());
    stream.write_all(&request).expect("request");
    stream.read_exact(buf).expect("response");
}

fn transfer(c: &mut Criterion) {
    let registry = Arc::new(Registry::new().expect("registry"));
    let region = Arc::new(MemfdRegion::new(REGION_BYTES).expect("region"));
    region.write(0, &vec![9u8; REGION_BYTES]);
    let handle = registry.register(region).expect("register");
    let server = TcpServer::bind("127.0.0.1:0", Arc::clone(&registry)).expect("tcp server");
    let dir = tempfile::tempdir().expect("tempdir");
    let shm_server =
        ShmServer::bind(dir.path().join("shm.sock"), Arc::clone(&registry)).expect("shm server");
    let one = TcpTransport::new(server.local_addr(), 1, Duration::from_secs(10)).expect("tcp");
    let four = TcpTransport::new(server.local_addr(), 4, Duration::from_secs(10)).expect("tcp");
    let shm = ShmTransport::connect(shm_server.path()).expect("shm");
    let raw_addr = raw_server();
    let mut raw_one = raw_connect(raw_addr);
    let mut raw_four: Vec<TcpStream> = (0..4).map(|_| raw_connect(raw_addr)).collect();
    let big_source = vec![9u8; REGION_BYTES];
    let src = |i: usize, size: usize| RemoteSlice {
        region_id: handle.region_id,
        offset: offset_of(i, size) as u64,
        remote_key: handle.remote_key,
    };

    for size in SIZES {
        let mut group = c.benchmark_group(format!("transfer/{}KiB", size >> 10));
        group.throughput(Throughput::Bytes(size as u64));
        let mut buf = vec![0u8; size];
        let mut i = 0;
        group.bench_function(BenchmarkId::new("raw_tcp_1_stream", size), |b| {
            b.iter(|| {
                i += 1;
                raw_read(&mut raw_one, offset_of(i, size), black_box(&mut buf))
            })
        });
        group.bench_function(BenchmarkId::new("tcp_1_stream", size), |b| {
            b.iter(|| {
                i += 1;
                one.read(src(i, size), black_box(&mut buf)).expect("read")
            })
        });
        // Checked on a read of its own, so that a run filtered to other benches checks it too.
        one.read(src(i, size), &mut buf).expect("read");
        assert!(
            buf.iter().all(|&x| x == 9),
            "the transport must deliver the region's bytes"
        );
        group.bench_function(BenchmarkId::new("memcpy", size), |b| {
            b.iter(|| {
                i += 1;
                let offset = offset_of(i, size);
                buf.copy_from_slice(black_box(&big_source[offset..offset + size]))
            })
        });
        group.bench_function(BenchmarkId::new("shm", size), |b| {
            b.iter(|| {
                i += 1;
                shm.read(src(i, size), black_box(&mut buf)).expect("read")
            })
        });
        group.finish();

        let mut group = c.benchmark_group(format!("transfer_4_streams/{}KiB", size >> 10));
        group.throughput(Throughput::Bytes(64 * size as u64));
        let mut bufs: Vec<Vec<u8>> = (0..64).map(|_| vec![0u8; size]).collect();
        group.bench_function(BenchmarkId::new("raw_tcp_4_streams", size), |b| {
            b.iter(|| {
                std::thread::scope(|scope| {
                    for (s, (stream, chunk)) in
                        raw_four.iter_mut().zip(bufs.chunks_mut(16)).enumerate()
                    {
                        scope.spawn(move || {
                            for (k, buf) in chunk.iter_mut().enumerate() {
                                raw_read(stream, offset_of(s * 16 + k, size), buf);
                            }
                        });
                    }
                })
            })
        });
        group.bench_function(BenchmarkId::new("tcp_4_streams", size), |b| {
            b.iter(|| {
                let mut ops: Vec<ReadOp<'_>> = bufs
                    .iter_mut()
                    .enumerate()
                    .map(|(k, dst)| ReadOp {
                        src: src(k, size),
                        dst,
                    })
                    .collect();
                for result in four.read_batch(&mut ops) {
                    result.expect("read");
                }
            })
        });
        group.finish();
    }
}

criterion_group!(benches, transfer);
criterion_main!(benches);
