//! One suite, every memory tier: DRAM, HBM on the host test device, and HBM on a real GPU
//! when the build has the `cuda` feature and the machine has one (skipped, and said so,
//! otherwise). Everything goes through the `Tier` trait, so a tier that passes behaves as
//! the engine expects of any tier: extents are disjoint and keep their bytes, accesses outside
//! an extent are errors, a full tier says so, freeing returns the space, and an extent cannot
//! be used with another tier.

use std::sync::Arc;

use mooncake_kv_tiers::{DramConfig, DramTier, Error, HbmConfig, HbmTier, HostTestDevice, Tier};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const CAPACITY: u64 = 4 << 20;

fn tiers() -> Vec<Box<dyn Tier>> {
    let tiers: Vec<Box<dyn Tier>> = vec![
        Box::new(
            DramTier::open(DramConfig {
                capacity_bytes: CAPACITY,
                ..DramConfig::default()
            })
            .unwrap(),
        ),
        Box::new(
            HbmTier::open(
                Arc::new(HostTestDevice::new(64 << 20)),
                HbmConfig {
                    capacity_bytes: CAPACITY,
                    ..HbmConfig::default()
                },
            )
            .unwrap(),
        ),
    ];
    #[cfg(feature = "cuda")]
    let tiers = {
        let mut tiers = tiers;
        match mooncake_kv_tiers::CudaDevice::open(0) {
            Ok(device) => tiers.push(Box::new(
                HbmTier::open(
                    Arc::new(device),
                    HbmConfig {
                        capacity_bytes: CAPACITY,
                        ..HbmConfig::default()
                    },
                )
                .unwrap(),
            )),
            Err(error) => eprintln!("no GPU tier in this run: {error}"),
        }
        tiers
    };
    tiers
}

fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(seed);
    (0..len).map(|_| rng.random()).collect()
}

#[test]
fn extents_are_disjoint_and_keep_their_bytes() {
    for tier in tiers() {
        let unit = tier.allocation_unit_bytes();
        let mut live = Vec::new();
        let mut rng = StdRng::seed_from_u64(1);
        for round in 0..400u64 {
            if live.len() > 8 && rng.random_bool(0.5) {
                let (extent, seed, len): (_, u64, usize) =
                    live.swap_remove(rng.random_range(0..live.len()));
                let mut back = vec![0u8; len];
                tier.read_at(&extent, 0, &mut back).unwrap();
                assert_eq!(back, pattern(seed, len), "{tier:?}: bytes changed");
                tier.free(extent);
                continue;
            }
            let len = rng.random_range(1..200_000usize);
            match tier.allocate(len as u64) {
                Ok(mut extent) => {
                    assert!(extent.len_bytes() >= len as u64);
                    assert_eq!(extent.len_bytes() % unit, 0);
                    assert_eq!(extent.offset_bytes() % unit, 0);
                    tier.write_at(&mut extent, 0, &pattern(round, len)).unwrap();
                    live.push((extent, round, len));
                }
                Err(Error::OutOfSpace { .. }) => {}
                Err(other) => panic!("{tier:?}: {other}"),
            }
        }
        for (extent, seed, len) in live {
            let mut back = vec![0u8; len];
            tier.read_at(&extent, 0, &mut back).unwrap();
            assert_eq!(back, pattern(seed, len), "{tier:?}");
            tier.free(extent);
        }
        assert_eq!(tier.used_bytes(), 0, "{tier:?}");
        assert_eq!(
            tier.usage().free_extents,
            1,
            "{tier:?}: free space coalesced"
        );
    }
}

#[test]
fn out_of_bounds_is_an_error_and_full_is_out_of_space() {
    for tier in tiers() {
        let mut extent = tier.allocate(1).unwrap();
        let len = extent.len_bytes();
        assert!(matches!(
            tier.write_at(&mut extent, len - 1, &[0; 2]),
            Err(Error::OutOfBounds { .. })
        ));
        assert!(matches!(
            tier.read_at(&extent, u64::MAX, &mut [0; 1]),
            Err(Error::OutOfBounds { .. })
        ));
        tier.write_at(&mut extent, len - 1, &[7]).unwrap();
        tier.free(extent);
        let whole = tier.allocate(tier.capacity_bytes()).unwrap();
        assert_eq!(tier.used_bytes(), tier.capacity_bytes());
        match tier.allocate(1) {
            Err(Error::OutOfSpace { free_bytes: 0, .. }) => {}
            other => panic!("{tier:?}: expected OutOfSpace, got {other:?}"),
        }
        tier.free(whole);
        assert_eq!(tier.used_bytes(), 0);
    }
}

#[test]
fn an_extent_cannot_be_freed_into_another_tier() {
    for tier in tiers() {
        let other = tiers().remove(1);
        let extent = tier.allocate(100).unwrap();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| other.free(extent)));
        assert!(result.is_err(), "{tier:?} accepted a foreign extent");
    }
}

#[test]
fn an_hbm_tier_larger_than_the_device_is_refused_and_takes_nothing() {
    let device = Arc::new(HostTestDevice::new(2 << 20));
    let error = HbmTier::open(
        device.clone(),
        HbmConfig {
            capacity_bytes: 4 << 20,
            ..HbmConfig::default()
        },
    )
    .unwrap_err();
    assert!(
        matches!(
            error,
            Error::Config {
                field: "capacity_bytes",
                ..
            }
        ),
        "{error}"
    );
    assert!(error.to_string().contains("host test device"), "{error}");
    use mooncake_kv_tiers::DeviceMemory;
    assert_eq!(device.memory_info().unwrap(), (2 << 20, 2 << 20));
    // And the tier gives its memory back when dropped.
    let tier = HbmTier::open(
        device.clone(),
        HbmConfig {
            capacity_bytes: 1 << 20,
            ..HbmConfig::default()
        },
    )
    .unwrap();
    assert_eq!(device.memory_info().unwrap().0, 1 << 20);
    drop(tier);
    assert_eq!(device.memory_info().unwrap().0, 2 << 20);
}
