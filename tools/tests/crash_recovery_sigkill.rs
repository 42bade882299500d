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
use mooncake_kv_engine::{Engine, EngineConfig};
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
        let mut child = Command::new(env!("CARGO_BIN_EXE_mooncake-crash-writer"))
            .arg(dir.path())
            .arg(&prefix)
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
        // Wait until the writer has the directory open, then let it run for a random while.
        let opened = rx.recv_timeout(Duration::from_secs(30))?;
        assert_eq!(opened, "OPEN", "cycle {cycle}: the writer failed to start");
        std::thread::sleep(Duration::from_millis(rng.random_range(0..300)));
        child.kill()?; // SIGKILL
        child.wait()?;
        reader.join().expect("reader thread");
        let acked: Vec<u64> = rx
            .try_iter()
            .filter_map(|line| line.strip_prefix("ACK ").and_then(|n| n.parse().ok()))
            .collect();
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
        let engine = Engine::open(EngineConfig {
            dram_capacity_bytes: 4 << 20,
            data_dir: Some(dir.path().to_owned()),
            nvme_capacity_bytes: 1 << 30,
            ..EngineConfig::default()
        })?;
        let upper = last_acked.map_or(0, |b| b + 2); // one batch past the last ack may be there
        for b in 0..upper {
            for i in 0..batch {
                let key = format!("{prefix}-{b}-{i}");
                match engine.get(key.as_bytes())? {
                    Some(value) => {
                        assert!(
                            value == crash_value(key.as_bytes()),
                            "cycle {cycle}: wrong bytes for {key}"
                        );
                        total_checked += 1;
                    }
                    None => assert!(
                        last_acked.is_none_or(|last| b > last),
                        "cycle {cycle}: acknowledged block {key} lost (last ack {last_acked:?})"
                    ),
                }
            }
        }
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
