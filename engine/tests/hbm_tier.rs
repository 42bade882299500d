//! The HBM tier's logic, on the host test device (host memory posing as a GPU) and, when the
//! build has the `cuda` feature and the machine has a GPU, on GPU 0 as well: puts land in HBM; a full HBM demotes its coldest blocks to DRAM, and DRAM to
//! NVMe, in that order; hits promote back; pins bring a block into DRAM and hold it; a block
//! no tier can hold is refused with NoSpace; reads straight into device memory are exact; a
//! chain its caller ended leaves HBM first and is not copied down; and asking for an HBM tier
//! where there is no GPU fails at open without creating anything.

use std::sync::Arc;

use mooncake_kv_engine::{
    DeviceMemory, Engine, EngineConfig, Error, HbmSettings, HostTestDevice, TierKind,
};

const BLOCK: usize = 64 << 10;

fn value(i: usize) -> Vec<u8> {
    (0..BLOCK).map(|j| (i * 31 + j * 7) as u8).collect()
}

fn key(i: usize) -> Vec<u8> {
    format!("hbm-{i:05}").into_bytes()
}

fn settings(capacity_bytes: u64) -> HbmSettings {
    HbmSettings {
        capacity_bytes,
        high_watermark_percent: 90,
        low_watermark_percent: 70,
        ..HbmSettings::default()
    }
}

/// The devices each test runs on: the host test device always, and GPU 0 when the build has
/// the `cuda` feature and the machine has one ([`on_each_device`] says which it is on).
fn devices() -> Vec<Arc<dyn DeviceMemory>> {
    #[cfg_attr(
        not(feature = "cuda"),
        expect(unused_mut, reason = "a GPU is added with cuda")
    )]
    let mut devices: Vec<Arc<dyn DeviceMemory>> = vec![Arc::new(HostTestDevice::new(256 << 20))];
    #[cfg(feature = "cuda")]
    match mooncake_kv_engine::CudaDevice::open(0) {
        Ok(gpu) => devices.push(Arc::new(gpu)),
        Err(error) => eprintln!("not on a GPU: {error}"),
    }
    devices
}

fn engine(
    device: &Arc<dyn DeviceMemory>,
    hbm_bytes: u64,
    dram_bytes: u64,
    data_dir: Option<&std::path::Path>,
) -> Engine {
    Engine::open_with_device(
        EngineConfig {
            dram_capacity_bytes: dram_bytes,
            high_watermark_percent: 90,
            low_watermark_percent: 70,
            data_dir: data_dir.map(Into::into),
            nvme_capacity_bytes: 64 << 20,
            hbm: Some(settings(hbm_bytes)),
            ..EngineConfig::default()
        },
        Arc::clone(device),
    )
    .expect("open")
}

/// Runs `test` on each device of [`devices`], saying on which it runs.
fn on_each_device(test: impl Fn(&Arc<dyn DeviceMemory>) -> Result<(), Error>) -> Result<(), Error> {
    for device in devices() {
        eprintln!("on {}", device.name());
        test(&device)?;
    }
    Ok(())
}

fn tier(engine: &Engine, kind: TierKind) -> mooncake_kv_engine::TierStats {
    engine
        .stats()
        .tiers
        .into_iter()
        .find(|t| t.kind == kind)
        .expect("tier present")
}

#[test]
fn puts_land_in_hbm_and_read_back_exactly() -> Result<(), Error> {
    on_each_device(|device| {
        let engine = engine(device, 8 << 20, 8 << 20, None);
        for i in 0..20 {
            engine.put(&key(i), &value(i))?;
        }
        assert_eq!(tier(&engine, TierKind::Hbm).blocks, 20);
        assert_eq!(tier(&engine, TierKind::Dram).blocks, 0);
        for i in 0..20 {
            assert_eq!(engine.get(&key(i))?, Some(value(i)), "block {i}");
        }
        let mut buffer = vec![0u8; BLOCK + 10];
        for i in 0..20 {
            assert_eq!(engine.get_into(&key(i), &mut buffer)?, Some(BLOCK));
            assert_eq!(&buffer[..BLOCK], &value(i)[..], "block {i}");
        }
        assert!(matches!(
            engine.get_into(&key(0), &mut buffer[..BLOCK - 1]),
            Err(Error::BufferTooSmall { .. })
        ));
        assert_eq!(tier(&engine, TierKind::Hbm).hits, 40);
        Ok(())
    })
}

