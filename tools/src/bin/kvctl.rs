//! kvctl: talk to a running mooncake-kvd, or inspect and verify a stopped node's data
//! directory.
//!
//! Online commands (`stat`, `get`, `put`, `del`, `exists`, `bench`) connect to `--addr`. The
//! offline ones (`inspect`, `ls`, `header`, `verify`) open a *stopped* node's directory
//! read-only; they refuse a directory that a running engine or kvd holds. Tables are for
//! people; `--json` prints one JSON document for scripts.

use std::io::{IsTerminal, Read, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use mooncake_kv_engine::offline::DataDir;
use mooncake_kv_replication::{Client, ClientConfig, TransportChoice};
use mooncake_kv_tools::{display_key, hex, parse_key};
use serde_json::json;

/// Talk to a running mooncake KVCache node, or inspect and verify a stopped one's data
/// directory.
///
/// Exit status: 0 on success, 1 when `verify` found corrupt blocks, `get` found no block or
/// `bench` saw wrong bytes, 2 on any error (bad arguments, a node that cannot be reached, a
/// directory that cannot be opened or is in use).
#[derive(Parser)]
#[command(name = "kvctl", version, about, long_about)]
struct Cli {
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// The node's control address, for the online commands.
    #[arg(long, global = true, default_value = "127.0.0.1:7700")]
    addr: String,
    /// File holding the node's shared secret, if it has one.
    #[arg(long, global = true)]
    token_file: Option<PathBuf>,
    /// Data path for reads: auto (shared memory on the same host, else tcp), tcp or shm.
    #[arg(long, global = true, default_value = "auto")]
    transport: Transport,
    /// Over tcp, read each block one-sidedly from the node's data plane after the lookup,
    /// instead of receiving it inline with the lookup's answer.
    #[arg(long, global = true)]
    one_sided: bool,
    /// One-sided reads (shm, or tcp with --one-sided) reuse a block's descriptor this many
    /// milliseconds after its lookup, so a block read again soon costs no lookup; every read
    /// is still verified. 0 looks up every read.
    #[arg(long, global = true, default_value_t = 10_000, value_name = "MS")]
    descriptor_ttl_ms: u64,
    /// Over shm, also checksum each payload as it is copied (a check against corrupted
    /// memory). Without it a same-host read checks the block's header after the copy, which is
    /// what catches a slot reused under the reader.
    #[arg(long, global = true)]
    shm_payload_crc: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum Transport {
    Auto,
    Tcp,
    Shm,
}

#[derive(Subcommand)]
enum Command {
    /// A running node's figures: blocks and bytes per tier, requests, errors, leases.
    Stat,
    /// Every member of a cluster: reachable or not, node id, blocks, and repair (passes,
    /// blocks copied, blocks under-replicated). Exits 1 if a member is unreachable or a
    /// block is under-replicated. Members come from --peers, or from etcd's registrations.
    Cluster {
        /// Control addresses of the members, comma separated (as given to kvd --peers).
        #[arg(
            long,
            value_delimiter = ',',
            required_unless_present = "etcd",
            conflicts_with = "etcd"
        )]
        peers: Vec<String>,
        /// etcd client URLs, comma separated (as given to kvd --etcd): the members are the
        /// nodes registered there now.
        #[arg(long, value_delimiter = ',')]
        etcd: Vec<String>,
        /// Key prefix of the registrations (as given to kvd --etcd-prefix).
        #[arg(long, default_value = "/mooncake/members/")]
        etcd_prefix: String,
    },
    /// Fetch a block's value (verified) to a file, or to stdout.
    Get {
        /// The key: text, or 0x followed by hex digits for arbitrary bytes.
        key: String,
        /// Write the value here instead of stdout.
        #[arg(short, long)]
        output: Option<PathBuf>,
    },
    /// Store a file's bytes (or stdin's, with `-`) as a block.
    Put {
        /// The key.
        key: String,
        /// The value's file; `-` reads stdin.
        file: PathBuf,
        /// Make the block durable before answering (write-through to NVMe).
        #[arg(long)]
        durable: bool,
    },
    /// Remove blocks.
    Del {
        /// The keys.
        #[arg(required = true)]
        keys: Vec<String>,
    },
    /// Which keys have blocks.
    Exists {
        /// The keys.
        #[arg(required = true)]
        keys: Vec<String>,
    },
    /// Load a running node: gets and puts of self-checking values from several threads; prints
    /// throughput and latency quantiles, and how many values came back wrong (must be 0).
    Bench(BenchArgs),
    /// Replay a prefix-reuse trace (JSON lines: input_length and hash_ids per request, in
    /// arrival order) against an embedded engine with each eviction policy and capacity, and
    /// print the prefix hit ratio in blocks and tokens, per tier, next to LRU, Belady's MIN and
    /// LRU told which blocks will be used again, computed offline on the same trace. No node
    /// is involved.
    Replay(ReplayArgs),
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

#[derive(clap::Args, Debug)]
struct ReplayArgs {
    /// The trace file.
    trace: PathBuf,
    /// Capacities to try, in percent of the trace's distinct blocks.
    #[arg(long, value_delimiter = ',', default_value = "2,5,10")]
    capacity_percent: Vec<f64>,
    /// Policies to try: lru, s3-fifo, prefix-aware.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "lru,s3-fifo,prefix-aware"
    )]
    policy: Vec<mooncake_kv_engine::EvictionPolicyKind>,
    /// Payload bytes per block in the engine (the trace's blocks scaled down to fit).
    #[arg(long, default_value_t = 16384, value_parser = clap::value_parser!(u64).range(64..=8 << 20))]
    block_bytes: u64,
    /// Tokens in a full block of the trace.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u64).range(1..))]
    tokens_per_block: u64,
    /// Also give the engine an NVMe tier holding this percentage of the distinct blocks
    /// (below the DRAM capacity), in a fresh directory under --nvme-dir; 0: DRAM only.
    #[arg(long, default_value_t = 0.0)]
    nvme_percent: f64,
    /// Where the NVMe tier's data directories go (each run's is removed afterwards).
    #[arg(long, default_value = ".")]
    nvme_dir: PathBuf,
    /// Only simulate the policies on block ids; skip the engine.
    #[arg(long)]
    simulate_only: bool,
    /// Also replay as a caller that tells the engine when a conversation is over
    /// (`Engine::end_chain` after its last request) for this percentage of the
    /// conversations it ends; several values give one row each. The trace says nothing
    /// about it, so the replay looks ahead: a request's chain ended when no later request
    /// uses any of its blocks after the first. That is what a caller that knows (a closed
    /// session, an agent's last step) can tell; a store cannot know it by itself.
    #[arg(long, value_delimiter = ',', value_name = "PERCENT", value_parser = end_hint_percent)]
    end_hints: Vec<f64>,
    /// Also replay each policy (and end-hint share) on a cluster of NODES members holding
    /// each block REPLICAS times: real nodes on 127.0.0.1 (DRAM only) behind a cluster
    /// client, which places blocks by rendezvous hashing, counts a hit if any replica holds
    /// the block, reads it from one replica and sends each member its share of a chain,
    /// linked; the nodes evict as mooncake-kvd with peers does (no block held for a later
    /// one of its chain). Beside them the same simulated on block ids (with --simulate-only,
    /// that alone). The capacity is the cluster's in distinct blocks (each member holds capacity x
    /// REPLICAS / NODES). Several shapes give one row each.
    #[arg(long, value_delimiter = ',', value_name = "NODESxREPLICAS")]
    cluster: Vec<mooncake_kv_tools::replay::ClusterShape>,
}

