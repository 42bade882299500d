//! The cost of each eviction policy's bookkeeping with 1M resident blocks: one access (a
//! hit), one eviction followed by the insert that takes its place (a miss in steady
//! state), and ending a chain of 16 blocks (`Engine::end_chain`; LRU and S3-FIFO ignore it). Entries are chains of 16 blocks linked to their parents, the last one partial, as
//! the engine reports them for `put_chain_with`. Accesses pick entries uniformly at random from a pregenerated list,
//! so most touch memory outside the CPU caches, as a big cache's would. Also prints each
//! policy's memory per resident block.
//!
//! Run: `cargo bench -p mooncake-kv-benches --bench eviction_policy`.

use std::hint::black_box;

use criterion::{Criterion, criterion_group, criterion_main};
use mooncake_kv_engine::eviction::{
    EntryHint, EntryId, EvictionPolicy, EvictionPolicyKind, new_policy,
};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const RESIDENT: u32 = 1_000_000;
const CHAIN: u32 = 16;

fn key_hash(n: u64) -> u64 {
    let mut x = n.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

fn hint(n: u64, id: EntryId) -> EntryHint {
    let depth = id % CHAIN;
    EntryHint {
        key_hash: key_hash(n),
        parent: (depth > 0).then(|| id - 1),
        depth,
        // Each chain ends in a partial block, as most prompts do.
        partial: depth == CHAIN - 1,
    }
}

fn filled(kind: EvictionPolicyKind) -> Box<dyn EvictionPolicy> {
    let mut policy = new_policy(kind);
    for id in 0..RESIDENT {
        policy.insert(id, hint(u64::from(id), id));
    }
    policy
}

fn policies(c: &mut Criterion) {
    let mut rng = StdRng::seed_from_u64(11);
    let accesses: Vec<EntryId> = (0..1 << 20)
        .map(|_| rng.random_range(0..RESIDENT))
        .collect();
    for kind in EvictionPolicyKind::ALL {
        let mut policy = filled(kind);
        eprintln!(
            "{kind}: {} bytes of bookkeeping for {} resident blocks = {:.1} bytes per block",
            policy.memory_bytes(),
            policy.len(),
            policy.memory_bytes() as f64 / policy.len() as f64
        );
        let mut group = c.benchmark_group(format!("eviction_policy/1M_resident/{kind}"));
        let mut next = 0;
        group.bench_function("access", |b| {
            b.iter(|| {
                policy.access(black_box(accesses[next & (accesses.len() - 1)]));
                next += 1;
            })
        });
        // Steady state: each iteration evicts one block and inserts a new one in its place.
        let mut fresh = u64::from(RESIDENT);
        group.bench_function("evict_and_insert", |b| {
            b.iter(|| {
                let victim = policy.pop_victim(&mut |_| true).expect("a victim");
                fresh += 1;
                // The new block heads a chain: its would-be parent may be gone.
                let hint = EntryHint {
                    key_hash: key_hash(fresh),
                    parent: None,
                    depth: 0,
                    partial: false,
                };
                policy.insert(black_box(victim), hint);
            })
        });
        eprintln!(
            "{kind}: after the evictions, {:.1} bytes per resident block (with what it \
             remembers of evicted keys)",
            policy.memory_bytes() as f64 / policy.len() as f64
        );
        // A caller ends a whole chain (`Engine::end_chain`): on a freshly filled policy, so
        // each of the 16 blocks is still linked to its parent and the walk goes the full
        // length.
        let mut policy = filled(kind);
        group.bench_function("chain_ended_16_blocks", |b| {
            b.iter(|| {
                let chain = accesses[next & (accesses.len() - 1)] / CHAIN;
                policy.chain_ended(black_box(chain * CHAIN + CHAIN - 1));
                next += 1;
            })
        });
        group.finish();
        assert_eq!(policy.len(), RESIDENT as usize);
    }
}

criterion_group!(benches, policies);
criterion_main!(benches);
