//! Crash safety with real processes: a writer process puts and flushes batches of blocks in a
//! loop, acknowledging each batch on stdout once its flush returned; the test kills it with
//! SIGKILL at a random moment, then checks the data directory offline (no map entry may point
//! at anything but its own intact block) and reopens it: every acknowledged block must be
//! served with exactly its bytes, and any other block served must be exactly what was put.
//! The cycles share one directory, so recovery also recovers from earlier recoveries.
//!
//! `CRASH_CYCLES` sets the number of kill cycles (default 30; run 200+ by hand:
//! `CRASH_CYCLES=200 cargo test -p mooncake-kv-tools --test crash_recovery_sigkill`).

use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use mooncake_kv_engine::offline::DataDir;
use mooncake_kv_engine::{Engine, EngineConfig, Error};
use mooncake_kv_tools::crash_value;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[test]
fn acknowledged_blocks_survive_sigkill() -> anyhow::Result<()> {
    let cycles: usize = std::env::var("CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(30);
    let dir = tempfile::tempdir()?;
    let mut rng = StdRng::seed_from_u64(
        std::env::var("CRASH_SEED")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0x0c0ffee),
    );
    let (mut total_acked, mut total_checked, mut total_orphans) = (0usize, 0usize, 0u64);
    for cycle in 0..cycles {
        let prefix = format!("c{cycle}");
        let batch: usize = rng.random_range(1..16);
        let wait = Duration::from_millis(rng.random_range(0..300));
        let acked = run_writer_then_kill(dir.path(), &prefix, batch, wait)?;
        let last_acked = acked.last().copied();

        // Offline: every map entry points at its own intact block.
        {
            let data_dir = DataDir::open(dir.path())?;
            let bad = data_dir.verify_all(|_, _| {})?;
            assert!(
                bad.is_empty(),
                "cycle {cycle}: map entries pointing at bad blocks: {bad:?}"
            );
            // Blocks written but not committed when the kill came: free space on reopen.
            total_orphans += data_dir.summary()?.orphans;
        }

        // Online: every acknowledged block is served, byte for byte; so is anything else found.
        let engine = Engine::open(reopen(dir.path()))?;
        total_checked += check_served(
            &engine,
            &prefix,
            batch,
            last_acked,
            &format!("cycle {cycle}"),
        )?;
        assert_eq!(engine.stats().corrupt_blocks, 0, "cycle {cycle}");
        total_acked += acked.len() * batch;
        drop(engine);
    }
    println!(
        "{cycles} kill cycles: {total_acked} acknowledged blocks, {total_checked} blocks read back \
         intact, {total_orphans} orphan blocks seen (and reclaimed)"
    );
    assert!(
        total_acked > 0,
        "the writer never acknowledged anything: the test proved nothing"
    );
    Ok(())
}

