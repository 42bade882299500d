//! The replay's tests: trace parsing and its limits, the simulated policies against MIN, and
//! the engine and cluster replays against their simulations.

use mooncake_kv_engine::eviction::EvictionPolicyKind;
use mooncake_kv_replication::placement::{self, Member};

use super::*;
use std::io::Write;

fn trace(chains: &[&[u64]]) -> Trace {
    Trace {
        requests: chains
            .iter()
            .map(|c| Request {
                input_length: c.len() as u64 * 4 - 1,
                hash_ids: c.to_vec(),
            })
            .collect(),
        tokens_per_block: 4,
    }
}

#[test]
fn counts_prefix_hits_in_blocks_and_tokens() {
    let t = trace(&[&[1, 2, 3], &[1, 2, 4], &[5, 2, 3]]);
    let h = t.ceiling();
    // Second request: 1 and 2 hit; third: 5 misses, so 2 and 3 do not count.
    assert_eq!((h.hit_blocks, h.blocks), (2, 9));
    assert_eq!((h.hit_tokens, h.tokens), (8, 3 * 11));
    for kind in EvictionPolicyKind::ALL {
        assert_eq!(simulate(&t, kind, 100), h, "{kind}");
    }
    assert_eq!(belady(&t, 100), h);
}

#[test]
fn a_prompt_ends_partial_only_inside_its_last_block() {
    let request = |input_length, blocks: u64| Request {
        input_length,
        hash_ids: (0..blocks).collect(),
    };
    let t = trace(&[]);
    // 4 tokens per block.
    assert!(t.ends_partial(&request(7, 2)));
    assert!(!t.ends_partial(&request(8, 2)));
    assert!(t.ends_partial(&request(1, 1)));
    // Lengths that disagree with the chain count as full blocks, as in the token count.
    assert!(!t.ends_partial(&request(100, 2)));
    assert!(!t.ends_partial(&request(3, 2)));
    assert!(!t.ends_partial(&request(5, 0)));
}

#[test]
fn belady_beats_lru_on_a_loop() {
    // A loop over 4 chains of 2 blocks with room for 6 blocks: LRU always misses.
    let chains: Vec<Vec<u64>> = (0..40)
        .map(|i| vec![(i % 4) * 2, (i % 4) * 2 + 1])
        .collect();
    let refs: Vec<&[u64]> = chains.iter().map(Vec::as_slice).collect();
    let t = trace(&refs);
    let lru = simulate(&t, EvictionPolicyKind::Lru, 6);
    let min = belady(&t, 6);
    assert_eq!(lru.hit_blocks, 0);
    assert!(min.hit_blocks > 40, "{min:?}");
}

#[test]
fn cluster_shapes_parse_and_refuse_what_cannot_be() {
    let shape: ClusterShape = "3x2".parse().unwrap();
    assert_eq!(
        shape,
        ClusterShape {
            nodes: 3,
            replicas: 2
        }
    );
    assert_eq!(shape.to_string(), "3x2");
    assert_eq!(shape.per_node(10), 7);
    assert_eq!("1X1".parse::<ClusterShape>(), Ok(ClusterShape::SINGLE));
    for bad in [
        "3", "x2", "3x", "0x1", "2x0", "2x3", "300x1", "-1x1", "3x2x1",
    ] {
        assert!(bad.parse::<ClusterShape>().is_err(), "{bad}");
    }
}

#[test]
fn a_cluster_with_room_for_everything_hits_every_repeat() {
    let t = conversations();
    let unique = t.unique_blocks();
    for shape in ["1x1", "3x1", "3x2", "5x3", "4x4"] {
        let shape: ClusterShape = shape.parse().unwrap();
        for kind in EvictionPolicyKind::ALL {
            let hits = simulate_cluster(&t, kind, unique, shape, &[]);
            assert_eq!(hits, t.ceiling(), "{kind} on {shape}");
        }
    }
}

