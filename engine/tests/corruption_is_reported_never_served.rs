//! Damage to a stopped node's data file: a flipped payload bit, a flipped header bit and a torn
//! write (the tail of a block never reached the disk). After reopening, each damaged block is
//! reported once (an error and the `corrupt_blocks` figure) and then treated as absent; it is
//! never returned, by any read path; every other block is still served; the offline verifier
//! names exactly the damaged keys. Serving a damaged KVCache block would silently corrupt a
//! model's output, which is the one thing this store must never do.

use std::os::unix::fs::FileExt;
use std::path::Path;

use mooncake_kv_engine::format::Error as FormatError;
use mooncake_kv_engine::offline::DataDir;
use mooncake_kv_engine::{AlignedBuf, Engine, EngineConfig, Error};

fn config(dir: &Path) -> EngineConfig {
    EngineConfig {
        dram_capacity_bytes: 8 << 20,
        data_dir: Some(dir.to_owned()),
        nvme_capacity_bytes: 32 << 20,
        promote_on_hit: false,
        ..EngineConfig::default()
    }
}

fn value(i: usize) -> Vec<u8> {
    (0..20_000 + i * 100).map(|j| (i + j * 3) as u8).collect()
}

fn key(i: usize) -> Vec<u8> {
    format!("key-{i:02}").into_bytes()
}

#[test]
fn damaged_blocks_are_reported_and_never_returned() -> Result<(), Error> {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let engine = Engine::open(config(dir.path()))?;
        for i in 0..20 {
            engine.put(&key(i), &value(i))?;
        }
        engine.flush()?;
    }
    // Damage three blocks in place, where the map says they are.
    let (payload_flip, header_flip, torn) = {
        let data_dir = DataDir::open(dir.path())?;
        let entry = |i| data_dir.entry(&key(i)).expect("map").expect("entry");
        (entry(3), entry(7), entry(11))
    };
    let data = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dir.path().join("blocks.data"))
        .expect("open data file");
    let flip = |at: u64| {
        let mut byte = [0u8];
        data.read_exact_at(&mut byte, at).expect("read");
        byte[0] ^= 0x10;
        data.write_all_at(&byte, at).expect("write");
    };
    flip(payload_flip.extent_offset_bytes + u64::from(payload_flip.payload_offset) + 1234);
    flip(header_flip.extent_offset_bytes + 20);
    let torn_from = torn.extent_offset_bytes + torn.block_len() - 4096;
    data.write_all_at(&[0u8; 4096], torn_from).expect("tear");
    data.sync_all().expect("sync");

    // The offline verifier names exactly the damaged keys.
    {
        let data_dir = DataDir::open(dir.path())?;
        let bad = data_dir.verify_all(|_, _| {})?;
        let mut names: Vec<Vec<u8>> = bad.iter().map(|b| b.key.clone()).collect();
        names.sort();
        assert_eq!(names, vec![key(3), key(7), key(11)]);
    }

    let engine = Engine::open(config(dir.path()))?;
    // Each read path reports its damaged block once...
    assert!(matches!(
        engine.get(&key(3)),
        Err(Error::Format(FormatError::PayloadChecksum { .. }))
    ));
    let mut aligned = AlignedBuf::zeroed(64 << 10);
    assert!(matches!(
        engine.get_into(&key(7), &mut aligned),
        Err(Error::Format(FormatError::HeaderChecksum { .. }))
    ));
    assert!(engine.pin(&key(11)).is_err());
    assert_eq!(engine.stats().corrupt_blocks, 3);
    // ...and from then on the block is absent, on every path.
    for i in [3, 7, 11] {
        assert_eq!(engine.get(&key(i))?, None);
        assert_eq!(engine.get_into(&key(i), &mut aligned)?, None);
        assert!(!engine.exists(&key(i)));
    }
    // Everything else is served, byte for byte.
    for i in (0..20).filter(|i| ![3, 7, 11].contains(i)) {
        assert_eq!(engine.get(&key(i))?, Some(value(i)), "block {i}");
    }
    assert_eq!(engine.stats().corrupt_blocks, 3);
    drop(engine);
    // Dropped from the map too: a restart does not bring them back.
    let engine = Engine::open(config(dir.path()))?;
    engine.flush()?;
    assert!(!engine.exists(&key(3)));
    Ok(())
}