/// A percentage in [0, 100].
fn end_hint_percent(s: &str) -> Result<f64, String> {
    let value: f64 = s
        .parse()
        .map_err(|e| format!("{s:?} is not a number: {e}"))?;
    if (0.0..=100.0).contains(&value) {
        Ok(value)
    } else {
        Err(format!("{value} is not a percentage from 0 to 100"))
    }
}

#[derive(clap::Args, Debug)]
struct BenchArgs {
    /// Bytes per value (at least 16).
    #[arg(long, default_value_t = 65536, value_parser = clap::value_parser!(u64).range(16..=64 << 20))]
    value_size: u64,
    /// Keys per request: a put batch, or a batch of gets (one lookup, then all the reads).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=4096))]
    batch: u64,
    /// Client threads.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u64).range(1..=1024))]
    concurrency: u64,
    /// Percentage of operations that are reads.
    #[arg(long, default_value_t = 90, value_parser = clap::value_parser!(u8).range(0..=100))]
    read_percent: u8,
    /// Keys in the key space.
    #[arg(long, default_value_t = 1000, value_parser = clap::value_parser!(u64).range(1..))]
    keys: u64,
    /// Seconds to run (unless --count is given).
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// Operations to run, instead of a duration.
    #[arg(long)]
    count: Option<u64>,
    /// Do not put every key before measuring.
    #[arg(long)]
    no_prefill: bool,
    /// Prefix of the keys (several benches can share a node).
    #[arg(long, default_value = "bench/")]
    key_prefix: String,
    /// Seed of the key choice and the values.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// The order keys are read and written in: at random, or one after the other (each
    /// thread from its own share of the key space), as a prefix chain put together is read.
    #[arg(long, value_enum, default_value_t = mooncake_kv_tools::bench::KeyOrder::Random)]
    order: mooncake_kv_tools::bench::KeyOrder,
    /// Seconds to run before measuring, unmeasured (connections opened, descriptors cached:
    /// the steady state of a long-running reader). Wrong values and errors in it still count.
    #[arg(long, default_value_t = 0.0, value_name = "SECONDS")]
    warm_up: f64,
    /// Also measure, in this run, one thread copying values of the same size with memcpy out
    /// of 256 MiB of cold memory, in order and in a random order (the references for
    /// same-host reads), and print the ratios to the reads' bytes per second spent in them.
    #[arg(long)]
    memcpy_reference: bool,
    /// Also measure, in this run, a plain TCP socket pair on loopback moving values of the
    /// same size one request at a time (the reference for tcp reads), and print the ratio.
    #[arg(long)]
    tcp_reference: bool,
    /// Instead of loading a node, replay this prefix trace against an embedded engine with
    /// the defaults of `kvctl replay` (which has the options).
    #[arg(long)]
    trace: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(&cli) {
        Ok(code) => code,
        Err(error) => {
            eprintln!("kvctl: {}", mooncake_kv_tools::report(&error));
            ExitCode::from(2)
        }
    }
}