/// A block of many staging buffers reads back exactly, and its checksum, taken piece by
/// piece as the pieces land, matches. A GPU device copies through two staging buffers of
/// 256 KiB taking turns: 16 MiB is 64 pieces, an odd number of turns with the header's, so
/// the last two pieces land in the order they were issued only if the device drains the
/// older lane first.
#[test]
fn a_block_of_many_staging_buffers_reads_back_exactly() -> Result<(), Error> {
    on_each_device(|device| {
        let engine = engine(device, 64 << 20, 64 << 20, None);
        let big: Vec<u8> = (0..16 << 20).map(|j| (j * 13 + j / 4099) as u8).collect();
        engine.put(b"big", &big)?;
        assert_eq!(tier(&engine, TierKind::Hbm).blocks, 1);
        assert_eq!(engine.get(b"big")?.as_deref(), Some(&big[..]));
        let mut buffer = vec![0u8; big.len()];
        assert_eq!(engine.get_into(b"big", &mut buffer)?, Some(big.len()));
        assert!(buffer == big);
        assert_eq!(tier(&engine, TierKind::Hbm).hits, 2);
        Ok(())
    })
}

#[test]
fn demotion_goes_hbm_then_dram_then_nvme_coldest_first() -> Result<(), Error> {
    on_each_device(|device| {
        let dir = tempfile::tempdir().unwrap();
        // HBM holds about 29 blocks below its high mark, DRAM about 29: push 150 through.
        let engine = engine(device, 2 << 20, 2 << 20, Some(dir.path()));
        for i in 0..150 {
            engine.put(&key(i), &value(i))?;
            // Keep block 0 warm: it must stay in HBM.
            assert_eq!(engine.get(&key(0))?, Some(value(0)));
        }
        // The warm block never left HBM, the newest is there too, the oldest went down. (A get
        // served from HBM counts an HBM hit; one served from DRAM does not.)
        let in_hbm = |i: usize| -> bool {
            let before = tier(&engine, TierKind::Hbm).hits;
            assert_eq!(engine.get(&key(i)).unwrap(), Some(value(i)));
            tier(&engine, TierKind::Hbm).hits > before
        };
        assert!(in_hbm(0));
        assert!(in_hbm(149));
        assert!(!in_hbm(1));
        engine.flush()?;
        let (hbm, dram, nvme) = (
            tier(&engine, TierKind::Hbm),
            tier(&engine, TierKind::Dram),
            tier(&engine, TierKind::Nvme),
        );
        assert!(hbm.evictions > 100, "{hbm:?}");
        assert!(hbm.used_bytes <= (2 << 20) * 90 / 100, "{hbm:?}");
        assert!(dram.blocks > 0 && nvme.blocks > 0, "{dram:?} {nvme:?}");
        assert!(engine.stats().demotions > 100);
        // Every block is somewhere, exact.
        for i in 0..150 {
            assert_eq!(engine.get(&key(i))?, Some(value(i)), "block {i}");
        }
        drop(engine);
        // What was flushed survives a restart (HBM and DRAM do not persist; NVMe does).
        let engine = Engine::open(EngineConfig {
            dram_capacity_bytes: 2 << 20,
            data_dir: Some(dir.path().into()),
            nvme_capacity_bytes: 64 << 20,
            ..EngineConfig::default()
        })?;
        for i in 0..150 {
            assert_eq!(
                engine.get(&key(i))?,
                Some(value(i)),
                "after restart, block {i}"
            );
        }
        Ok(())
    })
}

/// Ten chains of two blocks in HBM, half of them ended by their caller; then plain puts push
/// most of them out. The ended chains go first and are evicted, not copied into DRAM; the
/// others are demoted, and every block not ended reads back exactly.
#[test]
fn an_ended_chain_leaves_hbm_first_and_is_not_copied_down() -> Result<(), Error> {
    on_each_device(|device| {
        // HBM holds about 26 blocks below its high mark and 22 below its low one; DRAM 8 MiB.
        let engine = engine(device, 2 << 20, 8 << 20, None);
        let chain = |c: usize| [key(2 * c), key(2 * c + 1)];
        for c in 0..10 {
            let keys = chain(c);
            let values = [value(2 * c), value(2 * c + 1)];
            let items: Vec<(&[u8], &[u8])> = keys
                .iter()
                .zip(&values)
                .map(|(k, v)| (k.as_slice(), v.as_slice()))
                .collect();
            for result in engine.put_chain(None, &items) {
                result?;
            }
        }
        assert_eq!(tier(&engine, TierKind::Hbm).blocks, 20);
        for c in (0..10).step_by(2) {
            let keys = chain(c);
            assert!(engine.end_chain(&[&keys[0], &keys[1]]));
        }
        for i in 20..50 {
            engine.put(&key(i), &value(i))?;
        }
        let hbm = tier(&engine, TierKind::Hbm);
        assert!(hbm.evictions > 10, "{hbm:?}");
        assert_eq!(
            engine.stats().demotions,
            hbm.evictions - 10,
            "every HBM victim but the 10 ended blocks went down to DRAM"
        );
        for i in 0..50 {
            let ended = i < 20 && (i / 2) % 2 == 0;
            let expected = (!ended).then(|| value(i));
            assert_eq!(engine.get(&key(i))?, expected, "block {i}");
        }
        Ok(())
    })
}

