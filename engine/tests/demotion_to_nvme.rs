//! DRAM overflowing onto NVMe: once DRAM passes its high watermark, the background reclaimer
//! demotes the coldest blocks to NVMe instead of dropping them, so every block stays readable
//! with its exact bytes; a read of a demoted block promotes it back when DRAM has room; pinned
//! blocks stay in DRAM; when NVMe fills too, its coldest blocks are evicted for good; blocks the
//! prefix-aware policy expects no use of (a chain the caller ended, an unused partial last
//! block) are evicted from DRAM without an NVMe write. What could break: a block dropped from DRAM before its NVMe copy is committed, a demoted block read
//! from a reused extent, a pinned block moved under its reader.

use std::time::{Duration, Instant};

use mooncake_kv_engine::{ChainEnd, Engine, EngineConfig, Error};

const BLOCK: usize = 64 << 10;

fn value(i: usize) -> Vec<u8> {
    let mut v = vec![(i % 251) as u8; BLOCK];
    v[..8].copy_from_slice(&(i as u64).to_le_bytes());
    v
}

fn key(i: usize) -> Vec<u8> {
    format!("block-{i:05}").into_bytes()
}

fn wait_until(mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(
            Instant::now() < deadline,
            "timed out waiting for the reclaimer"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

#[test]
fn overflowing_dram_demotes_instead_of_dropping() -> Result<(), Error> {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = Engine::open(EngineConfig {
        dram_capacity_bytes: 4 << 20,
        high_watermark_percent: 80,
        low_watermark_percent: 50,
        data_dir: Some(dir.path().to_owned()),
        nvme_capacity_bytes: 64 << 20,
        promote_on_hit: false,
        ..EngineConfig::default()
    })?;
    let pinned_key = key(0);
    engine.put(&pinned_key, &value(0))?;
    let pin = engine.pin(&pinned_key)?.expect("just put");
    for i in 1..300 {
        engine.put(&key(i), &value(i))?;
    }
    wait_until(|| engine.stats().tiers[0].used_bytes <= (4 << 20) * 80 / 100);
    let stats = engine.stats();
    assert!(stats.demotions > 200, "{stats:#?}");
    assert_eq!(
        stats.tiers[1].blocks, stats.demotions,
        "every demoted block has its NVMe copy"
    );
    for i in 0..300 {
        assert_eq!(engine.get(&key(i))?, Some(value(i)), "block {i}");
    }
    assert!(
        engine.stats().tiers[1].hits > 200,
        "the cold blocks came from NVMe"
    );
    assert_eq!(
        pin.payload(),
        &value(0)[..],
        "the pinned block was not moved"
    );
    drop(pin);
    Ok(())
}

#[test]
fn nvme_hits_are_promoted_and_a_full_nvme_evicts_its_coldest() -> Result<(), Error> {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = Engine::open(EngineConfig {
        dram_capacity_bytes: 2 << 20,
        high_watermark_percent: 90,
        low_watermark_percent: 60,
        data_dir: Some(dir.path().to_owned()),
        nvme_capacity_bytes: 4 << 20,
        ..EngineConfig::default()
    })?;
    // 8 MiB of blocks through 2 MiB of DRAM and 4 MiB of NVMe: the oldest must go.
    for i in 0..128 {
        engine.put(&key(i), &value(i))?;
        if i % 16 == 15 {
            wait_until(|| engine.stats().tiers[0].used_bytes <= (2 << 20) * 90 / 100);
        }
    }
    engine.flush()?;
    let stats = engine.stats();
    assert!(stats.tiers[1].evictions > 0, "{stats:#?}");
    let promotions_before = stats.promotions;
    let mut present = 0;
    for i in 0..128 {
        if let Some(v) = engine.get(&key(i))? {
            assert_eq!(v, value(i), "block {i}");
            present += 1;
        }
    }
    // 4 MiB of NVMe at 68 KiB a block, kept under its 95% watermark, plus what DRAM holds.
    assert!(present >= 40, "only {present} blocks left");
    assert!(!engine.exists(&key(0)), "the coldest block was evicted");
    assert!(engine.exists(&key(127)), "the newest block stays");
    let stats = engine.stats();
    assert!(stats.tiers[1].hits > 0, "{stats:#?}");
    assert!(
        stats.promotions > promotions_before,
        "NVMe hits were promoted: {stats:#?}"
    );
    Ok(())
}

/// Chains of 4 blocks, the last partial, into a DRAM that holds about 60 blocks over NVMe. One
/// chain in three is ended by its caller. Under pressure, the ended chains and the unused
/// partial blocks leave DRAM for good; only the other full blocks are written to NVMe.
#[test]
fn blocks_with_no_future_are_evicted_not_demoted() -> Result<(), Error> {
    let dir = tempfile::tempdir().expect("tempdir");
    let engine = Engine::open(EngineConfig {
        dram_capacity_bytes: 4 << 20,
        high_watermark_percent: 100,
        low_watermark_percent: 99,
        data_dir: Some(dir.path().to_owned()),
        nvme_capacity_bytes: 64 << 20,
        promote_on_hit: false,
        ..EngineConfig::default()
    })?;
    let chains = 60;
    let keys = |chain: usize| -> Vec<Vec<u8>> { (0..4).map(|b| key(chain * 4 + b)).collect() };
    for chain in 0..chains {
        let keys = keys(chain);
        let values: Vec<Vec<u8>> = (0..4).map(|b| value(chain * 4 + b)).collect();
        let items: Vec<(&[u8], &[u8])> = keys
            .iter()
            .zip(&values)
            .map(|(k, v)| (k.as_slice(), v.as_slice()))
            .collect();
        for result in engine.put_chain_with(None, &items, ChainEnd::Partial) {
            result?;
        }
        if chain % 3 == 0 {
            let refs: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
            assert!(engine.end_chain(&refs));
        }
    }
    let stats = engine.stats();
    assert!(stats.tiers[0].evictions > 100, "{stats:#?}");
    // Every block is in DRAM, on NVMe, or gone; on NVMe only the full blocks of chains that
    // were not ended.
    let mut demoted = 0;
    for chain in 0..chains {
        for (b, key) in keys(chain).iter().enumerate() {
            let ended = chain % 3 == 0;
            let partial = b == 3;
            match engine.get(key)? {
                Some(bytes) => assert_eq!(bytes, value(chain * 4 + b), "chain {chain} block {b}"),
                None => assert!(ended || partial, "chain {chain} block {b} was dropped"),
            }
            if engine.stats().tiers[1].hits > demoted {
                demoted += 1;
                assert!(
                    !ended && !partial,
                    "chain {chain} block {b} was written to NVMe"
                );
            }
        }
    }
    assert!(demoted > 50, "{demoted} blocks read from NVMe");
    assert_eq!(engine.stats().demotions, demoted);
    Ok(())
}
