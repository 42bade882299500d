//! Many threads hammer one small engine with puts, gets, get_intos, pins, removes and prefix
//! matches of random sizes, so eviction runs constantly underneath them. Every value is
//! derived from its key and a nonce stored in its first bytes, so every read can be checked
//! byte for byte without a shared model. What could break: a block freed while being copied,
//! a slot reused under a reader, a torn or misattributed block, a pinned block evicted or
//! overwritten in place. Any of those shows up as a mismatch; the test demands zero. It runs
//! twice: DRAM only (eviction drops blocks) and with a data directory (the reclaimer demotes
//! blocks to NVMe in the background, reads promote them back, flushes persist them).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use mooncake_kv_engine::{Engine, EngineConfig, Error};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

const THREADS: usize = 6;
const OPS_PER_THREAD: usize = 20_000;
const KEYS: u64 = 600;

fn key(id: u64) -> [u8; 12] {
    let mut key = *b"stress-\0\0\0\0\0";
    key[7..11].copy_from_slice(&(id as u32).to_le_bytes());
    key
}

/// The value of `id` with `nonce`, `len` bytes (at least 16): id and nonce, then a stream
/// seeded by both.
fn value(id: u64, nonce: u64, len: usize) -> Vec<u8> {
    let mut v = Vec::with_capacity(len);
    v.extend_from_slice(&id.to_le_bytes());
    v.extend_from_slice(&nonce.to_le_bytes());
    let mut state = id.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ nonce;
    while v.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let take = (len - v.len()).min(8);
        v.extend_from_slice(&state.to_le_bytes()[..take]);
    }
    v
}

/// Whether `bytes` is a value that was put under `id`.
fn is_valid(id: u64, bytes: &[u8]) -> bool {
    if bytes.len() < 16 || bytes[..8] != id.to_le_bytes() {
        return false;
    }
    let nonce = u64::from_le_bytes(bytes[8..16].try_into().expect("8 bytes"));
    bytes == value(id, nonce, bytes.len())
}

#[test]
fn dram_only_concurrent_mixed_operations_never_return_a_wrong_byte() -> Result<(), Error> {
    run(EngineConfig {
        dram_capacity_bytes: 24 << 20,
        high_watermark_percent: 90,
        low_watermark_percent: 75,
        index_shards: 8,
        ..EngineConfig::default()
    })
}

#[test]
fn with_nvme_concurrent_mixed_operations_never_return_a_wrong_byte() -> Result<(), Error> {
    let dir = tempfile::tempdir().expect("tempdir");
    run(EngineConfig {
        dram_capacity_bytes: 12 << 20,
        high_watermark_percent: 80,
        low_watermark_percent: 60,
        index_shards: 8,
        data_dir: Some(dir.path().to_owned()),
        nvme_capacity_bytes: 96 << 20,
        ..EngineConfig::default()
    })
}

