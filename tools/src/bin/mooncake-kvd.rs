//! mooncake-kvd: a KVCache node. Serves one engine (DRAM, and NVMe when it has a data
//! directory) to clients over a TCP control plane, a tcp data plane for one-sided reads, and a
//! shared-memory socket for clients on the same host; Prometheus metrics over HTTP.

use std::io::Write;
use std::net::TcpListener;
use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, bail};
use clap::Parser;
use mooncake_kv_engine::{EngineConfig, EvictionPolicyKind};
use mooncake_kv_replication::membership::{EtcdConfig, StaticConfig};
use mooncake_kv_replication::repair::RepairConfig;
use mooncake_kv_replication::{Node, NodeConfig, NodeMetrics};
use mooncake_kv_tools::http::Answer;
use serde::Deserialize;

/// Run a mooncake KVCache node.
///
/// With no flags and no config file it serves on loopback only: control 127.0.0.1:7700, tcp
/// data plane 127.0.0.1:7701, metrics http://127.0.0.1:7702/metrics, a data directory
/// `./mooncake-data`, 256 MiB of DRAM and 1 GiB of NVMe file. Flags override the config file.
///
/// SIGTERM, SIGINT or SIGHUP: stop accepting, finish the requests in flight, flush every block
/// to the data directory, close it, exit 0.
#[derive(Parser, Debug)]
#[command(name = "mooncake-kvd", version, about, long_about)]
struct Cli {
    /// TOML config file; its keys are the long flags' names with `_` for `-`
    /// (e.g. `dram_mib = 512`).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Control-plane address (port 0 picks a free port).
    #[arg(long)]
    listen: Option<String>,
    /// tcp data-plane address.
    #[arg(long)]
    data_listen: Option<String>,
    /// Prometheus metrics address (http://ADDR/metrics); "off" turns it off.
    #[arg(long)]
    metrics_listen: Option<String>,
    /// Data directory (NVMe data file, RocksDB metadata). Created if missing.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Keep everything in DRAM: no data directory, nothing survives a restart.
    #[arg(long)]
    memory_only: bool,
    /// DRAM tier size in MiB.
    #[arg(long)]
    dram_mib: Option<u64>,
    /// NVMe data file size in MiB (fixed when the directory is created).
    #[arg(long)]
    nvme_mib: Option<u64>,
    /// GPU memory (HBM) tier size in MiB. Refused for now (any value but 0): a node's clients
    /// put into and read from its registered host memory, so an HBM tier in a server would
    /// never hold a block. The HBM tier serves an inference process that embeds the engine
    /// (`EngineConfig::hbm`, `Engine::get_into_device`); serving it to peers needs GPUDirect
    /// RDMA registration, which is not built yet.
    #[arg(long)]
    hbm_mib: Option<u64>,
    /// Which blocks leave a full tier first: adaptive (the default: a chain's tail before its
    /// head, and a balance of recency and frequency learnt from the keys it let go of that
    /// came back), prefix-aware (the earlier default, with constants fitted on one trace),
    /// s3-fifo or lru.
    #[arg(long)]
    eviction_policy: Option<EvictionPolicyKind>,
    /// File holding the shared secret clients must present (trailing newline ignored).
    #[arg(long)]
    token_file: Option<PathBuf>,
    /// Do not offer the shared-memory transport to local clients.
    ///
    /// Its socket is kvd.sock in the data directory. A memory-only node's is
    /// mooncake-kvd-PORT.sock in the temporary directory, or mooncake-kvd-pidPID.sock when the
    /// system chooses the port; a memory-only node removes, at start, the pid-named sockets
    /// of processes that are gone.
    #[arg(long)]
    no_shm: bool,
    /// Most authenticated control connections at once (default 1,024). Connections that have
    /// not authenticated have a budget of their own (256) and 5 s to say Hello, so they
    /// never take these places. At start the node raises its open-file limit as far as the
    /// hard limit allows and says in the log if that is below what the limits need.
    #[arg(long)]
    max_connections: Option<usize>,
    /// Event loops serving the control plane's quick requests (lookups with their blocks
    /// inline, exists, prefix matches) with no thread per connection; puts and other requests
    /// go to worker threads. Default: one per two cores, at least one, so that the other
    /// cores serve puts, the data planes and the engine.
    #[arg(long, value_parser = clap::value_parser!(u64).range(1..=1024))]
    event_loops: Option<u64>,
    /// Microseconds a worker that holds a lone client's connection polls it for the next
    /// request before it sleeps, while requests come within twice this of each other
    /// (default 200, at most 10,000; 0 sleeps at once). A request that comes meanwhile is
    /// served with no wake-up, which on a host with few cores also keeps the scheduler from
    /// putting the client and the node on one core between requests. The polling yields the
    /// core to any thread waiting for it, so it takes only a core nothing else wants; a
    /// client that pauses longer costs this much of one once per pause.
    #[arg(long, value_parser = clap::value_parser!(u64).range(0..=10_000))]
    poll_before_sleep_us: Option<u64>,
    /// How long a lookup pins a block, in milliseconds.
    #[arg(long)]
    lease_ms: Option<u64>,
    /// Most leases held at once; beyond, lookups answer without pinning (reads stay correct:
    /// the client verifies every block and looks up again if it moved). 0 never pins.
    #[arg(long)]
    max_leases: Option<usize>,
    /// Control addresses of every member of the cluster, this node's included, comma
    /// separated. With them the node watches its peers and repairs: when a member dies or
    /// joins, it copies each block it holds to the replicas that should hold it now. A node
    /// with peers (or --etcd) holds only its share of each prefix chain, so its prefix-aware
    /// eviction no longer keeps a block for the sake of a later block of its chain.
    #[arg(long, value_delimiter = ',')]
    peers: Vec<String>,
    /// etcd client URLs, comma separated (e.g. http://127.0.0.1:2379), instead of --peers:
    /// the node registers under --etcd-prefix with a lease, watches the prefix for the other
    /// members, and repairs when one comes or goes.
    #[arg(long, value_delimiter = ',')]
    etcd: Vec<String>,
    /// Key prefix of the members' registrations in etcd.
    #[arg(long)]
    etcd_prefix: Option<String>,
    /// Lease time to live in seconds: a dead node leaves the membership this long after it
    /// stopped renewing.
    #[arg(long)]
    etcd_ttl_s: Option<u64>,
    /// Replicas of each block, for repair (clients place them the same way).
    #[arg(long)]
    replication_factor: Option<usize>,
    /// Time between heartbeats to peers, in milliseconds; a peer silent for 3 heartbeats is
    /// suspected, for 10 dead.
    #[arg(long)]
    heartbeat_ms: Option<u64>,
    /// Log level: error, warn, info, debug or trace.
    #[arg(long, default_value = "info")]
    log: tracing::Level,
}

