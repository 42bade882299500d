//! Eviction under pressure, with every policy: the coldest blocks go first, usage returns under
//! the low watermark once it passes the high one and no further, a pinned block is never
//! evicted however cold it is, a chain loses its tail before its head, and an unused partial
//! block or a chain the caller ended goes before full ones (prefix-aware), and a put
//! that cannot fit because everything is pinned gets `NoSpace` at once instead of blocking.
//! A pinned block evicted under a reader would hand a GPU copy freed memory; a put that blocks
//! would stall a serving engine; an eviction beyond the low watermark is a miss for nothing.

use std::time::{Duration, Instant};

use mooncake_kv_engine::{ChainEnd, Durability, Engine, EngineConfig, Error, EvictionPolicyKind};

const BLOCK: usize = 64 << 10;

fn engine(capacity_bytes: u64, policy: EvictionPolicyKind) -> Engine {
    Engine::open(EngineConfig {
        dram_capacity_bytes: capacity_bytes,
        high_watermark_percent: 90,
        low_watermark_percent: 70,
        eviction_policy: policy,
        ..EngineConfig::default()
    })
    .expect("open")
}

fn key(i: usize) -> Vec<u8> {
    format!("block-{i:05}").into_bytes()
}

#[test]
fn coldest_blocks_go_first_and_usage_returns_under_the_low_watermark() -> Result<(), Error> {
    for policy in EvictionPolicyKind::ALL {
        coldest_blocks_go_first(policy)?;
    }
    Ok(())
}

fn coldest_blocks_go_first(policy: EvictionPolicyKind) -> Result<(), Error> {
    let capacity = 4 << 20;
    let engine = engine(capacity, policy);
    let value = vec![9u8; BLOCK];
    // About 63 blocks fit; put 200 and keep touching block 0 so it stays warm.
    for i in 0..200 {
        engine.put(&key(i), &value)?;
        assert!(
            engine.get(&key(0))?.is_some(),
            "{policy}: the block in use must stay (put {i})"
        );
        let used = engine.stats().tiers[0].used_bytes;
        assert!(
            used <= capacity * 90 / 100,
            "{policy}: above the high watermark after put {i}: {used}"
        );
    }
    let stats = engine.stats();
    assert!(stats.tiers[0].evictions > 100);
    // The most recent puts are all present; the oldest untouched ones are gone.
    for i in 198..200 {
        assert!(engine.exists(&key(i)), "{policy}: recent block {i} evicted");
    }
    assert!(!engine.exists(&key(1)), "{policy}");
    Ok(())
}

#[test]
fn pinned_blocks_are_never_evicted() -> Result<(), Error> {
    for policy in EvictionPolicyKind::ALL {
        pinned_blocks_stay(policy)?;
    }
    Ok(())
}

fn pinned_blocks_stay(policy: EvictionPolicyKind) -> Result<(), Error> {
    let engine = engine(4 << 20, policy);
    let value = vec![5u8; BLOCK];
    for i in 0..10 {
        engine.put(&key(i), &value)?;
    }
    // Pin the five coldest blocks, then push many times the capacity through.
    let pins: Vec<_> = (0..5)
        .map(|i| engine.pin(&key(i)).map(Option::unwrap))
        .collect::<Result<_, _>>()?;
    for i in 10..1000 {
        engine.put(&key(i), &value)?;
    }
    for (i, pin) in pins.iter().enumerate() {
        assert!(
            engine.exists(&key(i)),
            "{policy}: pinned block {i} was evicted"
        );
        assert_eq!(pin.payload(), &value[..]);
        assert_eq!(engine.get(&key(i))?.as_deref(), Some(&value[..]));
    }
    assert!(
        !engine.exists(&key(5)),
        "{policy}: unpinned cold blocks do go"
    );
    drop(pins);
    // Unpinned, they are ordinary blocks again: enough blocks used twice go through that
    // every policy lets them go (the frequency-aware ones remember they were used).
    for i in 1000..21000 {
        engine.put(&key(i), &value)?;
        engine.get(&key(i))?;
    }
    assert!((0..5).all(|i| !engine.exists(&key(i))), "{policy}");
    Ok(())
}