fn open(dir: &Path) -> anyhow::Result<DataDir> {
    DataDir::open(dir).with_context(|| format!("cannot open {}", dir.display()))
}

/// The node's token, from `--token-file` (trailing newline ignored).
fn token(cli: &Cli) -> anyhow::Result<Option<Vec<u8>>> {
    let Some(path) = &cli.token_file else {
        return Ok(None);
    };
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read token file {}", path.display()))?;
    Ok(Some(
        text.trim_end_matches(['\n', '\r']).as_bytes().to_vec(),
    ))
}

fn connect(cli: &Cli) -> anyhow::Result<Client> {
    let token = token(cli)?;
    let transport = match cli.transport {
        Transport::Auto => TransportChoice::Auto,
        Transport::Tcp => TransportChoice::Tcp,
        Transport::Shm => TransportChoice::Shm,
    };
    Client::connect(
        cli.addr.as_str(),
        ClientConfig {
            token,
            transport,
            inline_tcp_reads: !cli.one_sided,
            descriptor_ttl: Duration::from_millis(cli.descriptor_ttl_ms),
            shm_payload_crc: cli.shm_payload_crc,
            ..ClientConfig::default()
        },
    )
    .with_context(|| format!("cannot connect to the node at {}", cli.addr))
}

fn keys(texts: &[String]) -> anyhow::Result<Vec<Vec<u8>>> {
    texts
        .iter()
        .map(|t| parse_key(t).map_err(anyhow::Error::msg))
        .collect()
}