/// The config file. Every key is optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    data_listen: Option<String>,
    metrics_listen: Option<String>,
    data_dir: Option<PathBuf>,
    memory_only: Option<bool>,
    dram_mib: Option<u64>,
    nvme_mib: Option<u64>,
    eviction_policy: Option<String>,
    hbm_mib: Option<u64>,
    token_file: Option<PathBuf>,
    shm: Option<bool>,
    lease_ms: Option<u64>,
    max_leases: Option<usize>,
    max_connections: Option<usize>,
    event_loops: Option<u64>,
    poll_before_sleep_us: Option<u64>,
    peers: Option<Vec<String>>,
    etcd: Option<Vec<String>>,
    etcd_prefix: Option<String>,
    etcd_ttl_s: Option<u64>,
    replication_factor: Option<usize>,
    heartbeat_ms: Option<u64>,
}

/// What the node runs with, after the file and the flags.
#[derive(Debug)]
struct Settings {
    node: NodeConfig,
    metrics_listen: Option<String>,
    repair: Option<RepairConfig>,
}

/// The shared-memory socket of a node with no data directory: named by its control port, so
/// a restarted node finds (and replaces) the file its predecessor left; by its process id
/// when the port is chosen by the system (`:0`), so that two such nodes never share a name.
/// Clients learn the path from the node's hello, so it need not be predictable.
fn memory_only_shm_path(listen: &str) -> PathBuf {
    let name = match listen.rsplit(':').next().map(str::parse::<u16>) {
        Some(Ok(port)) if port != 0 => format!("mooncake-kvd-{port}.sock"),
        _ => format!(
            "{PID_SOCKET_PREFIX}{}{PID_SOCKET_SUFFIX}",
            std::process::id()
        ),
    };
    std::env::temp_dir().join(name)
}

