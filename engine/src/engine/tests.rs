//! Failures no integration test can cause: a metadata store that fails a sync, and a
//! reclaimer thread that panics. Both must poison the engine (nothing more is persisted, and
//! every call that would persist says [`Error::Poisoned`]) rather than go on as if the map
//! were durable, or lose the panic with the thread.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use super::{Durability, Engine};
use crate::meta::{MapEntry, MetaStore, MetadataStore};
use crate::{EngineConfig, Error, Result};

/// RocksDB's block map, failing or panicking on command.
#[derive(Debug)]
struct FaultyMeta {
    real: MetaStore,
    /// Every commit fails, as a failed sync does.
    fail_commits: Arc<AtomicBool>,
    /// A commit made by the reclaimer thread panics.
    panic_in_reclaimer: Arc<AtomicBool>,
}

impl MetadataStore for FaultyMeta {
    fn commit(&self, puts: &[(&[u8], MapEntry)], deletes: &[&[u8]]) -> Result<()> {
        if self.panic_in_reclaimer.load(Ordering::Acquire)
            && std::thread::current().name() == Some("mooncake-reclaimer")
        {
            panic!("injected: the reclaimer's commit panics");
        }
        if self.fail_commits.load(Ordering::Acquire) {
            return Err(Error::DataDir {
                path: PathBuf::from("meta"),
                action: "sync the block map (injected failure)",
                source: std::io::Error::other("injected"),
            });
        }
        self.real.commit(puts, deletes)
    }

    fn get(&self, key: &[u8]) -> Result<Option<MapEntry>> {
        self.real.get(key)
    }

    fn for_each_entry(&self, each: &mut dyn FnMut(&[u8], Result<MapEntry>)) -> Result<()> {
        self.real.for_each_entry(each)
    }
}

struct Faults {
    fail_commits: Arc<AtomicBool>,
    panic_in_reclaimer: Arc<AtomicBool>,
}

fn open_faulty(dir: &Path, dram_capacity_bytes: u64) -> (Engine, Faults) {
    let faults = Faults {
        fail_commits: Arc::new(AtomicBool::new(false)),
        panic_in_reclaimer: Arc::new(AtomicBool::new(false)),
    };
    let (fail_commits, panic_in_reclaimer) = (
        Arc::clone(&faults.fail_commits),
        Arc::clone(&faults.panic_in_reclaimer),
    );
    let engine = Engine::open_with_metadata(
        EngineConfig {
            dram_capacity_bytes,
            data_dir: Some(dir.to_owned()),
            nvme_capacity_bytes: 64 << 20,
            ..EngineConfig::default()
        },
        Box::new(move |real| {
            Box::new(FaultyMeta {
                real,
                fail_commits,
                panic_in_reclaimer,
            })
        }),
    )
    .expect("open");
    (engine, faults)
}

#[test]
fn a_failed_metadata_sync_poisons_the_engine() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (engine, faults) = open_faulty(dir.path(), 16 << 20);
    engine
        .put_with(b"durable", b"before", Durability::WriteThrough)
        .expect("a write-through put while the map syncs");
    faults.fail_commits.store(true, Ordering::Release);

    let failed = engine.put_with(b"lost", b"after", Durability::WriteThrough);
    assert!(
        matches!(failed, Err(Error::DataDir { .. })),
        "the put that met the failed sync gets its cause: {failed:?}"
    );
    // From now on nothing is persisted, even once the store would work again.
    faults.fail_commits.store(false, Ordering::Release);
    assert!(matches!(engine.flush(), Err(Error::Poisoned)));
    let next = engine.put_with(b"next", b"value", Durability::WriteThrough);
    assert!(matches!(next, Err(Error::Poisoned)), "{next:?}");
    // Reads go on: the blocks are still in DRAM.
    assert_eq!(
        engine.get(b"durable").expect("read").as_deref(),
        Some(&b"before"[..])
    );
}

#[test]
fn a_reclaimer_panic_is_reported_not_lost() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (engine, faults) = open_faulty(dir.path(), 4 << 20);
    faults.panic_in_reclaimer.store(true, Ordering::Release);
    // Past DRAM's high watermark: the reclaimer wakes and demotes, and its commit panics.
    let value = vec![7u8; 64 << 10];
    for i in 0..100u32 {
        engine
            .put(format!("block/{i}").as_bytes(), &value)
            .expect("a memory put");
    }
    // Polled without persisting anything here, which would leave the reclaimer nothing to do.
    let store = engine.inner.store.as_ref().expect("a data directory");
    let deadline = Instant::now() + Duration::from_secs(20);
    while store.check_poisoned().is_ok() {
        assert!(
            Instant::now() < deadline,
            "the reclaimer's panic never poisoned the engine"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(matches!(engine.flush(), Err(Error::Poisoned)));
    let put = engine.put_with(b"after", &value, Durability::WriteThrough);
    assert!(matches!(put, Err(Error::Poisoned)), "{put:?}");
    // Closing joins the thread that panicked without panicking itself.
    drop(engine);
}

/// A flush that cannot write a block names the block (the first thing an operator asks).
#[test]
fn a_failed_flush_names_the_block() {
    let dir = tempfile::tempdir().expect("tempdir");
    let (engine, faults) = open_faulty(dir.path(), 16 << 20);
    engine.put(b"cached-block-7", b"only in DRAM").expect("put");
    faults.fail_commits.store(true, Ordering::Release);
    let failed = engine.flush();
    match failed {
        Err(Error::Flush { key, source }) => {
            assert_eq!(key, "\"cached-block-7\"");
            assert!(matches!(*source, Error::DataDir { .. }), "{source:?}");
        }
        other => panic!("a flush that failed to commit: {other:?}"),
    }
}
