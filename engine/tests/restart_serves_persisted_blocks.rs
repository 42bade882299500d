//! A data directory across restarts: blocks made durable (flush, write-through, demotion) are
//! served again with exactly their bytes after the engine is dropped and reopened; blocks
//! that were only in DRAM are gone; removals become durable at the next commit; the node id
//! is stable; a directory of another version, or whose files disagree, or that another
//! engine holds, is refused without being changed. What could break: a map entry pointing at
//! the wrong extent, a generation reused after restart, a half-checked directory opened anyway.

use std::collections::BTreeMap;
use std::path::Path;

use mooncake_kv_engine::{Durability, Engine, EngineConfig, Error, IoBackendKind};

fn config(dir: &Path) -> EngineConfig {
    EngineConfig {
        dram_capacity_bytes: 16 << 20,
        data_dir: Some(dir.to_owned()),
        nvme_capacity_bytes: 64 << 20,
        ..EngineConfig::default()
    }
}

fn value(i: usize, len: usize) -> Vec<u8> {
    (0..len).map(|j| (i * 131 + j * 7) as u8).collect()
}

#[test]
fn flushed_blocks_survive_a_restart_and_unflushed_ones_do_not() -> Result<(), Error> {
    let dir = tempfile::tempdir().expect("tempdir");
    let (node_id, last_generation) = {
        let engine = Engine::open(config(dir.path()))?;
        for i in 0..20 {
            engine.put(format!("kept-{i}").as_bytes(), &value(i, 1000 + i * 5000))?;
        }
        engine.put(b"removed", b"gone after the flush")?;
        engine.put(b"write-through", &value(99, 70_000))?;
        assert_eq!(engine.flush()?, 22);
        assert_eq!(engine.flush()?, 0, "nothing new to write");
        engine.remove(b"removed");
        // Committed by the write-through put, like any pending removal.
        let last = engine.put_with(b"durable-now", b"write-through", Durability::WriteThrough)?;
        engine.put(b"dram-only", b"lost on restart")?;
        (engine.node_id().expect("has a data dir"), last)
    };
    let engine = Engine::open(config(dir.path()))?;
    assert_eq!(engine.node_id(), Some(node_id), "node id is created once");
    for i in 0..20 {
        let key = format!("kept-{i}");
        assert_eq!(
            engine.get(key.as_bytes())?,
            Some(value(i, 1000 + i * 5000)),
            "{key}"
        );
    }
    assert_eq!(
        engine.get(b"durable-now")?.as_deref(),
        Some(&b"write-through"[..])
    );
    assert_eq!(engine.get(b"write-through")?, Some(value(99, 70_000)));
    assert_eq!(engine.get(b"dram-only")?, None, "only in DRAM: gone");
    assert_eq!(engine.get(b"removed")?, None, "the removal was committed");
    let stats = engine.stats();
    assert_eq!(stats.tiers[1].blocks, 22);
    assert_eq!(stats.corrupt_blocks, 0);
    // Generations keep growing across restarts, so a stale reader can still tell.
    assert!(engine.put(b"new", b"x")? > last_generation);
    Ok(())
}

#[test]
fn get_into_reads_nvme_blocks_into_aligned_and_unaligned_buffers() -> Result<(), Error> {
    let dir = tempfile::tempdir().expect("tempdir");
    let sizes = [0usize, 1, 4095, 4096, 4097, 100_000, 1 << 20];
    {
        let engine = Engine::open(config(dir.path()))?;
        for (i, len) in sizes.iter().enumerate() {
            engine.put(format!("b{i}").as_bytes(), &value(i, *len))?;
        }
        engine.flush()?;
    }
    // No promotion, so every read below comes from NVMe.
    let engine = Engine::open(EngineConfig {
        promote_on_hit: false,
        ..config(dir.path())
    })?;
    let mut aligned = mooncake_kv_engine::AlignedBuf::zeroed((1 << 20) + 8192);
    for (i, len) in sizes.iter().enumerate() {
        let key = format!("b{i}");
        // Straight into an aligned buffer with room to spare.
        assert_eq!(engine.get_into(key.as_bytes(), &mut aligned)?, Some(*len));
        assert_eq!(&aligned[..*len], &value(i, *len)[..], "{key} aligned");
        // Through a bounce buffer into one that starts off alignment and is exactly long enough.
        let mut unaligned = vec![0u8; len + 1];
        assert_eq!(
            engine.get_into(key.as_bytes(), &mut unaligned[1..])?,
            Some(*len)
        );
        assert_eq!(&unaligned[1..], &value(i, *len)[..], "{key} unaligned");
    }
    let stats = engine.stats();
    assert_eq!(stats.tiers[1].hits, 2 * sizes.len() as u64);
    assert_eq!(stats.promotions, 0);
    Ok(())
}

