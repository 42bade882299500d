//! The engine's API contract, one behaviour per test: misses, overwrites and generations,
//! remove, batch forms, prefix matching, buffer and argument errors, stats. These are the
//! promises the README makes to an embedder; a regression in any of them would hand a serving
//! engine the wrong block or a panic instead of an error.

use mooncake_kv_engine::format::Error as FormatError;
use mooncake_kv_engine::{Engine, EngineConfig, Error, MAX_KEY_BYTES, MAX_VALUE_BYTES, TierKind};

fn engine() -> Engine {
    Engine::open(EngineConfig {
        dram_capacity_bytes: 16 << 20,
        ..EngineConfig::default()
    })
    .expect("open")
}

#[test]
fn get_returns_exactly_what_was_put() -> Result<(), Error> {
    let engine = engine();
    let value: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
    engine.put(b"a", &value)?;
    assert_eq!(engine.get(b"a")?.as_deref(), Some(&value[..]));
    let mut target = vec![0u8; 200_000];
    assert_eq!(engine.get_into(b"a", &mut target)?, Some(value.len()));
    assert_eq!(&target[..value.len()], &value[..]);
    assert!(
        target[value.len()..].iter().all(|&b| b == 0),
        "bytes past the value untouched"
    );
    engine.put(b"empty", b"")?;
    assert_eq!(engine.get(b"empty")?, Some(Vec::new()));
    Ok(())
}

#[test]
fn miss_is_none_not_an_error() -> Result<(), Error> {
    let engine = engine();
    assert_eq!(engine.get(b"nope")?, None);
    let mut target = [7u8; 4];
    assert_eq!(engine.get_into(b"nope", &mut target)?, None);
    assert_eq!(target, [7; 4]);
    assert!(engine.pin(b"nope")?.is_none());
    assert!(!engine.exists(b"nope"));
    assert!(!engine.remove(b"nope"));
    Ok(())
}

#[test]
fn overwrite_bumps_the_generation_and_replaces_the_bytes() -> Result<(), Error> {
    let engine = engine();
    let first = engine.put(b"k", b"one")?;
    let pinned_old = engine.pin(b"k")?.expect("present");
    let second = engine.put(b"k", b"two, longer")?;
    assert!(second > first);
    assert_eq!(engine.get(b"k")?.as_deref(), Some(&b"two, longer"[..]));
    let pinned_new = engine.pin(b"k")?.expect("present");
    assert_eq!(pinned_new.generation(), second);
    // A reader that pinned the old block keeps reading the old bytes, and can tell.
    assert_eq!(pinned_old.generation(), first);
    assert_eq!(pinned_old.payload(), b"one");
    let stats = engine.stats();
    assert_eq!(stats.tiers[0].blocks, 1);
    assert_eq!(stats.tiers[0].payload_bytes, 11);
    Ok(())
}

#[test]
fn remove_frees_space_once_readers_let_go() -> Result<(), Error> {
    let engine = engine();
    engine.put(b"k", &[1; 50_000])?;
    let used = engine.stats().tiers[0].used_bytes;
    assert!(used >= 50_000);
    let pinned = engine.pin(b"k")?.expect("present");
    assert!(engine.remove(b"k"));
    assert!(!engine.exists(b"k"));
    assert_eq!(engine.get(b"k")?, None);
    assert_eq!(
        pinned.payload(),
        &[1; 50_000][..],
        "a pinned reader finishes with its bytes"
    );
    assert_eq!(
        engine.stats().tiers[0].used_bytes,
        used,
        "space held while pinned"
    );
    drop(pinned);
    assert_eq!(engine.stats().tiers[0].used_bytes, 0);
    assert_eq!(engine.stats().removes, 1);
    Ok(())
}

