//! Replication with real processes: three mooncake-kvd on 127.0.0.1, R = 2, that know each
//! other either from a static list (`--peers`, heartbeats) or through a real etcd server
//! (`--etcd`: registrations kept alive by leases, a watched prefix). Put 10,000 blocks through
//! a cluster client; SIGKILL one node while a reader keeps reading every key: no acknowledged
//! block lost, no read error, no wrong byte. Everyone sees the dead node leave (with etcd:
//! when its lease expires) and repair gives every block two live replicas again. The killed
//! node, started again, rejoins (empty: a memory-only node comes back as a new member) and
//! serves nothing stale.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use mooncake_kv_replication::cluster::{ClusterClient, ClusterConfig};

use mooncake_kv_replication::membership::{EtcdConfig, MembershipConfig, StaticConfig};
use mooncake_kv_replication::{Client, ClientConfig};
use mooncake_kv_test_support::{Kvd, ReadTally, free_port, wait_until};

const HEARTBEAT_MS: u64 = 100;

/// How the nodes find each other.
enum Backend {
    Static {
        addrs: Vec<SocketAddr>,
        peers: String,
    },
    Etcd {
        url: String,
        _server: EtcdServer,
    },
}

impl Backend {
    fn kvd_args(&self) -> Vec<String> {
        match self {
            Backend::Static { peers, .. } => vec![
                "--peers".into(),
                peers.clone(),
                "--heartbeat-ms".into(),
                HEARTBEAT_MS.to_string(),
            ],
            Backend::Etcd { url, .. } => {
                vec![
                    "--etcd".into(),
                    url.clone(),
                    "--etcd-ttl-s".into(),
                    "1".into(),
                ]
            }
        }
    }

    fn kvctl_args(&self) -> Vec<String> {
        match self {
            Backend::Static { peers, .. } => vec!["--peers".into(), peers.clone()],
            Backend::Etcd { url, .. } => vec!["--etcd".into(), url.clone()],
        }
    }

    fn membership(&self) -> MembershipConfig {
        let heartbeat = Duration::from_millis(HEARTBEAT_MS);
        match self {
            Backend::Static { addrs, .. } => StaticConfig {
                peers: addrs.clone(),
                heartbeat,
                suspect_after: heartbeat * 3,
                dead_after: heartbeat * 10,
                token: None,
                ..StaticConfig::default()
            }
            .into(),
            Backend::Etcd { url, .. } => EtcdConfig {
                endpoints: vec![url.clone()],
                ttl: Duration::from_secs(1),
                ..EtcdConfig::default()
            }
            .into(),
        }
    }
}

/// A real etcd server (Debian's etcd-server) on loopback, in a scratch directory; killed on
/// drop.
struct EtcdServer {
    child: Child,
    _dir: tempfile::TempDir,
}

impl EtcdServer {
    fn start() -> (Self, String) {
        let dir = tempfile::tempdir().unwrap();
        let (client, peer) = (free_port(), free_port());
        let url = format!("http://{client}");
        let peer_url = format!("http://{peer}");
        let child = Command::new("etcd")
            .args(["--name", "test", "--data-dir"])
            .arg(dir.path().join("etcd"))
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
            ])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("test={peer_url}")])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start etcd (Debian package etcd-server; scripts/test installs it)");
        let server = EtcdServer { child, _dir: dir };
        wait_until("etcd to serve", Duration::from_secs(20), || {
            std::net::TcpStream::connect(client).is_ok()
        });
        (server, url)
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The kvd processes of a test, killed when it ends, however it ends: a failed assertion
/// must not leave them running (they hold the test's output pipe open).
struct Nodes(Vec<Child>);

impl std::ops::Deref for Nodes {
    type Target = Vec<Child>;
    fn deref(&self) -> &Vec<Child> {
        &self.0
    }
}