const PID_SOCKET_PREFIX: &str = "mooncake-kvd-pid";
const PID_SOCKET_SUFFIX: &str = ".sock";

/// Removes the pid-named sockets in `dir` that killed nodes left behind: nothing else would
/// ever reuse their names. A socket goes only when no process has its pid (`/proc` says so), so
/// a live node's socket is never touched. Returns how many went.
fn remove_orphaned_pid_sockets(dir: &std::path::Path) -> usize {
    use std::os::unix::fs::FileTypeExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(PID_SOCKET_PREFIX))
            .and_then(|n| n.strip_suffix(PID_SOCKET_SUFFIX))
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let is_socket = entry.file_type().is_ok_and(|t| t.is_socket());
        let process_lives = std::path::Path::new("/proc").join(pid.to_string()).exists();
        if is_socket && !process_lives && std::fs::remove_file(entry.path()).is_ok() {
            removed += 1;
        }
    }
    removed
}

fn settings(cli: &Cli) -> anyhow::Result<Settings> {
    let file: FileConfig = match &cli.config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read config {}", path.display()))?;
            toml::from_str(&text).with_context(|| format!("bad config {}", path.display()))?
        }
        None => FileConfig::default(),
    };
    let memory_only = cli.memory_only || file.memory_only.unwrap_or(false);
    // Absolute, so that the shared-memory socket's path in Hello means the same thing to a
    // client started in another directory.
    let data_dir = (!memory_only)
        .then(|| {
            let dir = cli
                .data_dir
                .clone()
                .or(file.data_dir)
                .unwrap_or_else(|| PathBuf::from("mooncake-data"));
            std::path::absolute(&dir)
                .with_context(|| format!("cannot resolve the data directory {}", dir.display()))
        })
        .transpose()?;
    let mib = |flag: Option<u64>, file: Option<u64>, default: u64, what: &str| {
        let v = flag.or(file).unwrap_or(default);
        v.checked_mul(1 << 20)
            .filter(|_| v > 0)
            .with_context(|| format!("{what} must be a positive number of MiB, not {v}"))
    };
    let token = match cli.token_file.clone().or(file.token_file) {
        Some(path) => {
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read token file {}", path.display()))?;
            let token = text.trim_end_matches(['\n', '\r']).as_bytes().to_vec();
            if token.is_empty() {
                bail!("token file {} is empty", path.display());
            }
            // A node reads at most MAX_HELLO_BODY_BYTES from a connection before it has
            // authenticated; a Hello with a longer token would never be read.
            if token.len() > MAX_TOKEN_BYTES {
                bail!(
                    "token file {} holds {} bytes; a token has at most {MAX_TOKEN_BYTES}",
                    path.display(),
                    token.len()
                );
            }
            Some(token)
        }
        None => None,
    };
    let listen = cli
        .listen
        .clone()
        .or(file.listen)
        .unwrap_or_else(|| "127.0.0.1:7700".to_owned());
    let shm = !cli.no_shm && file.shm.unwrap_or(true);
    let shm_path = shm.then(|| match &data_dir {
        Some(dir) => dir.join("kvd.sock"),
        None => memory_only_shm_path(&listen),
    });
    let lease_ms = cli.lease_ms.or(file.lease_ms).unwrap_or(2000);
    let peers = if cli.peers.is_empty() {
        file.peers.unwrap_or_default()
    } else {
        cli.peers.clone()
    };
    let etcd = if cli.etcd.is_empty() {
        file.etcd.unwrap_or_default()
    } else {
        cli.etcd.clone()
    };
    if !peers.is_empty() && !etcd.is_empty() {
        bail!("give the members as --peers or through --etcd, not both");
    }
    let replication_factor = cli
        .replication_factor
        .or(file.replication_factor)
        .unwrap_or(2);
    if replication_factor == 0 {
        bail!("replication_factor must be at least 1");
    }
    let repair_client = mooncake_kv_replication::ClientConfig {
        token: token.clone(),
        ..mooncake_kv_replication::ClientConfig::default()
    };
    let repair = if !etcd.is_empty() {
        let ttl = cli.etcd_ttl_s.or(file.etcd_ttl_s).unwrap_or(3);
        if ttl == 0 {
            bail!("etcd_ttl_s must be at least 1");
        }
        Some(RepairConfig {
            membership: EtcdConfig {
                endpoints: etcd,
                prefix: cli
                    .etcd_prefix
                    .clone()
                    .or(file.etcd_prefix)
                    .unwrap_or_else(|| EtcdConfig::default().prefix),
                ttl: Duration::from_secs(ttl),
                // The node fills in its own registration when repair starts.
                register: None,
                ..EtcdConfig::default()
            }
            .into(),
            replication_factor,
            client: repair_client,
            ..RepairConfig::default()
        })
    } else if peers.is_empty() {
        None
    } else {
        let peers = peers
            .iter()
            .map(|p| {
                std::net::ToSocketAddrs::to_socket_addrs(p.as_str())
                    .ok()
                    .and_then(|mut a| a.next())
                    .with_context(|| format!("peer {p:?} is not an address"))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let heartbeat = Duration::from_millis(
            cli.heartbeat_ms
                .or(file.heartbeat_ms)
                .unwrap_or(500)
                .max(10),
        );
        Some(RepairConfig {
            membership: StaticConfig {
                peers,
                heartbeat,
                suspect_after: heartbeat * 3,
                dead_after: heartbeat * 10,
                token: token.clone(),
                ..StaticConfig::default()
            }
            .into(),
            replication_factor,
            client: repair_client,
            ..RepairConfig::default()
        })
    };
    let eviction_policy = match (cli.eviction_policy, &file.eviction_policy) {
        (Some(kind), _) => kind,
        (None, Some(name)) => name.parse().context("bad eviction_policy in the config")?,
        (None, None) => EvictionPolicyKind::default(),
    };
    if let Some(n @ 1..) = cli.hbm_mib.or(file.hbm_mib) {
        anyhow::bail!(
            "hbm_mib = {n}: a node's clients put into and read from its registered host \
             memory, so an HBM tier in a server would never hold a block; the HBM tier is for \
             an inference process that embeds the engine (EngineConfig::hbm)"
        );
    }
    let metrics_listen = cli
        .metrics_listen
        .clone()
        .or(file.metrics_listen)
        .unwrap_or_else(|| "127.0.0.1:7702".to_owned());
    Ok(Settings {
        node: NodeConfig {
            listen,
            data_listen: cli
                .data_listen
                .clone()
                .or(file.data_listen)
                .unwrap_or_else(|| "127.0.0.1:7701".to_owned()),
            shm_path,
            token,
            lease: Duration::from_millis(lease_ms),
            max_leases: cli.max_leases.or(file.max_leases).unwrap_or(1 << 16),
            max_connections: match cli.max_connections.or(file.max_connections) {
                Some(0) => bail!("max_connections must be at least 1"),
                Some(n) => n,
                None => NodeConfig::default().max_connections,
            },
            event_loops: match cli.event_loops.or(file.event_loops) {
                Some(n @ 1..=1024) => usize::try_from(n)?,
                Some(n) => bail!("event_loops must be 1 to 1024, not {n}"),
                None => 0,
            },
            poll_before_sleep: match cli.poll_before_sleep_us.or(file.poll_before_sleep_us) {
                Some(us @ 0..=10_000) => Duration::from_micros(us),
                Some(us) => bail!("poll_before_sleep_us must be 0 to 10000, not {us}"),
                None => NodeConfig::default().poll_before_sleep,
            },
            engine: EngineConfig {
                dram_capacity_bytes: mib(cli.dram_mib, file.dram_mib, 256, "dram_mib")?,
                nvme_capacity_bytes: mib(cli.nvme_mib, file.nvme_mib, 1024, "nvme_mib")?,
                eviction_policy,
                // A member of a cluster holds shares of chains (see the field's doc).
                hold_chain_parents: repair.is_none(),
                data_dir,
                ..EngineConfig::default()
            },
            ..NodeConfig::default()
        },
        metrics_listen: (metrics_listen != "off").then_some(metrics_listen),
        repair,
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_max_level(cli.log)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    match run(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("mooncake-kvd: {}", mooncake_kv_tools::report(&error));
            ExitCode::from(2)
        }
    }
}

fn run(cli: &Cli) -> anyhow::Result<()> {
    let settings = settings(cli)?;
    check_dram_fits(settings.node.engine.dram_capacity_bytes)?;
    if let Some(dir) = &settings.node.engine.data_dir {
        // Owner only: the blocks are readable by whoever can read the directory, token or not.
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)
            .with_context(|| format!("cannot create data directory {}", dir.display()))?;
    }
    let stop = Arc::new(AtomicBool::new(false));
    // SIGHUP too: a node whose terminal or session goes away stops as cleanly as on SIGTERM.
    for signal in [
        signal_hook::consts::SIGTERM,
        signal_hook::consts::SIGINT,
        signal_hook::consts::SIGHUP,
    ] {
        signal_hook::flag::register(signal, Arc::clone(&stop))
            .context("cannot install a signal handler")?;
    }
    // A memory-only node's socket lives in the temporary directory, beside any that killed
    // nodes left there.
    if settings.node.engine.data_dir.is_none() && settings.node.shm_path.is_some() {
        let removed = remove_orphaned_pid_sockets(&std::env::temp_dir());
        if removed > 0 {
            tracing::info!(
                removed,
                "removed shared-memory sockets of nodes that are gone"
            );
        }
    }
    raise_open_file_limit(&settings.node);
    let node = Node::start(settings.node).context("cannot start the node")?;
    if let Some(repair) = settings.repair {
        node.start_repair(repair).context("cannot start repair")?;
    }
    let metrics_addr = match &settings.metrics_listen {
        Some(addr) => {
            let listener = TcpListener::bind(addr)
                .with_context(|| format!("cannot bind the metrics listener on {addr}"))?;
            let local = listener.local_addr()?;
            let metrics = node.metrics();
            let stop = Arc::clone(&stop);
            std::thread::Builder::new()
                .name("mooncake-metrics".into())
                .spawn(move || {
                    let served = mooncake_kv_tools::http::serve(&listener, &stop, |path| {
                        metrics_answer(&metrics, path)
                    });
                    if let Err(error) = served {
                        tracing::error!(%error, "the metrics endpoint stopped");
                    }
                })?;
            Some(local)
        }
        None => None,
    };
    // One line on stdout for people and scripts (tests read the ports from it). A reader
    // that has gone already (`mooncake-kvd ... | head -0`) does not stop the node: the
    // line is lost, the node serves on.
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(
        stdout,
        "mooncake-kvd serving control={} data={} metrics={}",
        node.control_addr(),
        node.data_addr(),
        metrics_addr.map_or_else(|| "off".to_owned(), |a| format!("http://{a}/metrics")),
    )
    .and_then(|()| stdout.flush());
    drop(stdout);
    while !stop.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(50));
    }
    tracing::info!("signal received; shutting down");
    let flushed = node
        .shutdown(Duration::from_secs(10))
        .context("flush at shutdown failed")?;
    eprintln!("mooncake-kvd: stopped cleanly ({flushed} blocks flushed)");
    Ok(())
}