#[test]
fn each_member_holds_its_share_of_the_capacity() {
    // Two members, one copy each: room for 2 blocks in all, 1 on each.
    let shape: ClusterShape = "2x1".parse().unwrap();
    let members = [Member::full(0), Member::full(1)];
    let member_of = |id: u64| placement::replicas(&id.to_le_bytes(), &members, 1)[0];
    let a = 0;
    let same = (1..).find(|&id| member_of(id) == member_of(a)).unwrap();
    let other = (1..).find(|&id| member_of(id) != member_of(a)).unwrap();
    let lru = EvictionPolicyKind::Lru;
    // a and `other` live on different members: both stay, as in one cache of 2.
    let t = trace(&[&[a], &[other], &[a], &[other]]);
    assert_eq!(simulate_cluster(&t, lru, 2, shape, &[]).hit_blocks, 2);
    assert_eq!(simulate(&t, lru, 2).hit_blocks, 2);
    // a and `same` share a member with room for one: the second pushes the first out,
    // where one cache of 2 would have kept both.
    let t = trace(&[&[a], &[same], &[a]]);
    assert_eq!(simulate_cluster(&t, lru, 2, shape, &[]).hit_blocks, 0);
    assert_eq!(simulate(&t, lru, 2).hit_blocks, 1);
    // With a second copy of each block, each member has room for two.
    let both: ClusterShape = "2x2".parse().unwrap();
    assert_eq!(simulate_cluster(&t, lru, 2, both, &[]).hit_blocks, 1);
}

#[test]
fn the_reuse_oracle_caches_only_blocks_with_a_future() {
    // Chain [1, 2] comes back after three one-off chains that fill a cache of 6 blocks:
    // LRU has let it go; LRU that skips the one-offs keeps it.
    let t = trace(&[&[1, 2], &[10, 11], &[12, 13], &[14, 15], &[1, 2], &[3]]);
    assert_eq!(simulate(&t, EvictionPolicyKind::Lru, 6).hit_blocks, 0);
    assert_eq!(lru_with_reuse_oracle(&t, 6).hit_blocks, 2);
    // With room for everything it is the ceiling; with room for nothing, no hits.
    assert_eq!(lru_with_reuse_oracle(&t, 100), t.ceiling());
    assert_eq!(lru_with_reuse_oracle(&t, 0).hit_blocks, 0);
}

#[test]
fn the_most_used_blocks_stay_through_a_scan_but_lose_where_popularity_moves() {
    let lru = EvictionPolicyKind::Lru;
    // A hot chain [1, 2] between one-off chains that fill a cache of 2: LRU lets it go each
    // time, the most used blocks keep it from its first use on.
    let t = trace(&[
        &[1, 2],
        &[10, 11],
        &[1, 2],
        &[12, 13],
        &[1, 2],
        &[14, 15],
        &[1, 2],
    ]);
    assert_eq!(simulate(&t, lru, 2).hit_blocks, 0);
    assert_eq!(most_used(&t, 2).hit_blocks, 6);
    // Blocks used equally often: the first used go in, so a chain's head before its tail (a
    // tail without its head would never be a prefix hit).
    let t = trace(&[&[1, 2, 3], &[1, 2, 3]]);
    assert_eq!(most_used(&t, 2).hit_blocks, 2);
    // Popularity that moves: block 1 three times, then block 2 twice, room for one. The most
    // used keeps 1 throughout; LRU follows the change.
    let t = trace(&[&[1], &[1], &[1], &[2], &[2]]);
    assert_eq!(most_used(&t, 1).hit_blocks, 2);
    assert_eq!(simulate(&t, lru, 1).hit_blocks, 3);
    // With room for everything it is the ceiling; with room for nothing, no hits.
    assert_eq!(most_used(&t, 100), t.ceiling());
    assert_eq!(most_used(&t, 0).hit_blocks, 0);
}

#[test]
fn the_engine_replay_agrees_with_the_simulation_when_nothing_is_evicted() {
    let chains: Vec<Vec<u64>> = (0..200u64)
        .map(|i| (0..(i % 7 + 1)).map(|j| (i % 13) * 10 + j).collect())
        .collect();
    let refs: Vec<&[u64]> = chains.iter().map(Vec::as_slice).collect();
    let t = trace(&refs);
    let setup = EngineReplay {
        policy: EvictionPolicyKind::PrefixAware,
        dram_blocks: 1000,
        block_bytes: 1024,
        nvme: None,
        ended: Vec::new(),
    };
    let got = replay_engine(&t, &setup, |_| {}).unwrap();
    assert_eq!(got.hits, t.ceiling());
    assert_eq!(got.wrong_blocks, 0);
    assert_eq!(got.dram_hit_blocks, got.hits.hit_blocks);
}

