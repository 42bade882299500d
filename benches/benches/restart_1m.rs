//! Restart cost: how long `Engine::open` takes on a data directory holding 1M persisted blocks
//! (empty payloads, so each block is one 4 KiB extent and the figure is the cost of the map,
//! not of the bytes). Builds the directory once through the engine (put and flush), then
//! reopens it three times and prints each time and the median.
//!
//! Run: `cargo bench -p mooncake-kv-benches --bench restart_1m`. Environment:
//! `RESTART_BLOCKS` (default 1000000), `RESTART_DIR` (default a temporary directory under
//! `target/`).

use std::time::Instant;

use mooncake_kv_engine::{Engine, EngineConfig};

fn main() {
    let blocks: u64 = std::env::var("RESTART_BLOCKS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    std::fs::create_dir_all("target").expect("target dir");
    let scratch = tempfile::tempdir_in("target").expect("tempdir");
    let dir = std::env::var("RESTART_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| scratch.path().to_owned());
    let config = EngineConfig {
        dram_capacity_bytes: (blocks * 512 * 2).next_multiple_of(1 << 20).max(64 << 20),
        high_watermark_percent: 100,
        low_watermark_percent: 99,
        data_dir: Some(dir.clone()),
        // Room to spare, so the NVMe watermark (95%) never evicts what the bench counts on.
        nvme_capacity_bytes: (blocks * 4096 / 80 * 100).next_multiple_of(1 << 20),
        ..EngineConfig::default()
    };
    let started = Instant::now();
    {
        let engine = Engine::open(config.clone()).expect("open");
        for i in 0..blocks {
            engine
                .put(format!("restart-bench-{i:010}").as_bytes(), b"")
                .expect("put");
            if i % 100_000 == 99_999 {
                engine.flush().expect("flush");
            }
        }
        engine.flush().expect("flush");
    }
    println!(
        "built {blocks} blocks in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let mut times = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        let engine = Engine::open(config.clone()).expect("reopen");
        let elapsed = started.elapsed().as_secs_f64();
        assert_eq!(
            engine.stats().tiers[1].blocks,
            blocks,
            "every block is back"
        );
        println!("reopen with {blocks} blocks: {elapsed:.2} s");
        times.push(elapsed);
        drop(engine);
    }
    times.sort_by(f64::total_cmp);
    println!("median reopen: {:.2} s", times[1]);
}
