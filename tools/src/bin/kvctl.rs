//! kvctl: inspect and verify a mooncake node's data directory.
//!
//! These commands open a *stopped* node's directory read-only; they refuse a directory that a
//! running engine or kvd holds. Tables are for people; `--json` prints one JSON document for
//! scripts.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use mooncake_kv_engine::offline::DataDir;
use mooncake_kv_tools::{display_key, hex, parse_key};
use serde_json::json;

/// Inspect and verify a mooncake KVCache node's data directory.
///
/// Exit status: 0 on success, 1 when `verify` found corrupt blocks, 2 on any error (bad
/// arguments, a directory that cannot be opened or is in use).
#[derive(Parser)]
#[command(name = "kvctl", version, about, long_about)]
struct Cli {
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Summary of a stopped node's data directory: node id, format version, blocks, bytes,
    /// free space, and orphans (blocks written but never committed, reclaimed on open).
    Inspect {
        /// The node's data directory.
        dir: PathBuf,
    },
    /// List the persisted blocks: key, payload length, extent, generation.
    Ls {
        /// The node's data directory.
        dir: PathBuf,
        /// Print at most this many blocks.
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Decode and show the header of one block.
    Header {
        /// The node's data directory.
        dir: PathBuf,
        /// The key: text, or 0x followed by hex digits for arbitrary bytes.
        key: String,
    },
    /// Read every block and check every CRC and its map entry. Names each corrupt block and
    /// exits with status 1 if there is any.
    Verify {
        /// The node's data directory.
        dir: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("kvctl: {error:#}");
            ExitCode::from(2)
        }
    }
}

fn open(dir: &Path) -> anyhow::Result<DataDir> {
    DataDir::open(dir).with_context(|| format!("cannot open {}", dir.display()))
}

fn run(cli: &Cli) -> anyhow::Result<ExitCode> {
    match &cli.command {
        Command::Inspect { dir } => {
            let summary = open(dir)?.summary()?;
            if cli.json {
                println!(
                    "{}",
                    json!({
                        "dir": summary.dir,
                        "node_id": hex(&summary.node_id),
                        "format_version": summary.format_version,
                        "blocks": summary.blocks,
                        "bad_map_entries": summary.bad_entries,
                        "payload_bytes": summary.payload_bytes,
                        "used_bytes": summary.used_bytes,
                        "free_bytes": summary.free_bytes,
                        "capacity_bytes": summary.capacity_bytes,
                        "orphans": summary.orphans,
                    })
                );
            } else {
                let rows = [
                    ("directory", summary.dir.display().to_string()),
                    ("node id", hex(&summary.node_id)),
                    ("format version", summary.format_version.to_string()),
                    ("blocks", summary.blocks.to_string()),
                    ("bad map entries", summary.bad_entries.to_string()),
                    ("payload", bytes(summary.payload_bytes)),
                    ("used", bytes(summary.used_bytes)),
                    ("free", bytes(summary.free_bytes)),
                    ("capacity", bytes(summary.capacity_bytes)),
                    ("orphans", summary.orphans.to_string()),
                ];
                for (name, value) in rows {
                    println!("{name:<16} {value}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Ls { dir, limit } => {
            let listed = open(dir)?.list()?;
            let shown = listed.iter().take(limit.unwrap_or(usize::MAX));
            if cli.json {
                let blocks: Vec<_> = shown
                    .map(|b| match &b.entry {
                        Ok(e) => json!({
                            "key": display_key(&b.key),
                            "payload_len": e.payload_len,
                            "extent_offset": e.extent_offset_bytes,
                            "extent_len": e.extent_len_bytes,
                            "generation": e.generation,
                        }),
                        Err(reason) => json!({ "key": display_key(&b.key), "error": reason }),
                    })
                    .collect();
                println!("{}", json!({ "blocks": blocks, "total": listed.len() }));
            } else {
                println!(
                    "{:<40} {:>12} {:>14} {:>10} {:>12}",
                    "KEY", "PAYLOAD", "EXTENT", "LEN", "GENERATION"
                );
                for b in shown {
                    match &b.entry {
                        Ok(e) => println!(
                            "{:<40} {:>12} {:>14} {:>10} {:>12}",
                            display_key(&b.key),
                            e.payload_len,
                            e.extent_offset_bytes,
                            e.extent_len_bytes,
                            e.generation
                        ),
                        Err(reason) => {
                            println!("{:<40} bad map entry: {reason}", display_key(&b.key))
                        }
                    }
                }
                eprintln!("{} blocks", listed.len());
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Header { dir, key } => {
            let key = parse_key(key).map_err(anyhow::Error::msg)?;
            let data_dir = open(dir)?;
            let entry = data_dir
                .entry(&key)?
                .with_context(|| format!("no block with key {}", display_key(&key)))?;
            let header = data_dir.header(&entry)?;
            if cli.json {
                println!(
                    "{}",
                    json!({
                        "key": display_key(&key),
                        "generation": header.generation,
                        "key_len": header.key_len,
                        "payload_len": header.payload_len,
                        "payload_offset": header.payload_offset,
                        "key_crc32": format!("{:#010x}", header.key_crc32),
                        "payload_crc32": format!("{:#010x}", header.payload_crc32),
                        "extent_offset": entry.extent_offset_bytes,
                        "extent_len": entry.extent_len_bytes,
                    })
                );
            } else {
                println!("key              {}", display_key(&key));
                println!("generation       {}", header.generation);
                println!("key length       {}", header.key_len);
                println!("payload length   {}", header.payload_len);
                println!("payload offset   {}", header.payload_offset);
                println!("key crc32        {:#010x}", header.key_crc32);
                println!("payload crc32    {:#010x}", header.payload_crc32);
                println!(
                    "extent           {} + {}",
                    entry.extent_offset_bytes, entry.extent_len_bytes
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify { dir } => {
            let data_dir = open(dir)?;
            let bar = if cli.json || !std::io::stderr().is_terminal() {
                ProgressBar::hidden()
            } else {
                ProgressBar::new(0).with_style(
                    ProgressStyle::with_template("verifying {bar:40} {pos}/{len} blocks ({eta})")
                        .unwrap_or_else(|_| ProgressStyle::default_bar()),
                )
            };
            let bad = data_dir.verify_all(|done, total| {
                bar.set_length(total);
                bar.set_position(done);
            })?;
            bar.finish_and_clear();
            let total = bar.length().unwrap_or(0);
            if cli.json {
                let corrupt: Vec<_> = bad
                    .iter()
                    .map(|b| json!({ "key": display_key(&b.key), "error": b.error.to_string() }))
                    .collect();
                println!("{}", json!({ "blocks": total, "corrupt": corrupt }));
            } else {
                for b in &bad {
                    println!("CORRUPT {}: {}", display_key(&b.key), b.error);
                }
                println!("{total} blocks verified, {} corrupt", bad.len());
            }
            Ok(if bad.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
    }
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {} ({n} bytes)", UNITS[unit])
    }
}