#[test]
fn hits_below_promote_back_into_hbm() -> Result<(), Error> {
    on_each_device(|device| {
        let engine = engine(device, 2 << 20, 8 << 20, None);
        for i in 0..60 {
            engine.put(&key(i), &value(i))?;
        }
        // Block 0 was demoted to DRAM long ago.
        let hbm = tier(&engine, TierKind::Hbm);
        assert!(hbm.evictions > 0);
        let before = engine.stats().promotions;
        // Make room below the high mark, then read it: it comes back up.
        for i in 40..60 {
            engine.remove(&key(i));
        }
        assert_eq!(engine.get(&key(0))?, Some(value(0)));
        assert_eq!(engine.stats().promotions, before + 1);
        let hits = tier(&engine, TierKind::Hbm).hits;
        assert_eq!(engine.get(&key(0))?, Some(value(0)));
        assert_eq!(
            tier(&engine, TierKind::Hbm).hits,
            hits,
            "DRAM serves it first (zero copy)"
        );
        Ok(())
    })
}

#[test]
fn a_pin_brings_an_hbm_block_into_dram_and_holds_it() -> Result<(), Error> {
    on_each_device(|device| {
        let engine = engine(device, 2 << 20, 2 << 20, None);
        engine.put(&key(0), &value(0))?;
        let pin = engine.pin(&key(0))?.expect("present");
        assert_eq!(pin.payload(), &value(0)[..]);
        // Churn both tiers many times over: the pinned block stays, unchanged.
        for i in 1..200 {
            engine.put(&key(i), &value(i))?;
        }
        assert!(engine.exists(&key(0)));
        assert_eq!(pin.payload(), &value(0)[..]);
        drop(pin);
        Ok(())
    })
}

#[test]
fn a_block_no_tier_can_hold_is_refused() -> Result<(), Error> {
    on_each_device(|device| {
        let engine = engine(device, 1 << 20, 1 << 20, None);
        let big = vec![1u8; 2 << 20];
        match engine.put(b"big", &big) {
            Err(Error::NoSpace { .. }) => {}
            other => panic!("expected NoSpace, got {other:?}"),
        }
        assert!(!engine.exists(b"big"));
        Ok(())
    })
}

#[test]
#[expect(
    unsafe_code,
    reason = "device memory named by address, as an inference engine would"
)]
fn reads_into_device_memory_are_exact() -> Result<(), Error> {
    on_each_device(|device| {
        let engine = Engine::open_with_device(
            EngineConfig {
                dram_capacity_bytes: 4 << 20,
                hbm: Some(settings(2 << 20)),
                ..EngineConfig::default()
            },
            Arc::clone(device),
        )?;
        for i in 0..60 {
            engine.put(&key(i), &value(i))?;
        }
        // The caller's KV pages, on the same device.
        let pages = device.allocate(BLOCK as u64).unwrap();
        for i in [0, 59] {
            // SAFETY: `pages` is this test's allocation on the engine's device, used by nothing else.
            let len = unsafe { engine.get_into_device(&key(i), pages) }?;
            assert_eq!(len, Some(BLOCK));
            let mut back = vec![0u8; BLOCK];
            // SAFETY: as above.
            unsafe {
                device
                    .copy_to_host(&mut [mooncake_kv_engine::ToHost {
                        source: pages.ptr,
                        target: &mut back,
                    }])
                    .unwrap()
            };
            assert_eq!(back, value(i), "block {i} (0 from DRAM, 59 from HBM)");
        }
        let short = mooncake_kv_engine::DeviceRange {
            ptr: pages.ptr,
            len: 100,
        };
        // SAFETY: as above.
        let error = unsafe { engine.get_into_device(&key(1), short) }.unwrap_err();
        assert!(matches!(error, Error::BufferTooSmall { .. }), "{error}");
        // SAFETY: as above.
        assert_eq!(unsafe { engine.get_into_device(b"absent", pages) }?, None);
        // SAFETY: nothing uses the pages anymore.
        unsafe { device.free(pages) };
        Ok(())
    })
}