impl std::ops::DerefMut for Nodes {
    fn deref_mut(&mut self) -> &mut Vec<Child> {
        &mut self.0
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn start(listen: SocketAddr, backend: &Backend) -> Child {
    start_with(listen, backend, None)
}

/// A kvd, memory only or on a data directory.
fn start_with(listen: SocketAddr, backend: &Backend, data_dir: Option<&std::path::Path>) -> Child {
    let storage: Vec<std::ffi::OsString> = match data_dir {
        None => vec!["--memory-only".into()],
        Some(dir) => vec![
            "--data-dir".into(),
            dir.into(),
            "--nvme-mib".into(),
            "64".into(),
        ],
    };
    let listen = listen.to_string();
    let fixed = [
        "--listen",
        &listen,
        "--data-listen",
        "127.0.0.1:0",
        "--metrics-listen",
        "off",
        "--dram-mib",
        "128",
        "--no-shm",
        "--log",
        "warn",
        "--replication-factor",
        "2",
    ];
    let args = fixed
        .iter()
        .map(std::ffi::OsString::from)
        .chain(storage)
        .chain(backend.kvd_args().into_iter().map(Into::into));
    Kvd::start(env!("CARGO_BIN_EXE_mooncake-kvd"), args).into_child()
}

fn value(i: u64) -> Vec<u8> {
    let len = 2048 + (i * 7919 % 4096) as usize;
    (0..len).map(|j| (i as usize * 131 + j * 7) as u8).collect()
}

/// The addresses as `--peers` takes them.
fn peer_list(addrs: &[SocketAddr]) -> String {
    addrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

#[test]
fn no_acknowledged_block_is_lost_when_a_node_is_killed() {
    let addrs: Vec<SocketAddr> = (0..3).map(|_| free_port()).collect();
    let peers = peer_list(&addrs);
    kill_test(addrs.clone(), Backend::Static { addrs, peers });
}

#[test]
fn no_acknowledged_block_is_lost_when_a_node_is_killed_with_etcd_membership() {
    let (server, url) = EtcdServer::start();
    let addrs: Vec<SocketAddr> = (0..3).map(|_| free_port()).collect();
    kill_test(
        addrs,
        Backend::Etcd {
            url,
            _server: server,
        },
    );
}

/// A cluster client over `backend`'s members, once it sees all three live.
fn cluster_of_three(backend: &Backend) -> ClusterClient {
    let cluster = ClusterClient::new(ClusterConfig {
        membership: backend.membership(),
        ..ClusterConfig::default()
    })
    .unwrap();
    wait_until("three live members", Duration::from_secs(10), || {
        cluster.membership().live_members().len() == 3
    });
    cluster
}

fn kill_test(addrs: Vec<SocketAddr>, backend: Backend) {
    let etcd = matches!(backend, Backend::Etcd { .. });
    let mut children = Nodes(addrs.iter().map(|&a| start(a, &backend)).collect());
    let heartbeat = Duration::from_millis(HEARTBEAT_MS);
    let cluster = cluster_of_three(&backend);

    const KEYS: u64 = 10_000;
    for i in 0..KEYS {
        cluster
            .put(format!("block/{i}").as_bytes(), &value(i))
            .unwrap();
    }

    let stop = AtomicBool::new(false);
    let tally = ReadTally::default();
    std::thread::scope(|scope| {
        scope.spawn(|| {
            tally.read_until(&cluster, &stop, KEYS, |i| format!("block/{i}"), value);
        });
        std::thread::sleep(Duration::from_millis(500));
        children[1].kill().expect("SIGKILL"); // Child::kill sends SIGKILL
        let _ = children[1].wait();
        // Keep reading through suspicion, death (with etcd: the lease running out) and repair.
        std::thread::sleep(heartbeat * 30);
        wait_until(
            "everyone to see the node leave",
            Duration::from_secs(10),
            || cluster.membership().live_members().len() == 2,
        );
        std::thread::sleep(heartbeat * 10);
        stop.store(true, Ordering::Relaxed);
    });
    let (reads, errors, misses, wrong) = tally.counts();
    eprintln!("during the kill: {reads} reads, {errors} errors, {misses} misses, {wrong} wrong");
    assert!(reads > 1000);
    assert_eq!((errors, misses, wrong), (0, 0, 0));

    // Repair: every block on two of the live nodes again.
    let survivors: Vec<Client> = [addrs[0], addrs[2]]
        .iter()
        .map(|&a| Client::connect(a, ClientConfig::default()).unwrap())
        .collect();
    let keys: Vec<Vec<u8>> = (0..KEYS)
        .map(|i| format!("block/{i}").into_bytes())
        .collect();
    wait_until("repair to finish", Duration::from_secs(60), || {
        keys.chunks(500).all(|chunk| {
            let refs: Vec<&[u8]> = chunk.iter().map(Vec::as_slice).collect();
            let held: Vec<Vec<bool>> = survivors.iter().map(|c| c.exists(&refs).unwrap()).collect();
            (0..chunk.len()).all(|k| held.iter().all(|h| h[k]))
        })
    });

    // kvctl cluster says who is live and that nothing is under-replicated.
    let kvctl = |args: &[&str]| {
        Command::new(env!("CARGO_BIN_EXE_kvctl"))
            .args(args)
            .output()
            .expect("run kvctl")
    };
    let members = backend.kvctl_args();
    let members: Vec<&str> = members.iter().map(String::as_str).collect();
    let out = kvctl(&[&["--json", "cluster"], &members[..]].concat());
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    eprintln!("kvctl cluster: {report}");
    assert_eq!(report["live"], 2);
    assert_eq!(report["under_replicated"], 0);
    let live_rows: Vec<&serde_json::Value> = report["members"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|m| m["state"] == "live")
        .collect();
    let copied: u64 = live_rows
        .iter()
        .map(|m| m["repair"]["blocks_copied"].as_u64().unwrap())
        .sum();
    assert!(copied > 0, "repair copied the dead node's blocks: {report}");
    if etcd {
        // Its lease expired: it is no longer registered at all, and the rest is healthy.
        assert_eq!(report["total"], 2);
        assert_eq!(out.status.code(), Some(0));
    } else {
        assert_eq!(report["total"], 3);
        assert_eq!(report["members"][1]["state"], "unreachable");
        assert_eq!(out.status.code(), Some(1), "a member is down");
    }

    // The killed node comes back (empty, as a new member) and rejoins; nothing stale.
    children[1] = start(addrs[1], &backend);
    wait_until("the node back", Duration::from_secs(10), || {
        cluster.membership().live_members().len() == 3
    });
    for i in 0..KEYS {
        assert_eq!(
            cluster.get(format!("block/{i}").as_bytes()).unwrap(),
            Some(value(i)),
            "block {i} after the rejoin"
        );
    }
    let out = kvctl(&[&["cluster"], &members[..]].concat());
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains("3 of 3 members live"), "{table}");
}

/// A node that comes back with its data directory (same node id, its old blocks on disk)
/// after keys were rewritten while it was away: it never serves the old bytes. Until repair
/// has reconciled what it read back from disk with the live members it serves none of it;
/// then it holds the new bytes (or nothing) for every rewritten key, and everything else is
/// as before.
#[test]
fn a_node_back_with_its_data_serves_nothing_stale() {
    let dirs: Vec<tempfile::TempDir> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let addrs: Vec<SocketAddr> = (0..3).map(|_| free_port()).collect();
    let peers = peer_list(&addrs);
    let backend = Backend::Static {
        addrs: addrs.clone(),
        peers,
    };
    let mut children = Nodes(
        addrs
            .iter()
            .zip(&dirs)
            .map(|(&a, d)| start_with(a, &backend, Some(d.path())))
            .collect(),
    );
    let cluster = cluster_of_three(&backend);
    const KEYS: u64 = 2000;
    const REWRITTEN: u64 = 1000;
    let new_value = |i: u64| {
        let mut v = value(i);
        v.reverse();
        v.push(0xee);
        v
    };
    for i in 0..KEYS {
        cluster.put(format!("k/{i}").as_bytes(), &value(i)).unwrap();
    }
    // Node 1 stops cleanly (its blocks are flushed to its data directory) ...
    let pid = rustix::process::Pid::from_child(&children[1]);
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("SIGTERM");
    assert!(children[1].wait().unwrap().success());
    wait_until("the others to see it gone", Duration::from_secs(10), || {
        cluster.membership().live_members().len() == 2
    });
    // ... and half the keys get new bytes while it is away.
    for i in 0..REWRITTEN {
        cluster
            .put(format!("k/{i}").as_bytes(), &new_value(i))
            .unwrap();
    }
    children[1] = start_with(addrs[1], &backend, Some(dirs[1].path()));
    let direct = Client::connect(addrs[1], ClientConfig::default()).unwrap();
    let (mut hidden, mut fresh, mut stale) = (0u64, 0u64, 0u64);
    let mut reconciled = false;
    let deadline = Instant::now() + Duration::from_secs(30);
    // Read the rewritten keys straight from node 1 from the moment it is back until it has
    // reconciled (it serves at least one old, untouched block again).
    while Instant::now() < deadline && !reconciled {
        for i in (0..REWRITTEN).step_by(7) {
            match direct.get(format!("k/{i}").as_bytes()).unwrap() {
                None => hidden += 1,
                Some(v) if v == new_value(i) => fresh += 1,
                Some(_) => stale += 1,
            }
        }
        reconciled = (REWRITTEN..KEYS).any(|i| {
            direct
                .get(format!("k/{i}").as_bytes())
                .unwrap()
                .is_some_and(|v| v == value(i))
        });
    }
    assert!(reconciled, "node 1 never served its own blocks again");
    eprintln!("node 1 while reconciling: {hidden} misses, {fresh} new bytes, {stale} old bytes");
    assert_eq!(stale, 0, "served a block rewritten while it was away");
    assert!(hidden > 0, "the old blocks were hidden at first");
    // After: every rewritten key it holds has the new bytes; the cluster serves every key.
    for i in 0..KEYS {
        let key = format!("k/{i}");
        let want = if i < REWRITTEN {
            new_value(i)
        } else {
            value(i)
        };
        if let Some(v) = direct.get(key.as_bytes()).unwrap() {
            assert_eq!(v, want, "node 1, key {i}");
        }
        assert_eq!(
            cluster.get(key.as_bytes()).unwrap(),
            Some(want),
            "cluster, key {i}"
        );
    }
}