fn run(cli: &Cli) -> anyhow::Result<ExitCode> {
    match &cli.command {
        Command::Stat => online::stat(cli),
        Command::Cluster {
            peers,
            etcd,
            etcd_prefix,
        } => {
            let peers = if etcd.is_empty() {
                peers.clone()
            } else {
                online::registered_members(etcd, etcd_prefix)?
            };
            online::cluster(cli, &peers)
        }
        Command::Get { key, output } => online::get(cli, key, output.as_deref()),
        Command::Put { key, file, durable } => online::put(cli, key, file, *durable),
        Command::Del { keys: texts } => {
            let client = connect(cli)?;
            let keys = keys(texts)?;
            let refs: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
            let removed = client.remove(&refs)?;
            online::print_flags(cli, texts, &removed, "removed", "absent");
            Ok(ExitCode::SUCCESS)
        }
        Command::Exists { keys: texts } => {
            let client = connect(cli)?;
            let keys = keys(texts)?;
            let refs: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
            let present = client.exists(&refs)?;
            online::print_flags(cli, texts, &present, "present", "absent");
            Ok(ExitCode::SUCCESS)
        }
        Command::Bench(args) => match &args.trace {
            Some(trace) => {
                /// `kvctl replay`'s arguments alone, to get its defaults.
                #[derive(Parser)]
                struct Defaults {
                    #[command(flatten)]
                    args: ReplayArgs,
                }
                let defaults = Defaults::parse_from(["replay".as_ref(), trace.as_os_str()]);
                replay_cmd::run(cli, &defaults.args)
            }
            None => online::bench(cli, args),
        },
        Command::Replay(args) => replay_cmd::run(cli, args),
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

mod online {
    use super::*;
    use mooncake_kv_tools::bench::{self, BenchOptions};

    pub(super) fn stat(cli: &Cli) -> anyhow::Result<ExitCode> {
        let client = connect(cli)?;
        let stats = client.stats()?;
        let serving = client.health()?;
        if cli.json {
            let per_tier: Vec<_> = stats
                .tiers
                .iter()
                .map(|t| {
                    json!({
                        "tier": t.tier,
                        "blocks": t.blocks,
                        "used_bytes": t.used_bytes,
                        "capacity_bytes": t.capacity_bytes,
                        "hits": t.hits,
                        "evictions": t.evictions,
                    })
                })
                .collect();
            println!(
                "{}",
                json!({
                    "addr": cli.addr,
                    "serving": serving,
                    "node_id": hex(&client.hello().node_id),
                    "transport": client.transport_name(),
                    "tiers": per_tier,
                    "requests": stats.requests,
                    "errors": stats.errors,
                    "leases": stats.leases,
                    "connections": stats.connections,
                })
            );
        } else {
            println!("{:<16} {}", "node", cli.addr);
            println!("{:<16} {}", "serving", serving);
            println!("{:<16} {}", "node id", hex(&client.hello().node_id));
            println!("{:<16} {}", "reads via", client.transport_name());
            for t in &stats.tiers {
                println!(
                    "{:<16} {} blocks, {} of {}, {} hits, {} evictions",
                    t.tier,
                    t.blocks,
                    bytes(t.used_bytes),
                    bytes(t.capacity_bytes),
                    t.hits,
                    t.evictions,
                );
            }
            let kinds = mooncake_kv_replication::proto::REQUEST_KINDS;
            let requests: Vec<String> = kinds
                .iter()
                .zip(&stats.requests)
                .map(|(k, n)| format!("{k}={n}"))
                .collect();
            println!("{:<16} {}", "requests", requests.join(" "));
            println!("{:<16} {}", "errors", stats.errors);
            println!("{:<16} {}", "leases", stats.leases);
            println!("{:<16} {}", "connections", stats.connections);
        }
        Ok(ExitCode::SUCCESS)
    }

    /// The control addresses registered under `prefix` in etcd now.
    pub(super) fn registered_members(
        endpoints: &[String],
        prefix: &str,
    ) -> anyhow::Result<Vec<String>> {
        use mooncake_kv_replication::membership::{EtcdConfig, EtcdMembership, Membership};
        let membership = EtcdMembership::start(EtcdConfig {
            endpoints: endpoints.to_vec(),
            prefix: prefix.to_owned(),
            ..EtcdConfig::default()
        })
        .context("cannot start an etcd client")?;
        anyhow::ensure!(
            membership.wait_synced(Duration::from_secs(5)),
            "cannot read the members from etcd at {}",
            endpoints.join(",")
        );
        Ok(membership
            .view()
            .iter()
            .map(|p| p.addr.to_string())
            .collect())
    }

    pub(super) fn cluster(cli: &Cli, peers: &[String]) -> anyhow::Result<ExitCode> {
        let config = ClientConfig {
            token: token(cli)?,
            transport: TransportChoice::Tcp,
            connections: 1,
            timeout: Duration::from_secs(2),
            ..ClientConfig::default()
        };
        let mut rows = Vec::new();
        let (mut live, mut under) = (0usize, 0u64);
        for peer in peers {
            let row = match Client::connect(peer.as_str(), config.clone())
                .map_err(anyhow::Error::from)
                .and_then(|c| Ok((hex(&c.hello().node_id), c.stats()?)))
            {
                Ok((id, stats)) => {
                    live += 1;
                    let repair = stats.repair.unwrap_or_default();
                    under += repair.under_replicated;
                    json!({
                        "addr": peer,
                        "state": "live",
                        "node_id": id,
                        "tiers": stats.tiers.iter().map(|t| json!({
                            "tier": t.tier,
                            "blocks": t.blocks,
                            "used_bytes": t.used_bytes,
                        })).collect::<Vec<_>>(),
                        "repair": stats.repair.map(|r| json!({
                            "passes": r.passes,
                            "blocks_copied": r.blocks_copied,
                            "failures": r.failures,
                            "under_replicated": r.under_replicated,
                        })),
                    })
                }
                Err(error) => {
                    json!({ "addr": peer, "state": "unreachable", "error": error.to_string() })
                }
            };
            rows.push(row);
        }
        if cli.json {
            println!(
                "{}",
                json!({ "members": rows, "live": live, "total": peers.len(), "under_replicated": under })
            );
        } else {
            println!(
                "{:<22} {:<12} {:<34} {:>10} {:>10} {:>10} {:>8} {:>8} {:>8}",
                "MEMBER", "STATE", "NODE ID", "HBM", "DRAM", "NVME", "PASSES", "COPIED", "UNDER"
            );
            for r in &rows {
                let n =
                    |v: &serde_json::Value| v.as_u64().map_or("-".to_owned(), |x| x.to_string());
                // Blocks on the tier named `name`, "-" where the member has none.
                let blocks = |name: &str| {
                    let tiers = r["tiers"].as_array().map_or(&[][..], Vec::as_slice);
                    tiers
                        .iter()
                        .find(|t| t["tier"] == name)
                        .map_or("-".to_owned(), |t| n(&t["blocks"]))
                };
                println!(
                    "{:<22} {:<12} {:<34} {:>10} {:>10} {:>10} {:>8} {:>8} {:>8}",
                    r["addr"].as_str().unwrap_or(""),
                    r["state"].as_str().unwrap_or(""),
                    r["node_id"].as_str().unwrap_or("-"),
                    blocks("hbm"),
                    blocks("dram"),
                    blocks("nvme"),
                    n(&r["repair"]["passes"]),
                    n(&r["repair"]["blocks_copied"]),
                    n(&r["repair"]["under_replicated"]),
                );
                if let Some(error) = r["error"].as_str() {
                    println!("  {error}");
                }
            }
            println!(
                "{live} of {} members live; {under} blocks under-replicated",
                peers.len()
            );
        }
        Ok(if live == peers.len() && under == 0 {
            ExitCode::SUCCESS
        } else {
            ExitCode::from(1)
        })
    }

    pub(super) fn get(cli: &Cli, key: &str, output: Option<&Path>) -> anyhow::Result<ExitCode> {
        let key_bytes = parse_key(key).map_err(anyhow::Error::msg)?;
        let client = connect(cli)?;
        let Some(value) = client.get(&key_bytes)? else {
            eprintln!("kvctl: no block under {key}");
            return Ok(ExitCode::from(1));
        };
        match output {
            Some(path) => std::fs::write(path, &value)
                .with_context(|| format!("cannot write {}", path.display()))?,
            None => {
                let mut out = std::io::stdout().lock();
                out.write_all(&value)?;
                out.flush()?;
            }
        }
        Ok(ExitCode::SUCCESS)
    }

    pub(super) fn put(
        cli: &Cli,
        key: &str,
        file: &Path,
        durable: bool,
    ) -> anyhow::Result<ExitCode> {
        let key_bytes = parse_key(key).map_err(anyhow::Error::msg)?;
        let limit = mooncake_kv_engine::MAX_VALUE_BYTES as u64;
        let mut value = Vec::new();
        // Read at most one byte past the limit, so that an oversize input is refused here
        // without reading all of it.
        if file == Path::new("-") {
            std::io::stdin()
                .lock()
                .take(limit + 1)
                .read_to_end(&mut value)?;
        } else {
            std::fs::File::open(file)
                .with_context(|| format!("cannot open {}", file.display()))?
                .take(limit + 1)
                .read_to_end(&mut value)?;
        }
        if value.len() as u64 > limit {
            anyhow::bail!("the value is larger than the limit of {limit} bytes");
        }
        let client = connect(cli)?;
        let mut outcomes = client.put_batch(&[(&key_bytes, &value)], durable)?;
        let generation = outcomes
            .pop()
            .context("the node answered no outcome")?
            .map_err(|reply| anyhow::anyhow!("refused ({:?}): {}", reply.code, reply.message))?;
        if cli.json {
            println!(
                "{}",
                json!({ "key": key, "bytes": value.len(), "generation": generation })
            );
        } else {
            println!(
                "stored {key}: {} bytes, generation {generation}",
                value.len()
            );
        }
        Ok(ExitCode::SUCCESS)
    }

    pub(super) fn print_flags(cli: &Cli, keys: &[String], flags: &[bool], yes: &str, no: &str) {
        if cli.json {
            let rows: Vec<_> = keys
                .iter()
                .zip(flags)
                .map(|(k, f)| json!({ "key": k, yes: f }))
                .collect();
            println!("{}", json!({ "keys": rows }));
        } else {
            for (k, f) in keys.iter().zip(flags) {
                println!("{k} {}", if *f { yes } else { no });
            }
        }
    }

    pub(super) fn bench(cli: &Cli, args: &BenchArgs) -> anyhow::Result<ExitCode> {
        let duration = Duration::try_from_secs_f64(args.duration)
            .ok()
            .filter(|d| !d.is_zero())
            .context("--duration must be a positive number of seconds")?;
        let warm_up = Duration::try_from_secs_f64(args.warm_up)
            .context("--warm-up must be a number of seconds, 0 or more")?;
        let options = BenchOptions {
            value_bytes: usize::try_from(args.value_size)?,
            batch: usize::try_from(args.batch)?,
            concurrency: usize::try_from(args.concurrency)?,
            read_percent: args.read_percent,
            keys: args.keys,
            duration,
            count: args.count,
            prefill: !args.no_prefill,
            key_prefix: args.key_prefix.clone(),
            seed: args.seed,
            order: args.order,
            warm_up,
        };
        let client = connect(cli)?;
        let show = !cli.json && std::io::stderr().is_terminal();
        if options.prefill {
            let bar = bar(show, options.keys, "prefill");
            bench::prefill(&client, &options, &|n| bar.inc(n))?;
            bar.finish_and_clear();
        }
        let bar = match options.count {
            Some(count) => bar(show, count, "bench"),
            None => bar(
                show,
                ((options.warm_up + options.duration).as_secs_f64() * 10.0) as u64,
                "bench",
            ),
        };
        let report = if options.count.is_some() {
            bench::run(&client, &options, &|n| bar.inc(n))
        } else {
            let ticker = {
                let bar = bar.clone();
                let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
                let s = std::sync::Arc::clone(&stop);
                let h = std::thread::spawn(move || {
                    while !s.load(std::sync::atomic::Ordering::Relaxed) {
                        std::thread::sleep(Duration::from_millis(100));
                        bar.inc(1);
                    }
                });
                (stop, h)
            };
            let report = bench::run(&client, &options, &|_| {});
            ticker.0.store(true, std::sync::atomic::Ordering::Relaxed);
            let _ = ticker.1.join();
            report
        };
        bar.finish_and_clear();
        let memcpy = args
            .memcpy_reference
            .then(|| bench::memcpy_reference(options.value_bytes, 1.0, false));
        let memcpy_random = args
            .memcpy_reference
            .then(|| bench::memcpy_reference(options.value_bytes, 1.0, true));
        let raw_tcp = if args.tcp_reference {
            bench::raw_tcp_reference(options.value_bytes, 2.0)
        } else {
            None
        };
        // One reader thread's bytes per second of time spent in reads, next to one memcpy
        // thread's.
        let per_thread = report.read_mib_per_busy_second;
        let q = |x: &bench::Quantiles| json!({ "p50_us": x.p50_us, "p99_us": x.p99_us, "p999_us": x.p999_us });
        if cli.json {
            println!(
                "{}",
                json!({
                    "addr": cli.addr,
                    "transport": client.transport_name(),
                    "value_bytes": options.value_bytes,
                    "batch": options.batch,
                    "concurrency": options.concurrency,
                    "read_percent": options.read_percent,
                    "seconds": report.elapsed.as_secs_f64(),
                    "reads": report.reads,
                    "misses": report.misses,
                    "writes": report.writes,
                    "ops_per_second": report.ops_per_second(),
                    "mib_per_second": report.mib_per_second(),
                    "read_latency": q(&report.read_latency),
                    "write_latency": q(&report.write_latency),
                    "wrong_values": report.wrong_values,
                    "errors": report.errors,
                    "first_error": report.first_error,
                    "verification_retries": report.verification_retries,
                    "cached_reads": report.cached_reads,
                    "warm_up_ops": report.warm_up_ops,
                    "memcpy_mib_per_second": memcpy,
                    "read_mib_per_busy_second": per_thread,
                    "ratio_to_memcpy_per_thread": memcpy.map(|m| per_thread / m),
                    "memcpy_random_mib_per_second": memcpy_random,
                    "ratio_to_random_memcpy_per_thread": memcpy_random.map(|m| per_thread / m),
                    "raw_tcp_mib_per_second": raw_tcp,
                    "ratio_to_raw_tcp": raw_tcp.map(|r| per_thread / r),
                })
            );
        } else {
            println!(
                "{} ops in {:.2} s over {}: {:.0} ops/s, {:.1} MiB/s",
                report.reads + report.writes,
                report.elapsed.as_secs_f64(),
                client.transport_name(),
                report.ops_per_second(),
                report.mib_per_second()
            );
            for (what, n, l) in [
                ("reads", report.reads, &report.read_latency),
                ("writes", report.writes, &report.write_latency),
            ] {
                if n > 0 {
                    println!(
                        "{what:<7} {n:>10}  p50 {:>9.1} us  p99 {:>9.1} us  p999 {:>9.1} us",
                        l.p50_us, l.p99_us, l.p999_us
                    );
                }
            }
            println!(
                "misses {}, errors {}, wrong values {}, verification retries {}, reads without a \
                 lookup (cached descriptor) {}",
                report.misses,
                report.errors,
                report.wrong_values,
                report.verification_retries,
                report.cached_reads
            );
            if let Some(error) = &report.first_error {
                println!("first error: {error}");
            }
            if let Some(r) = raw_tcp {
                println!(
                    "raw TCP loopback of the same size, one stream: {r:.1} MiB/s; reads, per \
                     second spent in them: {per_thread:.1} MiB/s ({:.2}x)",
                    per_thread / r
                );
            }
            if let (Some(m), Some(r)) = (memcpy, memcpy_random) {
                println!(
                    "memcpy of the same size, one thread: {m:.1} MiB/s in order, {r:.1} MiB/s \
                     in a random order; reads, per second spent in them: {per_thread:.1} MiB/s \
                     ({:.2}x, {:.2}x)",
                    per_thread / m,
                    per_thread / r
                );
            }
        }
        Ok(if report.wrong_values > 0 {
            ExitCode::from(1)
        } else {
            ExitCode::SUCCESS
        })
    }

    fn bar(show: bool, len: u64, what: &'static str) -> ProgressBar {
        if !show {
            return ProgressBar::hidden();
        }
        let bar = ProgressBar::new(len);
        if let Ok(style) = ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} {elapsed}") {
            bar.set_style(style);
        }
        bar.set_message(what);
        bar
    }
}