fn run(config: EngineConfig) -> Result<(), Error> {
    let persistent = config.data_dir.is_some();
    let engine = Arc::new(Engine::open(config)?);
    let checked = Arc::new(AtomicU64::new(0));
    let mismatches = Arc::new(AtomicU64::new(0));
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let (engine, checked, mismatches) = (
                Arc::clone(&engine),
                Arc::clone(&checked),
                Arc::clone(&mismatches),
            );
            std::thread::spawn(move || -> Result<(), Error> {
                let mut rng = StdRng::seed_from_u64(t as u64);
                let mut buffer = vec![0u8; 2 << 20];
                let check = |id: u64, bytes: &[u8]| {
                    checked.fetch_add(1, Ordering::Relaxed);
                    if !is_valid(id, bytes) {
                        mismatches.fetch_add(1, Ordering::Relaxed);
                    }
                };
                for _ in 0..OPS_PER_THREAD {
                    let id = rng.random_range(0..KEYS);
                    match rng.random_range(0..100) {
                        0..40 => {
                            // 1 KiB to 512 KiB, log-uniform; one in 20 from 1 to 2 MiB, which
                            // DRAM places so that the payload starts on a page.
                            let len = if rng.random_range(0..20) == 0 {
                                rng.random_range(1 << 20..=2 << 20)
                            } else {
                                2f64.powf(rng.random_range(10.0..19.0)) as usize
                            };
                            engine.put(&key(id), &value(id, rng.random(), len))?;
                        }
                        40..60 => {
                            if let Some(v) = engine.get(&key(id))? {
                                check(id, &v);
                            }
                        }
                        60..80 => {
                            if let Some(n) = engine.get_into(&key(id), &mut buffer)? {
                                check(id, &buffer[..n]);
                            }
                        }
                        80..88 => {
                            if let Some(pinned) = engine.pin(&key(id))? {
                                check(id, pinned.payload());
                                // Let the others evict and overwrite around the pin.
                                for _ in 0..20 {
                                    std::thread::yield_now();
                                }
                                check(id, pinned.payload());
                                assert_eq!(pinned.key(), &key(id)[..]);
                            }
                        }
                        88..94 => {
                            engine.remove(&key(id));
                        }
                        94 if persistent && rng.random_range(0..10) == 0 => {
                            engine.flush()?;
                        }
                        _ => {
                            let chain: Vec<[u8; 12]> = (id..id + 8).map(key).collect();
                            let refs: Vec<&[u8]> = chain.iter().map(|k| &k[..]).collect();
                            assert!(engine.prefix_match(&refs) <= 8);
                        }
                    }
                }
                Ok(())
            })
        })
        .collect();
    for thread in threads {
        thread.join().expect("worker panicked")?;
    }
    let stats = engine.stats();
    let dram = &stats.tiers[0];
    println!(
        "checked {} reads, {} mismatches, {} evictions, {} blocks resident",
        checked.load(Ordering::Relaxed),
        mismatches.load(Ordering::Relaxed),
        dram.evictions,
        dram.blocks
    );
    assert_eq!(mismatches.load(Ordering::Relaxed), 0);
    assert!(
        checked.load(Ordering::Relaxed) > 1_000,
        "too few reads hit to mean anything"
    );
    assert!(
        dram.evictions > 100,
        "the test must run under eviction pressure"
    );
    assert!(dram.used_bytes <= dram.capacity_bytes);
    // Every block the index still has reads back valid once the dust settles.
    for id in 0..KEYS {
        if let Some(v) = engine.get(&key(id))? {
            assert!(is_valid(id, &v), "block {id} corrupt at rest");
        }
    }
    Ok(())
}

/// Readers of keys that writers keep overwriting and removing get the old value, the new one
/// or a miss: never an error. (A read that found its block retired between the lookup and the
/// copy used to report it as a mismatch.)
#[test]
fn reads_racing_overwrites_get_a_value_or_a_miss_never_an_error() -> Result<(), Error> {
    const HOT_KEYS: u64 = 4;
    let engine = Arc::new(Engine::open(EngineConfig {
        dram_capacity_bytes: 64 << 20,
        ..EngineConfig::default()
    })?);
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writers: Vec<_> = (0..2)
        .map(|t| {
            let (engine, stop) = (Arc::clone(&engine), Arc::clone(&stop));
            std::thread::spawn(move || -> Result<(), Error> {
                let mut rng = StdRng::seed_from_u64(100 + t);
                while !stop.load(Ordering::Relaxed) {
                    let id = rng.random_range(0..HOT_KEYS);
                    if rng.random_range(0..8) == 0 {
                        engine.remove(&key(id));
                    } else {
                        engine.put(&key(id), &value(id, rng.random(), 1024))?;
                    }
                }
                Ok(())
            })
        })
        .collect();
    let (mut reads, mut hits) = (0u64, 0u64);
    let readers: Vec<_> = (0..2)
        .map(|t| {
            let engine = Arc::clone(&engine);
            std::thread::spawn(move || -> Result<(u64, u64), Error> {
                let mut rng = StdRng::seed_from_u64(200 + t);
                let mut buffer = vec![0u8; 1024];
                let (mut reads, mut hits) = (0, 0);
                for i in 0..300_000 {
                    let id = rng.random_range(0..HOT_KEYS);
                    let read = if i % 2 == 0 {
                        engine.get(&key(id))?
                    } else {
                        engine
                            .get_into(&key(id), &mut buffer)?
                            .map(|n| buffer[..n].to_vec())
                    };
                    reads += 1;
                    if let Some(bytes) = read {
                        assert!(is_valid(id, &bytes), "a wrong value for {id}");
                        hits += 1;
                    }
                }
                Ok((reads, hits))
            })
        })
        .collect();
    for reader in readers {
        let (r, h) = reader.join().expect("reader panicked")?;
        reads += r;
        hits += h;
    }
    stop.store(true, Ordering::Relaxed);
    for writer in writers {
        writer.join().expect("writer panicked")?;
    }
    println!("{reads} reads, {hits} hits");
    assert!(
        hits > reads / 10,
        "too few hits to mean anything: {hits} of {reads}"
    );
    Ok(())
}