#[test]
fn psync_backend_reads_what_io_uring_wrote() -> Result<(), Error> {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let engine = Engine::open(config(dir.path()))?;
        assert_eq!(engine.stats().nvme_io_backend, Some("io_uring"));
        engine.put(b"k", &value(1, 123_456))?;
        engine.flush()?;
    }
    let engine = Engine::open(EngineConfig {
        nvme_io_backend: IoBackendKind::Psync,
        ..config(dir.path())
    })?;
    assert_eq!(engine.stats().nvme_io_backend, Some("psync"));
    assert_eq!(engine.get(b"k")?, Some(value(1, 123_456)));
    Ok(())
}

#[test]
fn a_second_engine_cannot_open_a_held_directory() -> Result<(), Error> {
    let dir = tempfile::tempdir().expect("tempdir");
    let _first = Engine::open(config(dir.path()))?;
    match Engine::open(config(dir.path())) {
        Err(Error::DirectoryInUse { holder, .. }) => {
            assert!(holder.contains(&std::process::id().to_string()), "{holder}")
        }
        other => panic!("expected DirectoryInUse, got {other:?}"),
    }
    Ok(())
}

/// Every file of a directory tree with its length and contents' CRC.
fn snapshot(dir: &Path) -> BTreeMap<String, (u64, u32)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).expect("read_dir") {
            let path = entry.expect("entry").path();
            if path.is_dir() {
                stack.push(path);
            } else if path.file_name().is_some_and(|n| n != "LOCK") {
                let bytes = std::fs::read(&path).expect("read");
                out.insert(
                    path.display().to_string(),
                    (bytes.len() as u64, crc32fast::hash(&bytes)),
                );
            }
        }
    }
    out
}

#[test]
fn mismatched_directories_are_refused_and_left_unchanged() -> Result<(), Error> {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let engine = Engine::open(config(dir.path()))?;
        engine.put(b"k", b"v")?;
        engine.flush()?;
    }
    let before = snapshot(dir.path());
    // Another capacity than the directory was made with.
    let resized = EngineConfig {
        nvme_capacity_bytes: 128 << 20,
        ..config(dir.path())
    };
    assert!(matches!(
        Engine::open(resized),
        Err(Error::IncompatibleDataDir { .. })
    ));
    assert_eq!(snapshot(dir.path()), before);
    // A data file of the wrong size.
    let data = dir.path().join("blocks.data");
    let saved = std::fs::read(&data).expect("read data file");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&data)
        .and_then(|f| f.set_len(4096))
        .expect("truncate");
    match Engine::open(config(dir.path())) {
        Err(Error::IncompatibleDataDir { reason, .. }) => {
            assert!(reason.contains("data file"), "{reason}")
        }
        other => panic!("expected IncompatibleDataDir, got {other:?}"),
    }
    std::fs::write(&data, &saved).expect("restore");
    assert_eq!(snapshot(dir.path()), before);
    // Restored, it opens and serves.
    let engine = Engine::open(config(dir.path()))?;
    assert_eq!(engine.get(b"k")?.as_deref(), Some(&b"v"[..]));
    Ok(())
}

#[test]
fn write_through_needs_a_data_directory() {
    let engine = Engine::open(EngineConfig {
        dram_capacity_bytes: 4 << 20,
        ..EngineConfig::default()
    })
    .expect("open");
    assert!(matches!(
        engine.put_with(b"k", b"v", Durability::WriteThrough),
        Err(Error::NotPersistent)
    ));
    assert!(matches!(engine.flush(), Err(Error::NotPersistent)));
}

#[test]
fn a_directory_of_another_format_version_is_refused_and_left_unchanged() -> Result<(), Error> {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let engine = Engine::open(config(dir.path()))?;
        engine.put(b"k", b"v")?;
        engine.flush()?;
    }
    // Rewrite the recorded version as a future build would have written it.
    {
        let cfs = ["blocks", "node"];
        let db = rocksdb::DB::open_cf(&rocksdb::Options::default(), dir.path().join("meta"), cfs)
            .expect("open the metadata");
        let node = db.cf_handle("node").expect("node family");
        db.put_cf(node, b"format_version", 2u32.to_le_bytes())
            .expect("write the version");
        db.flush_cf(node).expect("flush");
    }
    let before = snapshot(dir.path());
    match Engine::open(config(dir.path())) {
        Err(Error::IncompatibleDataDir { reason, .. }) => {
            assert!(reason.contains("format version 2"), "{reason}")
        }
        other => panic!("expected IncompatibleDataDir, got {other:?}"),
    }
    assert_eq!(
        snapshot(dir.path()),
        before,
        "a refused directory is left as it was"
    );
    Ok(())
}