mod replay_cmd {
    use super::*;
    use mooncake_kv_tools::replay::{self, EngineReplay, Trace};

    pub(super) fn run(cli: &Cli, args: &ReplayArgs) -> anyhow::Result<ExitCode> {
        let trace = Trace::load(&args.trace, args.tokens_per_block)?;
        let unique = trace.unique_blocks();
        let ceiling = trace.ceiling();
        let quiet = cli.json || !std::io::stderr().is_terminal();
        if !cli.json {
            println!(
                "trace {}: {} requests, {} block references, {unique} distinct blocks; an \
                 unbounded cache hits {:.1}% of blocks, {:.1}% of tokens",
                args.trace.display(),
                trace.requests.len(),
                trace.block_refs(),
                100.0 * ceiling.block_ratio(),
                100.0 * ceiling.token_ratio()
            );
            println!(
                "engine: {} B payloads, DRAM{}; hits read back and checked",
                args.block_bytes,
                if args.nvme_percent > 0.0 {
                    format!(" + NVMe for {}% of distinct blocks", args.nvme_percent)
                } else {
                    " only".to_owned()
                }
            );
            println!(
                "\n{:>14}  {:<30} {:>8} {:>8} {:>9} {:>9} {:>10} {:>7}",
                "capacity",
                "policy",
                "blocks",
                "tokens",
                "dram hit",
                "nvme hit",
                "simulated",
                "secs"
            );
        }
        // Without hints, then with each share of the ended conversations told.
        let mut hint_runs: Vec<(Option<f64>, Vec<bool>)> = vec![(None, Vec::new())];
        hint_runs.extend(
            args.end_hints
                .iter()
                .map(|&p| (Some(p), trace.ended_chains(p / 100.0))),
        );
        let mut rows = Vec::new();
        let mut wrong = 0;
        for &percent in &args.capacity_percent {
            anyhow::ensure!(
                percent > 0.0 && percent <= 100.0,
                "capacity {percent}% is not in (0, 100]"
            );
            let capacity = ((unique as f64 * percent / 100.0) as usize).max(1);
            let label = format!("{percent}% ({capacity})");
            for (name, hits) in [
                ("belady (MIN)", replay::belady(&trace, capacity)),
                (
                    "lru+reuse oracle",
                    replay::lru_with_reuse_oracle(&trace, capacity),
                ),
                (
                    "lru (offline)",
                    replay::simulate(
                        &trace,
                        mooncake_kv_engine::EvictionPolicyKind::Lru,
                        capacity,
                    ),
                ),
            ] {
                print_row(cli, &label, name, &hits, None, None);
                rows.push(json!({"capacity_percent": percent, "capacity_blocks": capacity, "policy": name, "offline": hits}));
            }
            for (end_hints, ended) in &hint_runs {
                for &policy in &args.policy {
                    let name = match end_hints {
                        Some(p) => format!("{policy} +end {p}%"),
                        None => policy.name().to_owned(),
                    };
                    let simulated = replay::simulate_with_hints(&trace, policy, capacity, ended);
                    if args.simulate_only {
                        print_row(cli, &label, &name, &simulated, None, None);
                        rows.push(json!({"capacity_percent": percent, "capacity_blocks": capacity, "policy": policy.name(), "end_hints_percent": end_hints, "simulated": simulated}));
                    } else {
                        let run = EngineRun {
                            policy,
                            ended,
                            end_hints: *end_hints,
                            capacity,
                            percent,
                            label: &label,
                            name: &name,
                            simulated: &simulated,
                        };
                        let (row, wrong_blocks) =
                            replay_on_engine(cli, args, &trace, unique, quiet, &run)?;
                        wrong += wrong_blocks;
                        rows.push(row);
                    }
                    for &shape in &args.cluster {
                        let simulated =
                            replay::simulate_cluster(&trace, policy, capacity, shape, ended);
                        let name = format!("{name} on {shape}");
                        if args.simulate_only {
                            print_row(cli, &label, &name, &simulated, None, None);
                            rows.push(json!({"capacity_percent": percent, "capacity_blocks": capacity, "policy": policy.name(), "end_hints_percent": end_hints, "cluster": shape, "simulated": simulated}));
                            continue;
                        }
                        let setup = EngineReplay {
                            policy,
                            ended: ended.clone(),
                            dram_blocks: capacity,
                            block_bytes: args.block_bytes as usize,
                            nvme: None,
                        };
                        let bar = progress_bar(trace.requests.len() as u64, quiet);
                        let result = replay::replay_cluster(&trace, &setup, shape, |n| {
                            bar.set_position(n as u64)
                        });
                        bar.finish_and_clear();
                        let result = result?;
                        wrong += result.wrong_blocks;
                        print_row(
                            cli,
                            &label,
                            &name,
                            &result.hits,
                            Some(&result),
                            Some(&simulated),
                        );
                        rows.push(json!({"capacity_percent": percent, "capacity_blocks": capacity, "policy": policy.name(), "end_hints_percent": end_hints, "cluster": shape, "engine": result, "simulated": simulated}));
                    }
                }
            }
        }
        if cli.json {
            println!(
                "{}",
                serde_json::to_string_pretty(&json!({
                    "trace": args.trace,
                    "requests": trace.requests.len(),
                    "block_refs": trace.block_refs(),
                    "distinct_blocks": unique,
                    "ceiling": ceiling,
                    "block_bytes": args.block_bytes,
                    "nvme_percent": args.nvme_percent,
                    "rows": rows,
                }))?
            );
        } else if wrong > 0 {
            println!("\n{wrong} hit blocks came back with the wrong bytes");
        }
        Ok(if wrong > 0 {
            ExitCode::from(1)
        } else {
            ExitCode::SUCCESS
        })
    }