#[test]
fn batch_forms_match_single_calls() -> Result<(), Error> {
    let engine = engine();
    let items: Vec<(Vec<u8>, Vec<u8>)> = (0..10u8)
        .map(|i| (vec![b'k', i], vec![i; 1000 + usize::from(i)]))
        .collect();
    let refs: Vec<(&[u8], &[u8])> = items.iter().map(|(k, v)| (&k[..], &v[..])).collect();
    let generations: Vec<u64> = engine
        .put_batch(&refs)
        .into_iter()
        .collect::<Result<_, _>>()?;
    assert!(generations.windows(2).all(|w| w[0] < w[1]));
    let keys: Vec<&[u8]> = items
        .iter()
        .map(|(k, _)| &k[..])
        .chain([&b"missing"[..]])
        .collect();
    assert_eq!(
        engine.exists_batch(&keys),
        [vec![true; 10], vec![false]].concat()
    );
    let got = engine.get_batch(&keys);
    for (i, result) in got.into_iter().enumerate() {
        assert_eq!(result?, items.get(i).map(|(_, v)| v.clone()));
    }
    let mut buffers = vec![vec![0u8; 2000]; 10];
    let mut requests: Vec<(&[u8], &mut [u8])> = items
        .iter()
        .zip(buffers.iter_mut())
        .map(|((k, _), b)| (&k[..], &mut b[..]))
        .collect();
    for (i, result) in engine.get_into_batch(&mut requests).into_iter().enumerate() {
        assert_eq!(result?, Some(1000 + i));
    }
    for (i, buffer) in buffers.iter().enumerate() {
        assert_eq!(&buffer[..1000 + i], &items[i].1[..]);
    }
    assert_eq!(engine.remove_batch(&keys[..3]), vec![true; 3]);
    assert_eq!(engine.stats().tiers[0].blocks, 7);
    // A bad item fails alone.
    let results = engine.put_batch(&[(b"", b"x"), (b"ok", b"y")]);
    assert!(matches!(
        results[0],
        Err(Error::Format(FormatError::EmptyKey))
    ));
    assert!(results[1].is_ok());
    // Everything held (the 7 left and "ok") goes at once.
    assert_eq!(engine.remove_all(), 8);
    assert_eq!(engine.stats().tiers[0].blocks, 0);
    assert_eq!(engine.remove_all(), 0);
    Ok(())
}

#[test]
fn prefix_match_counts_leading_present_keys() -> Result<(), Error> {
    let engine = engine();
    let chain: Vec<Vec<u8>> = (0..8u32).map(|i| i.to_le_bytes().to_vec()).collect();
    let keys: Vec<&[u8]> = chain.iter().map(|k| &k[..]).collect();
    assert_eq!(engine.prefix_match(&keys), 0);
    for key in &keys[..5] {
        engine.put(key, b"block")?;
    }
    assert_eq!(engine.prefix_match(&keys), 5);
    engine.remove(keys[2]);
    assert_eq!(engine.prefix_match(&keys), 2, "a hole ends the prefix");
    assert_eq!(engine.prefix_match(&[]), 0);
    Ok(())
}

#[test]
fn bad_arguments_are_typed_errors() {
    let engine = engine();
    assert!(matches!(
        engine.put(b"", b"v"),
        Err(Error::Format(FormatError::EmptyKey))
    ));
    let long_key = vec![0u8; MAX_KEY_BYTES + 1];
    assert!(matches!(
        engine.put(&long_key, b"v"),
        Err(Error::Format(FormatError::KeyTooLong { .. }))
    ));
    assert!(
        engine.put(&long_key[..MAX_KEY_BYTES], b"v").is_ok(),
        "the maximum is allowed"
    );
    let big = vec![0u8; MAX_VALUE_BYTES + 1];
    assert!(matches!(
        engine.put(b"k", &big),
        Err(Error::Format(FormatError::ValueTooLarge { .. }))
    ));
    engine.put(b"k", &[3; 100]).expect("put");
    let mut small = [0u8; 99];
    assert!(matches!(
        engine.get_into(b"k", &mut small),
        Err(Error::BufferTooSmall {
            needed_bytes: 100,
            available_bytes: 99
        })
    ));
    // Larger than the whole tier: refused at once, nothing evicted.
    assert!(matches!(
        engine.put(b"huge", &vec![0; 17 << 20]),
        Err(Error::NoSpace { .. })
    ));
    assert!(engine.exists(b"k"));
}

#[test]
fn bad_config_is_refused_with_the_field_named() {
    let config = EngineConfig {
        low_watermark_percent: 99,
        ..EngineConfig::default()
    };
    match Engine::open(config) {
        Err(Error::Config { field, .. }) => assert_eq!(field, "low_watermark_percent"),
        other => panic!("expected a config error, got {other:?}"),
    }
}

