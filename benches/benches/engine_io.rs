//! Put and get_into throughput at KVCache block sizes, each next to a plain memcpy of the same
//! bytes in the same group, so the ratio can be read off one run on one machine.
//!
//! - `put`: one key overwritten again and again. Each put allocates an extent, copies and
//!   checksums the value into it, publishes it and frees the previous extent.
//! - `get_into`: one key read into a caller buffer: verify the header, copy the payload.
//! - `memcpy`: `copy_from_slice` of the same number of bytes between two buffers the same
//!   size, both warm in cache, as the engine's are after the first iterations.
//!
//! Run: `cargo bench -p mooncake-kv-benches --bench engine_io`.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use mooncake_kv_engine::{Engine, EngineConfig};

const SIZES: [usize; 3] = [64 << 10, 512 << 10, 2 << 20];

fn engine_io(c: &mut Criterion) {
    let engine = Engine::open(EngineConfig {
        dram_capacity_bytes: 256 << 20,
        ..EngineConfig::default()
    })
    .expect("open engine");
    for size in SIZES {
        let mut group = c.benchmark_group(format!("engine_io/{}KiB", size >> 10));
        group.throughput(Throughput::Bytes(size as u64));
        let value: Vec<u8> = (0..size).map(|i| (i * 31 + 7) as u8).collect();
        let key = format!("bench-block-{size}").into_bytes();
        let mut target = vec![0u8; size];

        group.bench_function(BenchmarkId::new("memcpy", size), |b| {
            b.iter(|| {
                target.copy_from_slice(black_box(&value));
                black_box(&target);
            })
        });
        group.bench_function(BenchmarkId::new("put", size), |b| {
            b.iter(|| engine.put(black_box(&key), black_box(&value)).expect("put"))
        });
        engine.put(&key, &value).expect("put");
        group.bench_function(BenchmarkId::new("get_into", size), |b| {
            b.iter(|| {
                let n = engine
                    .get_into(black_box(&key), &mut target)
                    .expect("get_into");
                black_box((n, &target));
            })
        });
        assert_eq!(target, value, "the benchmark must read back what it wrote");
        group.finish();
    }
}

criterion_group!(benches, engine_io);
criterion_main!(benches);