#[test]
fn a_chain_ends_where_nothing_after_its_head_is_used_again() {
    let t = trace(&[&[0, 1, 2], &[0, 1, 2, 3], &[0, 4], &[0, 5], &[0], &[0, 5]]);
    // Request 0 goes on in request 1; requests 1 and 2 are the last of theirs; request 3
    // goes on in request 5; a chain of its head alone is shared, never ended.
    assert_eq!(
        t.ended_chains(1.0),
        vec![false, true, true, false, false, true]
    );
    assert_eq!(t.ended_chains(0.0), vec![false; 6]);
    // A fraction marks about that share of the ended chains.
    let chains: Vec<Vec<u64>> = (0..4000).map(|i| vec![0, i + 1]).collect();
    let refs: Vec<&[u64]> = chains.iter().map(Vec::as_slice).collect();
    let marked = trace(&refs)
        .ended_chains(0.25)
        .iter()
        .filter(|&&e| e)
        .count();
    assert!((900..1100).contains(&marked), "{marked} of 4000");
}

/// Conversations under a shared head block 0: a fifth go on for several turns, the rest
/// end after one; each turn adds two blocks to its conversation's chain.
fn conversations() -> Trace {
    let mut chains: Vec<Vec<u64>> = Vec::new();
    let mut open: Vec<(Vec<u64>, u64)> = Vec::new();
    let mut state = 7u64;
    let mut next_block = 1;
    for _ in 0..4000 {
        state = mix(state);
        if open.is_empty() || state % 3 != 0 {
            let turns = if (state >> 8) % 5 == 0 { 6 } else { 1 };
            open.push((vec![0], turns));
        }
        let pick = (state >> 16) as usize % open.len().min(8);
        let at = open.len() - 1 - pick;
        let (chain, turns) = &mut open[at];
        chain.extend([next_block, next_block + 1]);
        next_block += 2;
        chains.push(chain.clone());
        *turns -= 1;
        if *turns == 0 {
            open.remove(at);
        }
    }
    let refs: Vec<&[u64]> = chains.iter().map(Vec::as_slice).collect();
    trace(&refs)
}

#[test]
fn end_hints_keep_the_conversations_that_go_on() {
    let t = conversations();
    let capacity = t.unique_blocks() / 20;
    let ended = t.ended_chains(1.0);
    let plain = simulate(&t, EvictionPolicyKind::PrefixAware, capacity).block_ratio();
    let hinted =
        simulate_with_hints(&t, EvictionPolicyKind::PrefixAware, capacity, &ended).block_ratio();
    assert!(hinted > plain + 0.1, "hinted {hinted:.3}, plain {plain:.3}");
    // LRU ignores the hint.
    assert_eq!(
        simulate_with_hints(&t, EvictionPolicyKind::Lru, capacity, &ended),
        simulate(&t, EvictionPolicyKind::Lru, capacity)
    );
    // The engine, told through `end_chain`, does what the simulation does.
    let setup = EngineReplay {
        policy: EvictionPolicyKind::PrefixAware,
        dram_blocks: capacity,
        block_bytes: 8192,
        nvme: None,
        ended,
    };
    let engine = replay_engine(&t, &setup, |_| {}).unwrap();
    assert_eq!(engine.wrong_blocks, 0);
    let e = engine.hits.block_ratio();
    assert!(
        (e - hinted).abs() < 0.02,
        "engine {e:.3}, simulated {hinted:.3}"
    );
}

/// `requests` requests of 2 to 7 blocks from 150 conversations that share their heads, drawn
/// from `seed`.
fn shared_heads(seed: u64, requests: usize) -> Trace {
    let mut chains = Vec::new();
    let mut state = seed;
    for _ in 0..requests {
        state = mix(state);
        let conversation = state % 150;
        let len = 2 + (state >> 20) % 6;
        chains.push(
            (0..len)
                .map(|j| conversation * 100 + j)
                .collect::<Vec<u64>>(),
        );
    }
    let refs: Vec<&[u64]> = chains.iter().map(Vec::as_slice).collect();
    trace(&refs)
}