#[test]
fn stats_count_hits_misses_and_puts() -> Result<(), Error> {
    let engine = engine();
    engine.put(b"a", b"1")?;
    engine.get(b"a")?;
    engine.get(b"a")?;
    engine.get(b"b")?;
    let stats = engine.stats();
    let dram = &stats.tiers[0];
    assert_eq!(dram.kind, TierKind::Dram);
    assert_eq!((dram.hits, dram.misses, stats.puts), (2, 1, 1));
    assert_eq!(dram.capacity_bytes, 16 << 20);
    assert!(dram.used_bytes > 0 && dram.used_bytes < 1024);
    Ok(())
}

#[test]
fn a_pinned_block_says_where_it_lies_in_the_shared_region() -> Result<(), Error> {
    use std::os::unix::fs::FileExt;
    let engine = engine();
    let value: Vec<u8> = (0..70_000u32).map(|i| (i % 251) as u8).collect();
    let generation = engine.put(b"located", &value)?;
    engine.put(b"other", &[9; 1000])?;
    let pinned = engine.pin(b"located")?.expect("present");
    // Read the block the way a peer would: from the region's memfd at the offset given.
    let file = std::fs::File::from(engine.dram().memfd().try_clone_to_owned().unwrap());
    let mut bytes = vec![0u8; usize::try_from(pinned.block_len()).unwrap()];
    file.read_exact_at(&mut bytes, pinned.block_offset())
        .unwrap();
    let block = mooncake_kv_engine::format::decode(&bytes).expect("a whole, valid block");
    assert_eq!(block.key, b"located");
    assert_eq!(block.payload, &value[..]);
    assert_eq!(block.header.generation, generation);
    assert_eq!(block.header.payload_offset, pinned.payload_offset());
    assert!(pinned.block_offset() + pinned.block_len() <= engine.dram().region_len_bytes());
    Ok(())
}

#[test]
fn a_two_phase_put_is_invisible_until_committed_and_returns_its_space_if_dropped()
-> Result<(), Error> {
    use mooncake_kv_engine::Durability;
    let engine = engine();
    engine.put(b"k", b"old")?;
    let value: Vec<u8> = (0..100_000u32).map(|i| (i % 239) as u8).collect();
    let mut reservation = engine.reserve(b"k", value.len())?;
    assert_eq!(reservation.payload_len(), value.len());
    reservation.payload_mut().copy_from_slice(&value);
    // Until the commit, readers see the old block.
    assert_eq!(engine.get(b"k")?.as_deref(), Some(&b"old"[..]));
    let used = engine.stats().tiers[0].used_bytes;
    let generation = engine.commit(reservation, Durability::Memory)?;
    assert_eq!(engine.get(b"k")?.as_deref(), Some(&value[..]));
    assert_eq!(engine.pin(b"k")?.expect("present").generation(), generation);
    assert!(
        engine.stats().tiers[0].used_bytes < used,
        "the old block's space came back"
    );

    // A dropped reservation gives its space back and leaves nothing behind.
    let before = engine.stats().tiers[0].used_bytes;
    let abandoned = engine.reserve(b"never", 1 << 20)?;
    assert!(engine.stats().tiers[0].used_bytes > before);
    drop(abandoned);
    assert_eq!(engine.stats().tiers[0].used_bytes, before);
    assert!(!engine.exists(b"never"));

    // Limits as for put.
    assert!(matches!(
        engine.reserve(b"big", MAX_VALUE_BYTES + 1),
        Err(Error::Format(FormatError::ValueTooLarge { .. }))
    ));
    assert!(matches!(
        engine.reserve(b"", 1),
        Err(Error::Format(FormatError::EmptyKey))
    ));
    assert!(matches!(
        engine.commit(engine.reserve(b"x", 1)?, Durability::WriteThrough),
        Err(Error::NotPersistent)
    ));
    Ok(())
}

#[test]
fn keys_lists_every_block_once() -> Result<(), Error> {
    let engine = engine();
    for i in 0..500 {
        engine.put(format!("k{i}").as_bytes(), b"v")?;
    }
    engine.remove(b"k7");
    engine.put(b"k8", b"overwritten")?;
    let mut keys = engine.keys();
    keys.sort();
    let mut expected: Vec<Vec<u8>> = (0..500)
        .filter(|&i| i != 7)
        .map(|i| format!("k{i}").into_bytes())
        .collect();
    expected.sort();
    assert_eq!(keys, expected);
    Ok(())
}