#[test]
fn no_space_when_everything_is_pinned() -> Result<(), Error> {
    let capacity = 2u64 << 20;
    // No watermark eviction: only a full tier makes a put evict, so every put fills it more.
    let engine = Engine::open(EngineConfig {
        dram_capacity_bytes: capacity,
        high_watermark_percent: 100,
        low_watermark_percent: 90,
        ..EngineConfig::default()
    })?;
    let value = vec![1u8; BLOCK];
    let mut pins = Vec::new();
    let mut i = 0;
    // Fill the tier with pinned blocks until a put is refused.
    let error = loop {
        match engine.put(&key(i), &value) {
            Ok(_) => pins.push(engine.pin(&key(i))?.expect("just put")),
            Err(error) => break error,
        }
        i += 1;
        assert!(i < 100, "a 2 MiB tier cannot hold 100 blocks of 64 KiB");
    };
    match error {
        Error::NoSpace {
            required_bytes,
            capacity_bytes,
            pinned_bytes,
            ..
        } => {
            assert_eq!(capacity_bytes, capacity);
            assert!(required_bytes > BLOCK as u64);
            assert!(
                pinned_bytes + required_bytes > capacity,
                "pinned {pinned_bytes}"
            );
        }
        other => panic!("expected NoSpace, got {other:?}"),
    }
    assert!(pins.len() >= 25, "only {} blocks fit", pins.len());
    for (i, pin) in pins.iter().enumerate() {
        assert!(engine.exists(&key(i)));
        assert_eq!(pin.payload(), &value[..]);
    }
    // Letting one go makes room again.
    pins.pop();
    engine.put(b"after", &value)?;
    Ok(())
}

/// The background reclaimer brings usage under the low watermark and stops there: it never
/// lets go of more than one block beyond what it must. A put into a full tier (no watermark
/// eviction) evicts exactly one block of its size.
#[test]
fn eviction_stops_at_the_low_watermark() -> Result<(), Error> {
    for policy in EvictionPolicyKind::ALL {
        let capacity = 8u64 << 20;
        let engine = engine(capacity, policy);
        let value = vec![3u8; BLOCK];
        let mut i = 0;
        while engine.stats().tiers[0].evictions == 0 {
            engine.put(&key(i), &value)?;
            i += 1;
            assert!(i < 1000, "{policy}: never evicted");
        }
        // Let the reclaimer finish its pass.
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut last = engine.stats().tiers[0].evictions;
        loop {
            std::thread::sleep(Duration::from_millis(100));
            let now = engine.stats().tiers[0].evictions;
            if now == last || Instant::now() > deadline {
                break;
            }
            last = now;
        }
        let tier = &engine.stats().tiers[0];
        let extent = tier.used_bytes / tier.blocks;
        let low = capacity * 70 / 100;
        assert!(
            tier.used_bytes <= low,
            "{policy}: {} above the low mark",
            tier.used_bytes
        );
        assert!(
            tier.used_bytes + extent > low,
            "{policy}: evicted past the low mark: {} used, low {low}, block {extent}",
            tier.used_bytes
        );
        assert_eq!(tier.evictions + tier.blocks, i as u64, "{policy}");
    }

    for policy in EvictionPolicyKind::ALL {
        let engine = Engine::open(EngineConfig {
            dram_capacity_bytes: 4 << 20,
            high_watermark_percent: 100,
            low_watermark_percent: 99,
            eviction_policy: policy,
            ..EngineConfig::default()
        })?;
        let value = vec![4u8; BLOCK];
        let mut i = 0;
        while engine.stats().tiers[0].evictions == 0 {
            engine.put(&key(i), &value)?;
            i += 1;
        }
        for _ in 0..50 {
            let before = engine.stats().tiers[0].evictions;
            engine.put(&key(i), &value)?;
            i += 1;
            let after = engine.stats().tiers[0].evictions;
            assert_eq!(
                after - before,
                1,
                "{policy}: one put of one block's size evicts one block"
            );
        }
    }
    Ok(())
}

/// With chain links, a prefix loses its tail before its head, whatever the order of use: a
/// head evicted first would make the rest of the chain unreachable by `prefix_match`. The
/// same with the chains committed into reservations (`Engine::chain`, as a node does).
#[test]
fn prefix_aware_evicts_chains_from_the_tail() -> Result<(), Error> {
    evicts_chains_from_the_tail(false)?;
    evicts_chains_from_the_tail(true)
}