#[test]
fn the_engine_replay_tracks_the_simulated_policy_under_eviction() {
    // Chains that share heads, with room for a fifth of the blocks.
    let t = shared_heads(7, 3000);
    let capacity = t.unique_blocks() / 5;
    for kind in EvictionPolicyKind::ALL {
        let setup = EngineReplay {
            policy: kind,
            dram_blocks: capacity,
            block_bytes: 8192,
            nvme: None,
            ended: Vec::new(),
        };
        let engine = replay_engine(&t, &setup, |_| {}).unwrap();
        let sim = simulate(&t, kind, capacity);
        assert_eq!(engine.wrong_blocks, 0);
        // The simulation makes room as the engine does and hashes keys as the replayed engine
        // does: the same blocks hit, not just about as many. (This trace fills DRAM to the
        // byte: a watermark of 100% that fell short of the capacity made the engine evict
        // down to its low watermark, 1% more than the simulation, until it was exact.)
        assert_eq!(
            engine.hits.hit_blocks, sim.hit_blocks,
            "{kind}: engine against simulation"
        );
        assert!(
            belady(&t, capacity).block_ratio() >= sim.block_ratio(),
            "{kind}: beat MIN"
        );
    }
}

#[test]
fn the_cluster_replay_tracks_its_simulation() {
    // As above, on three real nodes holding each block twice, through a cluster client.
    let t = shared_heads(11, 1500);
    let capacity = t.unique_blocks() / 5;
    let shape: ClusterShape = "3x2".parse().unwrap();
    let ended = t.ended_chains(1.0);
    for (kind, ended) in [
        (EvictionPolicyKind::Lru, Vec::new()),
        (EvictionPolicyKind::PrefixAware, ended),
    ] {
        let setup = EngineReplay {
            policy: kind,
            dram_blocks: capacity,
            block_bytes: 16 << 10,
            nvme: None,
            ended: ended.clone(),
        };
        let cluster = replay_cluster(&t, &setup, shape, |_| {}).unwrap();
        let sim = simulate_cluster(&t, kind, capacity, shape, &ended);
        assert_eq!(cluster.wrong_blocks, 0);
        assert!(cluster.dram_evictions > 0);
        assert!(cluster.hits.hit_blocks > 0);
        let (c, s) = (cluster.hits.block_ratio(), sim.block_ratio());
        assert!(
            (c - s).abs() < 0.05,
            "{kind}: cluster {c:.3} vs simulation {s:.3}"
        );
    }
}

