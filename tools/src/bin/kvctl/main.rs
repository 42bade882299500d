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

/// `println!` that ends kvctl quietly when its standard output is closed (`kvctl ls DIR |
/// head`), with the status the default SIGPIPE gives a shell (141), instead of panicking;
/// any other failure to write is an error (status 2).
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        if let Err(error) = writeln!(std::io::stdout(), $($arg)*) {
            $crate::stdout_failed(&error)
        }
    }};
}

/// Ends kvctl after a failed write to standard output (see [`out!`]).
fn stdout_failed(error: &std::io::Error) -> ! {
    if error.kind() == std::io::ErrorKind::BrokenPipe {
        std::process::exit(141);
    }
    eprintln!("kvctl: cannot write to standard output: {error}");
    std::process::exit(2)
}

/// The heading of the options that only the commands talking to a running node use, so that
/// an offline command's `--help` (`verify`, `replay --simulate-only`, `gen-trace`) sets them
/// apart.
const NODE_OPTIONS: &str = "Options for the commands that talk to a node";

/// Talk to a running mooncake KVCache node, or inspect and verify a stopped one's data
/// directory.
///
/// Exit status: 0 on success, 1 when `verify` found corrupt blocks, `get` found no block or
/// `bench` saw wrong bytes, 2 on any error (bad arguments, a node that cannot be reached, a
/// directory that cannot be opened or is in use), 141 when its standard output was closed
/// (`kvctl ... | head`), as the default SIGPIPE gives.
#[derive(Parser)]
#[command(name = "kvctl", version, about, long_about)]
struct Cli {
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    /// The node's control address, for the online commands.
    #[arg(long, global = true, help_heading = NODE_OPTIONS, default_value = "127.0.0.1:7700")]
    addr: String,
    /// File holding the node's shared secret, if it has one.
    #[arg(long, global = true, help_heading = NODE_OPTIONS)]
    token_file: Option<PathBuf>,
    /// Data path for reads: auto (shared memory on the same host, else tcp), tcp or shm.
    #[arg(long, global = true, help_heading = NODE_OPTIONS, default_value = "auto")]
    transport: Transport,
    /// Over tcp, read each block one-sidedly from the node's data plane after the lookup,
    /// instead of receiving it inline with the lookup's answer.
    #[arg(long, global = true, help_heading = NODE_OPTIONS)]
    one_sided: bool,
    /// Over tcp, the most connections one batch of inline reads is spread over, read at once
    /// (a batch needs 4 MiB of values per connection to be spread). Default: the number of
    /// cores; 1 keeps a batch on one connection.
    #[arg(
        long,
        global = true,
        help_heading = NODE_OPTIONS,
        value_parser = clap::value_parser!(u16).range(1..=1024)
    )]
    batch_lanes: Option<u16>,
    /// One-sided reads (shm, or tcp with --one-sided) reuse a block's descriptor this many
    /// milliseconds after its lookup, so a block read again soon costs no lookup; every read
    /// is still verified. 0 looks up every read.
    #[arg(
        long,
        global = true,
        help_heading = NODE_OPTIONS,
        default_value_t = 10_000,
        value_name = "MS"
    )]
    descriptor_ttl_ms: u64,
    /// Over shm, also checksum each payload as it is copied (a check against corrupted
    /// memory). Without it a same-host read checks the block's header after the copy, which is
    /// what catches a slot reused under the reader.
    #[arg(long, global = true, help_heading = NODE_OPTIONS)]
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
    /// Remove blocks. Answered once the removals are committed to the node's data directory
    /// (on a node that has one), so that no crash or restart brings the blocks back.
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
    /// print the prefix hit ratio in blocks and tokens, per tier, next to LRU, Belady's MIN, LRU
    /// told which blocks will be used again and the most used blocks kept for good, computed
    /// offline on the same trace. No node is involved.
    Replay(ReplayArgs),
    /// Write a seeded trace of one workload regime (JSON lines, the format `kvctl replay`
    /// reads): a few popular system prompts, multi-turn conversations, one-off documents
    /// beside a hot set, agent loops, or a mix. See `tools/src/replay/generate.rs` for each
    /// regime's parameters and why.
    GenTrace {
        /// The regime.
        #[arg(long, value_enum)]
        regime: mooncake_kv_tools::replay::generate::Regime,
        /// Requests to write.
        #[arg(long, default_value_t = 20_000, value_parser = clap::value_parser!(u64).range(1..=10_000_000))]
        requests: u64,
        /// Seed: the same seed writes the same trace.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Output file; stdout if absent.
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
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
    /// Read every block and check every CRC and its map entry, after what the node checks at
    /// start (the data file's size against the metadata's). Names each corrupt block, or what
    /// the node would refuse, and exits with status 1 if there is any.
    Verify {
        /// The node's data directory.
        dir: PathBuf,
    },
    /// Rebuild a stopped node's block map from its data file, when the metadata is damaged
    /// (the node then refuses to start and names this command) or lost. Every block in the
    /// data file carries its key, generation and CRCs: each key gets its newest block that
    /// passes every check. The old metadata is moved aside (meta.damaged-SECS), not deleted.
    /// A block removed before the damage comes back if its bytes are still intact.
    Salvage {
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
    /// Policies to try: lru, s3-fifo, prefix-aware, adaptive (the default policy).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "lru,s3-fifo,prefix-aware,adaptive"
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
    /// Drive this many connections from the --concurrency threads (each an event loop that
    /// keeps one get in flight on every one of its connections), so that one process loads
    /// a node with thousands of connections without being what is measured. Gets only,
    /// inline over tcp (--read-percent 100, --batch 1); latency is timed from when each
    /// request was ready to its answer's last byte, and to its first byte as well (what
    /// redis-benchmark reports).
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=100_000))]
    connections: Option<u64>,
    /// With --connections: drive a Redis server at HOST:PORT instead of the node, with the
    /// same loop, connections and clock (GET for each key, each value checked; the keys are
    /// SET first unless --no-prefill). The reference for the node's figures, measured the
    /// same way: redis-benchmark times a request only from when it is written, and only to
    /// the first bytes of its reply.
    #[arg(long, value_name = "HOST:PORT", requires = "connections")]
    redis: Option<String>,
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
            batch_lanes: cli
                .batch_lanes
                .map_or(ClientConfig::default().batch_lanes, usize::from),
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
            let removed = client.remove_durable(&refs)?;
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
        Command::GenTrace {
            regime,
            requests,
            seed,
            output,
        } => {
            use mooncake_kv_tools::replay::generate::{generate, write_trace};
            let trace = generate(*regime, usize::try_from(*requests)?, *seed);
            match output {
                Some(path) => {
                    let file = std::fs::File::create(path)
                        .with_context(|| format!("cannot create {}", path.display()))?;
                    let mut out = std::io::BufWriter::new(file);
                    write_trace(&mut out, trace)
                        .and_then(|()| out.flush())
                        .with_context(|| format!("cannot write {}", path.display()))?;
                }
                None => {
                    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
                    if let Err(error) = write_trace(&mut out, trace).and_then(|()| out.flush()) {
                        stdout_failed(&error);
                    }
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Inspect { dir } => {
            let summary = open(dir)?.summary()?;
            if cli.json {
                out!(
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
                    out!("{name:<16} {value}");
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
                out!("{}", json!({ "blocks": blocks, "total": listed.len() }));
            } else {
                out!(
                    "{:<40} {:>12} {:>14} {:>10} {:>12}",
                    "KEY",
                    "PAYLOAD",
                    "EXTENT",
                    "LEN",
                    "GENERATION"
                );
                for b in shown {
                    match &b.entry {
                        Ok(e) => out!(
                            "{:<40} {:>12} {:>14} {:>10} {:>12}",
                            display_key(&b.key),
                            e.payload_len,
                            e.extent_offset_bytes,
                            e.extent_len_bytes,
                            e.generation
                        ),
                        Err(reason) => {
                            out!("{:<40} bad map entry: {reason}", display_key(&b.key))
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
                out!(
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
                out!("key              {}", display_key(&key));
                out!("generation       {}", header.generation);
                out!("key length       {}", header.key_len);
                out!("payload length   {}", header.payload_len);
                out!("payload offset   {}", header.payload_offset);
                out!("key crc32        {:#010x}", header.key_crc32);
                out!("payload crc32    {:#010x}", header.payload_crc32);
                out!(
                    "extent           {} + {}",
                    entry.extent_offset_bytes,
                    entry.extent_len_bytes
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Salvage { dir } => {
            let bar = if cli.json || !std::io::stderr().is_terminal() {
                ProgressBar::hidden()
            } else {
                ProgressBar::new(0).with_style(
                    ProgressStyle::with_template("scanning {bar:40} {bytes}/{total_bytes} ({eta})")
                        .unwrap_or_else(|_| ProgressStyle::default_bar()),
                )
            };
            let report = mooncake_kv_engine::offline::salvage(dir, |done, total| {
                bar.set_length(total);
                bar.set_position(done);
            })
            .with_context(|| format!("cannot salvage {}", dir.display()))?;
            bar.finish_and_clear();
            let old = report
                .old_metadata
                .as_ref()
                .map(|p| p.display().to_string());
            if cli.json {
                out!(
                    "{}",
                    json!({
                        "scanned_bytes": report.scanned_bytes,
                        "intact_blocks": report.intact_blocks,
                        "superseded_blocks": report.superseded_blocks,
                        "kept_blocks": report.kept_blocks,
                        "damaged_blocks": report.damaged_blocks,
                        "old_metadata": old,
                    })
                );
            } else {
                out!(
                    "scanned {}: {} intact blocks ({} older generations of a kept key), {} \
                     damaged and skipped",
                    bytes(report.scanned_bytes),
                    report.intact_blocks,
                    report.superseded_blocks,
                    report.damaged_blocks
                );
                out!("block map rebuilt: {} blocks", report.kept_blocks);
                if let Some(old) = old {
                    out!("the old metadata is in {old}");
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Verify { dir } => {
            let data_dir = open(dir)?;
            // Where the node would refuse to start, verify fails too (exit 1, not 2: the
            // directory was read, and it is not one a node serves).
            if let Err(error) = data_dir.check_open() {
                if cli.json {
                    out!("{}", json!({ "refused": error.to_string() }));
                } else {
                    out!("REFUSED {error}");
                }
                return Ok(ExitCode::from(1));
            }
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
                out!("{}", json!({ "blocks": total, "corrupt": corrupt }));
            } else {
                for b in &bad {
                    out!("CORRUPT {}: {}", display_key(&b.key), b.error);
                }
                out!("{total} blocks verified, {} corrupt", bad.len());
            }
            Ok(if bad.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
    }
}

mod online;

mod replay_cmd;

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