#[test]
fn an_hbm_tier_without_a_usable_gpu_fails_at_open_and_creates_nothing() {
    let parent = tempfile::tempdir().unwrap();
    let dir = parent.path().join("node");
    let opened = Engine::open(EngineConfig {
        dram_capacity_bytes: 16 << 20,
        data_dir: Some(dir.clone()),
        nvme_capacity_bytes: 16 << 20,
        hbm: Some(HbmSettings {
            capacity_bytes: 64 << 20,
            ..HbmSettings::default()
        }),
        ..EngineConfig::default()
    });
    match opened {
        // A machine with a GPU and a cuda build: the tier is there (the test below uses it).
        Ok(engine) if cfg!(feature = "cuda") => {
            assert!(engine.stats().tiers.iter().any(|t| t.kind == TierKind::Hbm));
        }
        Ok(_) => panic!("an HBM tier opened in a build without the cuda feature"),
        Err(error) => {
            if cfg!(feature = "cuda") {
                // No GPU here: the driver's or the loader's words, as a tier error.
                assert!(matches!(error, Error::Tier(_)), "{error}");
            } else {
                assert!(
                    matches!(error, Error::Config { field: "hbm", .. }),
                    "{error}"
                );
                assert!(error.to_string().contains("cuda"), "{error}");
            }
            assert!(!dir.exists(), "nothing is created");
        }
    }
    // And the test device is not something a config can ask for: only open_with_device.
    let error = Engine::open_with_device(
        EngineConfig::default(),
        Arc::new(HostTestDevice::new(64 << 20)),
    )
    .unwrap_err();
    assert!(
        matches!(error, Error::Config { field: "hbm", .. }),
        "{error}"
    );
}

/// On a machine with an NVIDIA GPU and a cuda build: the real tier, through `Engine::open`.
/// Elsewhere it says it did not run.
#[test]
fn on_a_gpu_blocks_go_through_hbm_exactly() -> Result<(), Error> {
    let opened = Engine::open(EngineConfig {
        dram_capacity_bytes: 64 << 20,
        hbm: Some(HbmSettings {
            capacity_bytes: 8 << 20,
            ..HbmSettings::default()
        }),
        ..EngineConfig::default()
    });
    let engine = match opened {
        Ok(engine) => engine,
        Err(error) => {
            eprintln!("not run: no usable GPU ({error})");
            return Ok(());
        }
    };
    for i in 0..300 {
        engine.put(&key(i), &value(i))?;
    }
    let hbm = tier(&engine, TierKind::Hbm);
    assert!(hbm.blocks > 0 && hbm.evictions > 0, "{hbm:?}");
    for i in 0..300 {
        assert_eq!(engine.get(&key(i))?, Some(value(i)), "block {i}");
    }
    Ok(())
}

/// A batch of puts reaches the device in one trip (every header and value in one batch of
/// copies), an item that is refused does not stop the others, and every block reads back.
#[test]
fn a_batch_of_puts_goes_to_the_device_in_one_trip() -> Result<(), Error> {
    let device = Arc::new(HostTestDevice::new(64 << 20));
    let engine = Engine::open_with_device(
        EngineConfig {
            dram_capacity_bytes: 4 << 20,
            hbm: Some(settings(8 << 20)),
            ..EngineConfig::default()
        },
        device.clone(),
    )?;
    let keys: Vec<Vec<u8>> = (0..20).map(key).collect();
    let values: Vec<Vec<u8>> = (0..20).map(value).collect();
    let mut items: Vec<(&[u8], &[u8])> = keys
        .iter()
        .zip(&values)
        .map(|(k, v)| (k.as_slice(), v.as_slice()))
        .collect();
    items.insert(7, (b"", b"an empty key is refused"));
    let before = device.batches_to_device();
    let results = engine.put_batch(&items);
    assert_eq!(
        device.batches_to_device() - before,
        1,
        "one trip for the whole batch"
    );
    assert_eq!(results.len(), 21);
    assert!(
        matches!(results[7], Err(Error::Format(_))),
        "{:?}",
        results[7]
    );
    assert_eq!(results.iter().filter(|r| r.is_ok()).count(), 20);
    assert_eq!(tier(&engine, TierKind::Hbm).blocks, 20);
    for i in 0..20 {
        assert_eq!(engine.get(&key(i))?, Some(value(i)), "block {i}");
    }
    Ok(())
}