#[test]
fn rejects_malformed_traces_with_the_line_number() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("t.jsonl");
    let mut f = std::fs::File::create(&path).unwrap();
    writeln!(
        f,
        r#"{{"timestamp": 0, "input_length": 10, "hash_ids": [1, 2]}}"#
    )
    .unwrap();
    writeln!(f).unwrap();
    writeln!(f, r#"{{"timestamp": 1, "hash_ids": [1]}}"#).unwrap();
    drop(f);
    let err = format!("{:#}", Trace::load(&path, 512).unwrap_err());
    assert!(err.contains("t.jsonl:3"), "{err}");
    assert!(err.contains("input_length"), "{err}");

    std::fs::write(&path, "").unwrap();
    assert!(format!("{:#}", Trace::load(&path, 512).unwrap_err()).contains("no requests"));
    std::fs::write(&path, r#"{"input_length": 5, "hash_ids": [-1]}"#).unwrap();
    assert!(Trace::load(&path, 512).is_err());
    assert!(Trace::load(&dir.path().join("missing"), 512).is_err());

    std::fs::write(&path, "{\"input_length\": 700, \"hash_ids\": [3, 4]}\n").unwrap();
    let t = Trace::load(&path, 512).unwrap();
    assert_eq!(t.requests[0].hash_ids, vec![3, 4]);
    assert_eq!(t.ceiling().tokens, 700);
}

mod generated {
    use crate::replay::generate::{GeneratedRequest, Regime, TOKENS_PER_BLOCK};
    use crate::replay::{EngineReplay, Trace, replay_engine, simulate};
    use mooncake_kv_engine::EvictionPolicyKind;

    #[test]
    fn the_engine_replay_gives_the_simulated_hits_on_growing_conversations() {
        // Growing chains under a small cache: where the simulation once evicted the block it
        // had just put (prefix-aware evicts deep blocks first) and the engine, which makes
        // room first and pins the block before the one it puts, did not.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("conversations.jsonl");
        let mut file = std::fs::File::create(&path).unwrap();
        crate::replay::generate::write_trace(&mut file, generate(Regime::Conversations, 1_500, 1))
            .unwrap();
        let t = Trace::load(&path, TOKENS_PER_BLOCK).unwrap();
        let capacity = t.unique_blocks() / 20;
        for kind in [
            EvictionPolicyKind::PrefixAware,
            EvictionPolicyKind::Adaptive,
        ] {
            let setup = EngineReplay {
                policy: kind,
                dram_blocks: capacity,
                block_bytes: 16384,
                nvme: None,
                ended: Vec::new(),
            };
            let engine = replay_engine(&t, &setup, |_| {}).unwrap();
            assert_eq!(engine.wrong_blocks, 0);
            assert_eq!(
                engine.hits.hit_blocks,
                simulate(&t, kind, capacity).hit_blocks,
                "{kind}: engine against simulation"
            );
        }
    }

    fn generate(regime: Regime, requests: usize, seed: u64) -> Vec<GeneratedRequest> {
        crate::replay::generate::generate(regime, requests, seed).collect()
    }

    const REGIMES: [Regime; 5] = [
        Regime::SystemPrompts,
        Regime::Conversations,
        Regime::Documents,
        Regime::Agents,
        Regime::Mix,
    ];

    #[test]
    fn a_seed_gives_one_trace_in_arrival_order_with_lengths_that_match_the_blocks() {
        for regime in REGIMES {
            let trace = generate(regime, 2_000, 9);
            assert_eq!(trace, generate(regime, 2_000, 9), "{regime:?}");
            assert_ne!(trace, generate(regime, 2_000, 10), "{regime:?}");
            assert!(trace.windows(2).all(|w| w[0].timestamp <= w[1].timestamp));
            for r in &trace {
                let blocks = r.input_length.div_ceil(TOKENS_PER_BLOCK);
                assert_eq!(blocks, r.hash_ids.len() as u64, "{regime:?}: {r:?}");
            }
        }
    }

    /// How many requests begin with a chain another request sent before.
    fn reused_prefixes(trace: &[GeneratedRequest]) -> usize {
        let mut seen = std::collections::HashSet::new();
        trace.iter().filter(|r| !seen.insert(r.hash_ids[0])).count()
    }

    #[test]
    fn each_regime_has_its_shape() {
        // Conversations and agents re-send their whole chain, grown: every step of a chain
        // begins with the previous step's full blocks; its partly filled last block, filled
        // further, is another block.
        for regime in [Regime::Conversations, Regime::Agents] {
            let trace = generate(regime, 3_000, 1);
            let mut last: std::collections::HashMap<u64, &Vec<u64>> = Default::default();
            let mut grown = 0;
            for r in &trace {
                if let Some(previous) = last.insert(r.hash_ids[0], &r.hash_ids) {
                    let (partial, full) = previous.split_last().expect("a chain has blocks");
                    assert!(r.hash_ids.starts_with(full), "{regime:?}");
                    assert!(!r.hash_ids.contains(partial), "{regime:?}");
                    assert!(r.hash_ids.len() > previous.len(), "{regime:?}");
                    grown += 1;
                }
            }
            assert!(grown > 1_000, "{regime:?}: {grown}");
        }
        // Documents: about half the requests are one-off documents, never seen again.
        let trace = generate(Regime::Documents, 4_000, 1);
        let one_off = trace.iter().filter(|r| r.hash_ids.len() >= 16).count();
        assert!((1_600..2_400).contains(&one_off), "{one_off}");
        assert!(
            reused_prefixes(&trace) >= 1_000,
            "{}",
            reused_prefixes(&trace)
        );
        // System prompts: the most popular prompt heads far more requests than the least.
        let trace = generate(Regime::SystemPrompts, 10_000, 1);
        let mut heads: std::collections::HashMap<u64, usize> = Default::default();
        for r in &trace {
            *heads.entry(r.hash_ids[0]).or_default() += 1;
        }
        let most = heads.values().max().copied().unwrap_or(0);
        let least = heads.values().min().copied().unwrap_or(0);
        assert!(heads.len() > 400, "{}", heads.len());
        assert!(most > 20 * least, "{most} vs {least}");
    }
}
