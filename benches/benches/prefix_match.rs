//! `prefix_match` over an index of 1M keys: 15,625 chains of 64 blocks keyed by 32-byte
//! content hashes (what vLLM and LMCache use), each query a whole chain that is present, so
//! every key of it is looked up. Throughput is in keys per second.
//!
//! Run: `cargo bench -p mooncake-kv-benches --bench prefix_match`.

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use mooncake_kv_engine::{Engine, EngineConfig};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const CHAIN_LEN: usize = 64;
const CHAINS: usize = 1_000_000 / CHAIN_LEN;

/// A 32-byte key standing in for the hash of chain `chain`'s block `block`.
fn key(chain: usize, block: usize) -> [u8; 32] {
    let mut key = [0u8; 32];
    let mut state = (chain as u64) << 32 | block as u64;
    for word in key.chunks_mut(8) {
        state = state.wrapping_mul(0x9e37_79b9_7f4a_7c15).rotate_left(29) ^ 0xd1b5_4a32_d192_ed03;
        word.copy_from_slice(&state.to_le_bytes());
    }
    key
}

fn prefix_match(c: &mut Criterion) {
    // Empty payloads: a block is its 64-byte header and key, one 512-byte allocation unit.
    let engine = Engine::open(EngineConfig {
        dram_capacity_bytes: 1 << 30,
        high_watermark_percent: 100,
        low_watermark_percent: 99,
        ..EngineConfig::default()
    })
    .expect("open engine");
    for chain in 0..CHAINS {
        for block in 0..CHAIN_LEN {
            engine.put(&key(chain, block), b"").expect("put");
        }
    }
    assert_eq!(engine.stats().tiers[0].blocks, (CHAINS * CHAIN_LEN) as u64);

    let mut rng = StdRng::seed_from_u64(7);
    let queries: Vec<Vec<[u8; 32]>> = (0..1024)
        .map(|_| {
            let chain = rng.random_range(0..CHAINS);
            (0..CHAIN_LEN).map(|block| key(chain, block)).collect()
        })
        .collect();
    let queries: Vec<Vec<&[u8]>> = queries
        .iter()
        .map(|q| q.iter().map(|k| &k[..]).collect())
        .collect();

    let mut group = c.benchmark_group("prefix_match/1M_keys");
    group.throughput(Throughput::Elements(CHAIN_LEN as u64));
    let mut next = 0;
    group.bench_function("chain_of_64_all_present", |b| {
        b.iter(|| {
            next = (next + 1) % queries.len();
            let matched = engine.prefix_match(black_box(&queries[next]));
            assert_eq!(matched, CHAIN_LEN);
        })
    });
    group.finish();
}

criterion_group!(benches, prefix_match);
criterion_main!(benches);
