//! Eviction under pressure: the coldest blocks go first, usage returns under the low watermark
//! once it passes the high one, a pinned block is never evicted however cold it is, and a put
//! that cannot fit because everything is pinned gets `NoSpace` at once instead of blocking.
//! A pinned block evicted under a reader would hand a GPU copy freed memory; a put that blocks
//! would stall a serving engine.

use mooncake_kv_engine::{Engine, EngineConfig, Error};

const BLOCK: usize = 64 << 10;

fn engine(capacity_bytes: u64) -> Engine {
    Engine::open(EngineConfig {
        dram_capacity_bytes: capacity_bytes,
        high_watermark_percent: 90,
        low_watermark_percent: 70,
        ..EngineConfig::default()
    })
    .expect("open")
}

fn key(i: usize) -> Vec<u8> {
    format!("block-{i:05}").into_bytes()
}

#[test]
fn coldest_blocks_go_first_and_usage_returns_under_the_low_watermark() -> Result<(), Error> {
    let capacity = 4 << 20;
    let engine = engine(capacity);
    let value = vec![9u8; BLOCK];
    // About 63 blocks fit; put 200 and keep touching block 0 so it stays warm.
    for i in 0..200 {
        engine.put(&key(i), &value)?;
        assert!(
            engine.get(&key(0))?.is_some(),
            "the block in use must stay (put {i})"
        );
        let used = engine.stats().tiers[0].used_bytes;
        assert!(
            used <= capacity * 90 / 100,
            "above the high watermark after put {i}: {used}"
        );
    }
    let stats = engine.stats();
    assert!(stats.tiers[0].evictions > 100);
    // The most recent puts are all present; the oldest untouched ones are gone.
    for i in 190..200 {
        assert!(engine.exists(&key(i)), "recent block {i} evicted");
    }
    assert!(!engine.exists(&key(1)));
    Ok(())
}

#[test]
fn pinned_blocks_are_never_evicted() -> Result<(), Error> {
    let engine = engine(4 << 20);
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
        assert!(engine.exists(&key(i)), "pinned block {i} was evicted");
        assert_eq!(pin.payload(), &value[..]);
        assert_eq!(engine.get(&key(i))?.as_deref(), Some(&value[..]));
    }
    assert!(!engine.exists(&key(5)), "unpinned cold blocks do go");
    drop(pins);
    // Unpinned, they are ordinary blocks again.
    for i in 1000..1200 {
        engine.put(&key(i), &value)?;
    }
    assert!((0..5).all(|i| !engine.exists(&key(i))));
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