/// Longest token: a `Hello` carrying it fits in what a node reads before authentication.
const MAX_TOKEN_BYTES: usize = 4000;

/// Raises the open-file soft limit to the hard limit (a common default soft limit, 1,024,
/// holds about 300 connections), and says in the log when even that is below what the
/// connection limits need: beyond it, new connections fail to be accepted.
fn raise_open_file_limit(node: &NodeConfig) {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    // Each control connection takes two descriptors (the socket and the clone that stops it);
    // so does each connection of the tcp data plane and of the shared-memory socket
    // (at most 1,024 each); the engine and RocksDB take some more.
    let needed = 2 * (node.max_connections + node.max_unauthenticated + 2 * 1024) as u64 + 256;
    let Rlimit { current, maximum } = getrlimit(Resource::Nofile);
    let Some(soft) = current else {
        return; // unlimited
    };
    let target = maximum.unwrap_or(u64::MAX).min(1 << 20);
    let limit = if soft < target {
        match setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(target),
                maximum,
            },
        ) {
            Ok(()) => {
                tracing::info!(from = soft, to = target, "raised the open-file limit");
                target
            }
            Err(error) => {
                tracing::warn!(%error, soft, "cannot raise the open-file limit");
                soft
            }
        }
    } else {
        soft
    };
    if limit < needed {
        tracing::warn!(
            limit,
            needed,
            "the open-file limit is below what the connection limits need; connections \
             beyond it will not be accepted (raise the hard limit, e.g. LimitNOFILE= or \
             ulimit -Hn)"
        );
    }
}