fn evicts_chains_from_the_tail(via_reservations: bool) -> Result<(), Error> {
    let engine = tight_prefix_aware()?;
    let value = vec![6u8; BLOCK];
    let chain_key = |chain: usize, block: usize| format!("c{chain}-b{block}").into_bytes();
    // Chains of 8 blocks; 4 MiB holds about 62 blocks, so the engine keeps evicting.
    for chain in 0..40 {
        let keys: Vec<Vec<u8>> = (0..8).map(|b| chain_key(chain, b)).collect();
        put_chain(&engine, &keys, &value, ChainEnd::Full, via_reservations)?;
        // Every chain still resident is a prefix: present blocks are a head, never a tail
        // whose head is gone.
        for c in 0..=chain {
            let present: Vec<bool> = (0..8).map(|b| engine.exists(&chain_key(c, b))).collect();
            let held = present.iter().take_while(|&&p| p).count();
            assert!(
                present[held..].iter().all(|&p| !p),
                "chain {c} after putting chain {chain}: {present:?}"
            );
        }
    }
    // A chain continued from a cached head: the new blocks link to it.
    let head = chain_key(39, 7);
    assert!(engine.exists(&head));
    let tail = chain_key(39, 8);
    let results = engine.put_chain(Some(&head), &[(&tail, &value)]);
    assert!(results[0].is_ok());
    let keys: Vec<Vec<u8>> = (0..9).map(|b| chain_key(39, b)).collect();
    let refs: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
    assert_eq!(engine.prefix_match(&refs), 9);
    Ok(())
}

/// A chain put with a partial last block (`ChainEnd::Partial`): under pressure, prefix-aware
/// evicts such blocks before any full block, even older and deeper ones, oldest first, unless
/// one was read since its put. The same whether the chain is put with values in hand
/// (`put_chain_with`) or committed into reservations (`Engine::chain`, as a node does).
#[test]
fn prefix_aware_evicts_unused_partial_blocks_first() -> Result<(), Error> {
    evicts_unused_partial_blocks_first(false)?;
    evicts_unused_partial_blocks_first(true)
}

fn evicts_unused_partial_blocks_first(via_reservations: bool) -> Result<(), Error> {
    let engine = tight_prefix_aware()?;
    let value = vec![5u8; BLOCK];
    let chain_key = |chain: usize, block: usize| format!("p{chain}-b{block}").into_bytes();
    let put = |chain: usize, blocks: usize, end: ChainEnd| {
        let keys: Vec<Vec<u8>> = (0..blocks).map(|b| chain_key(chain, b)).collect();
        put_chain(&engine, &keys, &value, end, via_reservations)
    };
    // First 8 chains of 5 full blocks, then 20 prompts of one partial block: 60 blocks, no
    // eviction yet. Without the hint, the old, deep tails of the first chains would go first.
    for chain in 0..8 {
        put(chain, 5, ChainEnd::Full)?;
    }
    for chain in 8..28 {
        put(chain, 1, ChainEnd::Partial)?;
    }
    assert_eq!(engine.stats().tiers[0].evictions, 0);
    // The same prompt again reads chain 8's partial block: it is now an ordinary block.
    assert!(engine.get(&chain_key(8, 0))?.is_some());
    // A chain of 8 full blocks needs room for about 6 more.
    put(28, 8, ChainEnd::Full)?;
    let evictions = engine.stats().tiers[0].evictions as usize;
    assert!((1..19).contains(&evictions), "{evictions} evictions");
    for chain in 0..8 {
        for block in 0..5 {
            assert!(
                engine.exists(&chain_key(chain, block)),
                "full block {block} of chain {chain} evicted before partial ones"
            );
        }
    }
    assert!(
        engine.exists(&chain_key(8, 0)),
        "the partial block read since its put went"
    );
    // The unused partial blocks went oldest first: chains 9 to 8 + `evictions`.
    let gone: Vec<usize> = (9..28)
        .filter(|&chain| !engine.exists(&chain_key(chain, 0)))
        .collect();
    assert_eq!(gone, (9..9 + evictions).collect::<Vec<_>>());
    Ok(())
}

