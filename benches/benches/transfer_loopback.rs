//! One-sided reads next to their raw references, in one run on one machine:
//!
//! - `tcp/1_stream`: one 64 KiB / 512 KiB / 2 MiB read at a time over one connection of the tcp
//!   transport (owner in this process, on 127.0.0.1), next to `raw_tcp/1_stream`: a plain
//!   socket where a 4-byte request gets the same bytes back from a buffer, same sizes.
//! - `tcp/4_streams`: a batch of 64 reads spread over 4 connections, next to
//!   `raw_tcp/4_streams`: 4 plain sockets, 16 request/responses each, in parallel.
//! - `shm`: a read through the shared-memory transport next to `memcpy` of the same bytes.
//!
//! Criterion's median time of `tcp/1_stream` at 64 KiB is the p50 latency of a read.
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

/// A plain TCP server: for each 4-byte little-endian length it reads, it writes that many
/// bytes from a buffer.
fn raw_server() -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        let source = vec![7u8; 2 << 20];
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let source = source.clone();
            std::thread::spawn(move || {
                stream.set_nodelay(true).ok();
                let mut len = [0u8; 4];
                while stream.read_exact(&mut len).is_ok() {
                    let n = u32::from_le_bytes(len) as usize;
                    if stream.write_all(&source[..n]).is_err() {
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

fn raw_read(stream: &mut TcpStream, buf: &mut [u8]) {
    stream
        .write_all(&(buf.len() as u32).to_le_bytes())
        .expect("request");
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
    let src = |i: usize, size: usize| RemoteSlice {
        region_id: handle.region_id,
        offset: ((i * size) % (REGION_BYTES - size)) as u64,
        remote_key: handle.remote_key,
    };

    for size in SIZES {
        let mut group = c.benchmark_group(format!("transfer/{}KiB", size >> 10));
        group.throughput(Throughput::Bytes(size as u64));
        let mut buf = vec![0u8; size];
        let mut i = 0;
        group.bench_function(BenchmarkId::new("raw_tcp_1_stream", size), |b| {
            b.iter(|| raw_read(&mut raw_one, black_box(&mut buf)))
        });
        group.bench_function(BenchmarkId::new("tcp_1_stream", size), |b| {
            b.iter(|| {
                i += 1;
                one.read(src(i, size), black_box(&mut buf)).expect("read")
            })
        });
        assert!(
            buf.iter().all(|&x| x == 9),
            "the transport must deliver the region's bytes"
        );
        group.bench_function(BenchmarkId::new("memcpy", size), |b| {
            let source = vec![9u8; size];
            b.iter(|| buf.copy_from_slice(black_box(&source)))
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
                    for (stream, chunk) in raw_four.iter_mut().zip(bufs.chunks_mut(16)) {
                        scope.spawn(move || chunk.iter_mut().for_each(|buf| raw_read(stream, buf)));
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
