//! The embedding demo: opens an engine, stores the blocks of two prompt prefixes that share
//! their start, asks how much of a third prompt is cached, reads blocks back (one copy into a
//! caller buffer, and zero copies through a pin), pushes the tier past its watermark so
//! eviction runs, and prints the stats.
//!
//! `cargo run --release -p mooncake-kv-engine --example quickstart [CAPACITY_MIB] [BLOCK_KIB]`
//! (defaults: 256 MiB, 512 KiB).

use std::process::ExitCode;
use std::time::Instant;

use mooncake_kv_engine::{Engine, EngineConfig};

fn parse_arg(index: usize, default: u64, name: &str) -> Result<u64, String> {
    match std::env::args().nth(index) {
        None => Ok(default),
        Some(text) => text
            .parse()
            .ok()
            .filter(|&v| v > 0)
            .ok_or_else(|| format!("{name} must be a positive integer, got {text:?}")),
    }
}

/// The key of block `i` of a prompt: in a serving engine, a hash of the tokens up to it.
fn block_key(prompt: &str, i: usize) -> Vec<u8> {
    format!("{prompt}/block/{i:04}").into_bytes()
}

fn run() -> Result<(), Box<dyn std::error::Error>> {
    let capacity_mib = parse_arg(1, 256, "CAPACITY_MIB")?;
    let block_kib = parse_arg(2, 512, "BLOCK_KIB")?;
    let block_bytes = usize::try_from(block_kib * 1024)?;
    let engine = Engine::open(EngineConfig {
        dram_capacity_bytes: capacity_mib << 20,
        ..EngineConfig::default()
    })?;
    println!(
        "opened an engine with {capacity_mib} MiB of DRAM ({:?} pages), blocks of {block_kib} KiB",
        engine.stats().huge_pages
    );

    // Two prompts that share a system prompt: 8 common blocks, then 8 of their own.
    let started = Instant::now();
    let mut stored = 0usize;
    for prompt in ["system+chat-a", "system+chat-b"] {
        for i in 0..16 {
            let key = if i < 8 {
                block_key("system", i)
            } else {
                block_key(prompt, i)
            };
            let value = vec![(i as u8).wrapping_mul(31); block_bytes];
            engine.put(&key, &value)?;
            stored += block_bytes;
        }
    }
    let elapsed = started.elapsed();
    println!(
        "put 32 blocks ({} MiB) in {:.1} ms: {:.2} GiB/s",
        stored >> 20,
        elapsed.as_secs_f64() * 1e3,
        stored as f64 / elapsed.as_secs_f64() / f64::from(1 << 30)
    );

    // A third prompt with the same system prompt: how many leading blocks are cached?
    let chain: Vec<Vec<u8>> = (0..16)
        .map(|i| {
            if i < 8 {
                block_key("system", i)
            } else {
                block_key("system+chat-c", i)
            }
        })
        .collect();
    let chain_refs: Vec<&[u8]> = chain.iter().map(Vec::as_slice).collect();
    let hit = engine.prefix_match(&chain_refs);
    println!("prefix_match on a new chat with the same system prompt: {hit} of 16 blocks cached");

    // Read the hit back: one copy into our buffer (think: pinned host memory for a GPU copy).
    let mut buffer = vec![0u8; block_bytes];
    for (i, key) in chain_refs[..hit].iter().enumerate() {
        let len = engine
            .get_into(key, &mut buffer)?
            .ok_or("a matched block vanished")?;
        if buffer[..len]
            .iter()
            .any(|&b| b != (i as u8).wrapping_mul(31))
        {
            return Err(format!("block {i} read back wrong bytes").into());
        }
    }
    // Or zero copies: pin a block and read it where it lies.
    if let Some(pinned) = engine.pin(chain_refs[0])? {
        println!(
            "pinned block 0: generation {}, {} bytes in place",
            pinned.generation(),
            pinned.payload().len()
        );
    }

    // Fill the tier past its high watermark: the coldest blocks are evicted.
    let filler = vec![0u8; block_bytes];
    let fill_blocks = (capacity_mib << 20) / block_kib.max(1) / 1024 * 2;
    for i in 0..fill_blocks as usize {
        engine.put(&block_key("filler", i), &filler)?;
    }
    let stats = engine.stats();
    let dram = &stats.tiers[0];
    println!(
        "after writing twice the capacity: {} blocks resident, {} MiB of {} MiB used, {} evictions, {} hits, {} misses",
        dram.blocks,
        dram.used_bytes >> 20,
        dram.capacity_bytes >> 20,
        dram.evictions,
        dram.hits,
        dram.misses
    );
    println!("{stats:#?}");
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("quickstart: {error}");
            ExitCode::FAILURE
        }
    }
}