/// Twelve conversations under one shared head block (a system prompt). The newest says it is
/// over (`Engine::end_chain`): under pressure its blocks go before any other, tail first,
/// and the head it shares with the others stays. Without the hint the oldest conversation's
/// tail would go instead.
#[test]
fn prefix_aware_evicts_an_ended_chain_first_and_keeps_its_shared_head() -> Result<(), Error> {
    let engine = tight_prefix_aware()?;
    let value = vec![6u8; BLOCK];
    let head = b"system-prompt".to_vec();
    let block = |conversation: usize, b: usize| format!("c{conversation}-b{b}").into_bytes();
    engine.put(&head, &value)?;
    let put_conversation = |conversation: usize| {
        let keys: Vec<Vec<u8>> = (0..5).map(|b| block(conversation, b)).collect();
        let items: Vec<(&[u8], &[u8])> = keys.iter().map(|k| (k.as_slice(), &value[..])).collect();
        engine
            .put_chain(Some(&head), &items)
            .into_iter()
            .try_for_each(|result| result.map(drop))
    };
    for conversation in 0..12 {
        put_conversation(conversation)?;
    }
    assert_eq!(engine.stats().tiers[0].evictions, 0);
    // The caller names the whole chain, the shared head included.
    let ended: Vec<Vec<u8>> = std::iter::once(head.clone())
        .chain((0..5).map(|b| block(11, b)))
        .collect();
    let ended: Vec<&[u8]> = ended.iter().map(Vec::as_slice).collect();
    assert!(engine.end_chain(&ended));
    assert!(!engine.end_chain(&[b"never-put".as_slice()]));
    // Another conversation needs room for a few blocks.
    put_conversation(12)?;
    let evictions = engine.stats().tiers[0].evictions as usize;
    assert!((1..=5).contains(&evictions), "{evictions} evictions");
    assert!(engine.exists(&head), "the shared head went");
    for conversation in (0..11).chain([12]) {
        for b in 0..5 {
            assert!(
                engine.exists(&block(conversation, b)),
                "block {b} of conversation {conversation} went before the ended chain"
            );
        }
    }
    // The ended chain went from its tail.
    let gone: Vec<usize> = (0..5).filter(|&b| !engine.exists(&block(11, b))).collect();
    assert_eq!(gone, (5 - evictions..5).collect::<Vec<_>>());
    Ok(())
}

/// A chain of two blocks whose second keeps being read, then unrelated puts until one block
/// must go: prefix-aware holds the cold first block while the second is resident, unless
/// `hold_chain_parents` is off (a cluster member's setting), when it goes first, being the
/// coldest.
#[test]
fn without_holding_chain_parents_the_coldest_block_goes_even_with_a_child() -> Result<(), Error> {
    for hold in [true, false] {
        let engine = Engine::open(EngineConfig {
            hold_chain_parents: hold,
            ..tight_config()
        })?;
        let value = vec![4u8; BLOCK];
        let (parent, child) = (b"parent".as_slice(), b"child".as_slice());
        engine
            .put_chain(None, &[(parent, &value[..]), (child, &value[..])])
            .into_iter()
            .try_for_each(|result| result.map(drop))?;
        let mut i = 0;
        while engine.stats().tiers[0].evictions == 0 {
            engine.put(&key(i), &value)?;
            assert!(engine.get(child)?.is_some(), "hold {hold}: the child went");
            i += 1;
            assert!(i < 100, "hold {hold}: no eviction");
        }
        assert_eq!(engine.stats().tiers[0].evictions, 1);
        assert_eq!(engine.exists(parent), hold, "hold {hold}");
        assert_eq!(engine.exists(&key(0)), !hold, "hold {hold}");
    }
    Ok(())
}

/// An engine whose 4 MiB of DRAM holds about 62 blocks of 64 KiB, evicting only what a put
/// needs, by the prefix-aware policy.
fn tight_prefix_aware() -> Result<Engine, Error> {
    Engine::open(tight_config())
}

fn tight_config() -> EngineConfig {
    EngineConfig {
        dram_capacity_bytes: 4 << 20,
        high_watermark_percent: 100,
        low_watermark_percent: 99,
        eviction_policy: EvictionPolicyKind::PrefixAware,
        ..EngineConfig::default()
    }
}

/// Puts `keys` as one chain of `value`s ending as `end` says: with `put_chain_with`, or block
/// by block into reservations (`Engine::chain`, as a node does).
fn put_chain(
    engine: &Engine,
    keys: &[Vec<u8>],
    value: &[u8],
    end: ChainEnd,
    via_reservations: bool,
) -> Result<(), Error> {
    if via_reservations {
        let mut chain = engine.chain(None);
        for (index, key) in keys.iter().enumerate() {
            let mut reservation = chain.reserve(key, value.len())?;
            reservation.payload_mut().copy_from_slice(value);
            let end = if index + 1 == keys.len() {
                end
            } else {
                ChainEnd::Full
            };
            chain.commit(reservation, Durability::Memory, end)?;
        }
        return Ok(());
    }
    let items: Vec<(&[u8], &[u8])> = keys.iter().map(|k| (k.as_slice(), value)).collect();
    engine
        .put_chain_with(None, &items, end)
        .into_iter()
        .try_for_each(|result| result.map(drop))
}
