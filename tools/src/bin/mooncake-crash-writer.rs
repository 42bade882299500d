//! Test helper for the crash test (not a tool for operators): opens an engine on DIR and, in a
//! loop, puts a batch of blocks, flushes, and prints `ACK <batch>` once the flush returned.
//! Every acknowledged block must survive a SIGKILL at any moment. Keys are
//! `<PREFIX>-<batch>-<i>`; values are `crash_value(key)`.
//!
//! `mooncake-crash-writer DIR PREFIX BATCH` (BATCH: blocks per flush)

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use mooncake_kv_engine::{Engine, EngineConfig};
use mooncake_kv_tools::crash_value;

fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let usage = "usage: mooncake-crash-writer DIR PREFIX BATCH";
    let dir = PathBuf::from(args.next().context(usage)?);
    let prefix = args.next().context(usage)?;
    let batch_size: u64 = args
        .next()
        .context(usage)?
        .parse()
        .context("BATCH must be an integer")?;
    let engine = Engine::open(EngineConfig {
        // Small DRAM, so the background reclaimer demotes while the writer flushes.
        dram_capacity_bytes: 4 << 20,
        data_dir: Some(dir),
        nvme_capacity_bytes: 1 << 30,
        ..EngineConfig::default()
    })?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "OPEN")?;
    stdout.flush()?;
    for batch in 0u64.. {
        for i in 0..batch_size {
            let key = format!("{prefix}-{batch}-{i}");
            engine.put(key.as_bytes(), &crash_value(key.as_bytes()))?;
        }
        engine.flush()?;
        writeln!(stdout, "ACK {batch}")?;
        stdout.flush()?;
    }
    Ok(())
}