/// Refuses a DRAM tier larger than the machine's physical memory (`MemTotal` in
/// `/proc/meminfo`): its memory is reserved lazily, so such a node would start and then be
/// killed by the kernel once it filled. Where the figure cannot be read, nothing is checked.
fn check_dram_fits(dram_bytes: u64) -> anyhow::Result<()> {
    let Some(total) = physical_memory_bytes() else {
        return Ok(());
    };
    if dram_bytes > total {
        bail!(
            "dram_mib = {} is more than this machine's physical memory ({} MiB)",
            dram_bytes >> 20,
            total >> 20
        );
    }
    Ok(())
}

/// `MemTotal` from `/proc/meminfo`, in bytes.
fn physical_memory_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = text.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line
        .trim_start_matches("MemTotal:")
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    kib.checked_mul(1024)
}

/// The metrics endpoint's answers: `/metrics` (Prometheus text) and `/health`; anything
/// else is a 404.
fn metrics_answer(metrics: &NodeMetrics, path: &str) -> Answer {
    let text = |status, body: &str| Answer {
        status,
        content_type: "text/plain",
        body: body.to_owned(),
    };
    match path {
        "/metrics" => match metrics.render() {
            Some(body) => Answer {
                status: "200 OK",
                content_type: "text/plain; version=0.0.4",
                body,
            },
            None => text("503 Service Unavailable", "stopping\n"),
        },
        "/health" => text("200 OK", "ok\n"),
        _ => text("404 Not Found", "try /metrics\n"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cli(args: &[&str]) -> Cli {
        Cli::try_parse_from(std::iter::once("mooncake-kvd").chain(args.iter().copied())).unwrap()
    }

    #[test]
    fn defaults_serve_loopback_with_a_local_data_directory() {
        let s = settings(&cli(&[])).unwrap();
        assert_eq!(s.node.listen, "127.0.0.1:7700");
        assert_eq!(s.node.data_listen, "127.0.0.1:7701");
        assert_eq!(s.metrics_listen.as_deref(), Some("127.0.0.1:7702"));
        // Absolute: the shared-memory socket's path, inside it, goes to clients anywhere.
        assert_eq!(
            s.node.engine.data_dir,
            Some(std::env::current_dir().unwrap().join("mooncake-data"))
        );
        assert_eq!(
            s.node.shm_path,
            Some(
                std::env::current_dir()
                    .unwrap()
                    .join("mooncake-data/kvd.sock")
            )
        );
        assert_eq!(s.node.engine.dram_capacity_bytes, 256 << 20);
        assert_eq!(s.node.engine.eviction_policy, EvictionPolicyKind::Adaptive);
        assert!(s.node.token.is_none());
        assert!(s.node.shm_path.is_some());
        assert!(
            s.node.engine.hold_chain_parents,
            "a lone node holds whole chains"
        );
    }

    #[test]
    fn a_node_with_peers_holds_no_block_for_a_later_one() {
        let s = settings(&cli(&["--peers", "127.0.0.1:7700,127.0.0.1:7710"])).unwrap();
        assert!(s.repair.is_some());
        assert!(!s.node.engine.hold_chain_parents);
    }

    #[test]
    fn only_sockets_of_processes_that_are_gone_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let gone_pid = || {
            let mut child = std::process::Command::new("true").spawn().unwrap();
            child.wait().unwrap();
            child.id()
        };
        let path = |pid: u32| {
            dir.path()
                .join(format!("{PID_SOCKET_PREFIX}{pid}{PID_SOCKET_SUFFIX}"))
        };
        let orphan = path(gone_pid());
        let live = path(std::process::id());
        let other = dir.path().join("mooncake-kvd-7700.sock");
        let _listeners =
            [&orphan, &live, &other].map(|p| std::os::unix::net::UnixListener::bind(p).unwrap());
        // Named like an orphan but not a socket: not ours to remove.
        let plain = path(gone_pid());
        std::fs::write(&plain, b"not a socket").unwrap();

        assert_eq!(remove_orphaned_pid_sockets(dir.path()), 1);
        assert!(!orphan.exists());
        assert!(live.exists() && other.exists() && plain.exists());
        assert_eq!(remove_orphaned_pid_sockets(dir.path()), 0);
        assert_eq!(remove_orphaned_pid_sockets(&dir.path().join("missing")), 0);
    }

    #[test]
    fn memory_only_nodes_on_system_chosen_ports_get_their_own_socket() {
        let fixed = memory_only_shm_path("127.0.0.1:7700");
        assert!(
            fixed.ends_with("mooncake-kvd-7700.sock"),
            "{}",
            fixed.display()
        );
        assert_eq!(memory_only_shm_path("[::1]:7700"), fixed);
        let own = format!("mooncake-kvd-pid{}.sock", std::process::id());
        for listen in ["127.0.0.1:0", "[::1]:0", "localhost", "nonsense:port"] {
            assert!(memory_only_shm_path(listen).ends_with(&own), "{listen}");
        }
    }

    #[test]
    fn flags_override_the_file_and_bad_values_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("kvd.toml");
        std::fs::write(
            &file,
            "dram_mib = 64\nlisten = \"127.0.0.1:9000\"\nshm = false\n",
        )
        .unwrap();
        let path = file.to_str().unwrap();
        let s = settings(&cli(&["--config", path, "--dram-mib", "32"])).unwrap();
        assert_eq!(s.node.engine.dram_capacity_bytes, 32 << 20);
        assert_eq!(s.node.listen, "127.0.0.1:9000");
        assert!(s.node.shm_path.is_none());
        std::fs::write(&file, "eviction_policy = \"s3-fifo\"\n").unwrap();
        let s = settings(&cli(&["--config", path])).unwrap();
        assert_eq!(s.node.engine.eviction_policy, EvictionPolicyKind::S3Fifo);
        let s = settings(&cli(&["--config", path, "--eviction-policy", "lru"])).unwrap();
        assert_eq!(s.node.engine.eviction_policy, EvictionPolicyKind::Lru);
        std::fs::write(&file, "eviction_policy = \"arc\"\n").unwrap();
        let error = settings(&cli(&["--config", path])).unwrap_err();
        assert!(
            format!("{error:#}").contains("adaptive, lru, s3-fifo, prefix-aware"),
            "{error:#}"
        );
        assert!(Cli::try_parse_from(["mooncake-kvd", "--eviction-policy", "arc"]).is_err());
        // An HBM tier in a server would hold nothing: refused, saying why.
        std::fs::write(&file, "hbm_mib = 512\n").unwrap();
        let error = settings(&cli(&["--config", path])).unwrap_err();
        assert!(format!("{error:#}").contains("hbm_mib = 512"), "{error:#}");
        let s = settings(&cli(&["--config", path, "--hbm-mib", "0"])).unwrap();
        assert!(s.node.engine.hbm.is_none());
        std::fs::write(&file, "dram_mb = 64\n").unwrap();
        let error = settings(&cli(&["--config", path])).unwrap_err();
        assert!(format!("{error:#}").contains("dram_mb"), "{error:#}");
        assert!(settings(&cli(&["--dram-mib", "0"])).is_err());
        let token = dir.path().join("token");
        std::fs::write(&token, "s3cret\n").unwrap();
        let s = settings(&cli(&[
            "--token-file",
            token.to_str().unwrap(),
            "--memory-only",
        ]))
        .unwrap();
        assert_eq!(s.node.token.as_deref(), Some(&b"s3cret"[..]));
        assert!(s.node.engine.data_dir.is_none());
    }
}