    /// One policy at one capacity and end-hint share, in a real engine.
    struct EngineRun<'a> {
        policy: mooncake_kv_engine::EvictionPolicyKind,
        ended: &'a [bool],
        end_hints: Option<f64>,
        capacity: usize,
        percent: f64,
        label: &'a str,
        name: &'a str,
        simulated: &'a replay::Hits,
    }

    /// Replays the trace into an engine set up as `run` says, prints its row and returns it
    /// for the JSON output, with the number of hit blocks that came back wrong.
    fn replay_on_engine(
        cli: &Cli,
        args: &ReplayArgs,
        trace: &Trace,
        unique: usize,
        quiet: bool,
        run: &EngineRun<'_>,
    ) -> anyhow::Result<(serde_json::Value, u64)> {
        let EngineRun {
            policy,
            capacity,
            percent,
            ..
        } = *run;
        let nvme_dir = (args.nvme_percent > 0.0).then(|| {
            args.nvme_dir.join(format!(
                "kvctl-replay-{}-{policy}-{percent}",
                std::process::id()
            ))
        });
        let setup = EngineReplay {
            policy,
            ended: run.ended.to_vec(),
            dram_blocks: capacity,
            block_bytes: args.block_bytes as usize,
            nvme: nvme_dir.clone().map(|dir| {
                (
                    dir,
                    ((unique as f64 * args.nvme_percent / 100.0) as usize).max(1),
                )
            }),
        };
        let bar = progress_bar(trace.requests.len() as u64, quiet);
        let result = replay::replay_engine(trace, &setup, |n| bar.set_position(n as u64));
        bar.finish_and_clear();
        if let Some(dir) = &nvme_dir {
            // Best effort: the directory is ours and only holds replay blocks.
            let _ = std::fs::remove_dir_all(dir);
        }
        let result = result?;
        print_row(
            cli,
            run.label,
            run.name,
            &result.hits,
            Some(&result),
            Some(run.simulated),
        );
        let row = json!({
            "capacity_percent": percent,
            "capacity_blocks": capacity,
            "policy": policy.name(),
            "end_hints_percent": run.end_hints,
            "engine": result,
            "simulated": run.simulated,
        });
        Ok((row, result.wrong_blocks))
    }

    fn progress_bar(len: u64, quiet: bool) -> ProgressBar {
        if quiet {
            return ProgressBar::hidden();
        }
        ProgressBar::new(len).with_style(
            ProgressStyle::with_template("{bar:40} {pos}/{len} requests {elapsed}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        )
    }

    fn print_row(
        cli: &Cli,
        capacity: &str,
        policy: &str,
        hits: &replay::Hits,
        engine: Option<&replay::EngineHits>,
        simulated: Option<&replay::Hits>,
    ) {
        if cli.json {
            return;
        }
        let pct = |x: f64| format!("{:.1}%", 100.0 * x);
        let share = |n: u64| {
            pct(if hits.blocks == 0 {
                0.0
            } else {
                n as f64 / hits.blocks as f64
            })
        };
        println!(
            "{capacity:>14}  {policy:<30} {:>8} {:>8} {:>9} {:>9} {:>10} {:>7}",
            pct(hits.block_ratio()),
            pct(hits.token_ratio()),
            engine.map_or("-".into(), |e| share(e.dram_hit_blocks)),
            engine.map_or("-".into(), |e| share(e.nvme_hit_blocks)),
            simulated.map_or("-".into(), |s| pct(s.block_ratio())),
            engine.map_or("-".into(), |e| format!("{:.1}", e.seconds)),
        );
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