/// Kill the writer at a random moment, then damage the metadata log at a random offset: the
/// engine either opens and serves every acknowledged block byte-exact, or refuses with
/// [`Error::DamagedMetadata`], after which `salvage` brings back every acknowledged block
/// (their bytes are intact in the data file), byte-exact. No cycle may serve a wrong byte.
/// `CRASH_CYCLES` sets the cycles here too (default 8: each salvage scans a 1 GiB data file).
#[test]
fn damaged_metadata_after_sigkill_is_refused_then_salvaged() -> anyhow::Result<()> {
    let cycles: usize = std::env::var("CRASH_CYCLES")
        .ok()
        .and_then(|v| v.parse().ok())
        .map_or(8, |n: usize| n.min(8));
    let mut rng = StdRng::seed_from_u64(0xda3a6e);
    let (mut refused, mut opened, mut recovered) = (0, 0, 0usize);
    for cycle in 0..cycles {
        let dir = tempfile::tempdir()?;
        let batch: usize = rng.random_range(1..8);
        let wait = Duration::from_millis(rng.random_range(100..400));
        let last_acked = run_writer_then_kill(dir.path(), "d", batch, wait)?
            .last()
            .copied();

        let log = std::fs::read_dir(dir.path().join("meta"))?
            .map(|e| e.map(|e| e.path()))
            .collect::<Result<Vec<_>, _>>()?
            .into_iter()
            .filter(|p| p.extension().is_some_and(|e| e == "log"))
            .max_by_key(|p| std::fs::metadata(p).map_or(0, |m| m.len()));
        let Some(log) = log else { continue };
        let mut bytes = std::fs::read(&log)?;
        if bytes.is_empty() {
            continue;
        }
        let at = rng.random_range(0..bytes.len());
        bytes[at] ^= 1 << rng.random_range(0..8);
        std::fs::write(&log, &bytes)?;

        let engine = match Engine::open(reopen(dir.path())) {
            Ok(engine) => {
                opened += 1;
                engine
            }
            Err(Error::DamagedMetadata { .. }) => {
                refused += 1;
                mooncake_kv_engine::offline::salvage(dir.path(), |_, _| {})?;
                Engine::open(reopen(dir.path()))?
            }
            Err(other) => panic!("cycle {cycle}: damage at {at} of {log:?}: {other}"),
        };
        let context = format!("cycle {cycle}, damage at byte {at}");
        recovered += check_served(&engine, "d", batch, last_acked, &context)?;
    }
    println!(
        "{cycles} cycles: {refused} refused and salvaged, {opened} opened despite the damage, \
         {recovered} blocks read back intact"
    );
    assert!(
        refused > 0,
        "no damage was ever detected: the test proved nothing"
    );
    Ok(())
}

/// Runs the crash writer on `dir` (keys `PREFIX-BATCH-I`, `batch` per batch), SIGKILLs it
/// `after` it has opened the directory, and returns the batches it acknowledged.
fn run_writer_then_kill(
    dir: &std::path::Path,
    prefix: &str,
    batch: usize,
    after: Duration,
) -> anyhow::Result<Vec<u64>> {
    let mut child = Command::new(env!("CARGO_BIN_EXE_mooncake-crash-writer"))
        .arg(dir)
        .arg(prefix)
        .arg(batch.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()?;
    // Read acknowledgements on a thread, so the kill lands at a time of our choosing.
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // Wait until the writer has the directory open, then let it run for a while.
    let opened = rx.recv_timeout(Duration::from_secs(30))?;
    assert_eq!(opened, "OPEN", "the writer failed to start");
    std::thread::sleep(after);
    child.kill()?; // SIGKILL
    child.wait()?;
    reader.join().expect("reader thread");
    Ok(rx
        .try_iter()
        .filter_map(|line| line.strip_prefix("ACK ").and_then(|n| n.parse().ok()))
        .collect())
}

/// The engine config the crash writer uses, for reopening its directory.
fn reopen(dir: &std::path::Path) -> EngineConfig {
    EngineConfig {
        dram_capacity_bytes: 4 << 20,
        data_dir: Some(dir.to_owned()),
        nvme_capacity_bytes: 1 << 30,
        ..EngineConfig::default()
    }
}

/// Every acknowledged block (batches up to `last_acked`) is served, byte for byte; so is any
/// other block found (one batch past the last ack may be there). Returns the blocks read.
fn check_served(
    engine: &Engine,
    prefix: &str,
    batch: usize,
    last_acked: Option<u64>,
    context: &str,
) -> anyhow::Result<usize> {
    let mut served = 0;
    for b in 0..last_acked.map_or(0, |b| b + 2) {
        for i in 0..batch {
            let key = format!("{prefix}-{b}-{i}");
            match engine.get(key.as_bytes())? {
                Some(value) => {
                    assert!(
                        value == crash_value(key.as_bytes()),
                        "{context}: wrong bytes for {key}"
                    );
                    served += 1;
                }
                None => assert!(
                    last_acked.is_none_or(|last| b > last),
                    "{context}: acknowledged block {key} lost (last ack {last_acked:?})"
                ),
            }
        }
    }
    Ok(served)
}
