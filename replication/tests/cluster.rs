//! A cluster client over three nodes on 127.0.0.1, R = 2, W = 2: replicated puts land on two
//! distinct nodes; while a reader keeps reading every key, one node stops: no read errors, no
//! misses, no wrong bytes. A put with too few live replicas says which failed and why.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use mooncake_kv_engine::EngineConfig;
use mooncake_kv_replication::cluster::{ClusterClient, ClusterConfig, ClusterError};
use mooncake_kv_replication::membership::StaticConfig;
use mooncake_kv_replication::{Node, NodeConfig};

use mooncake_kv_test_support::ReadTally;

fn node() -> Node {
    Node::start(NodeConfig {
        listen: "127.0.0.1:0".into(),
        data_listen: "127.0.0.1:0".into(),
        engine: EngineConfig {
            dram_capacity_bytes: 64 << 20,
            ..EngineConfig::default()
        },
        ..NodeConfig::default()
    })
    .expect("start a node")
}

/// Static membership of `peers`, with failure detection fast enough for a test.
fn fast_membership(peers: Vec<SocketAddr>) -> StaticConfig {
    StaticConfig {
        peers,
        heartbeat: Duration::from_millis(50),
        suspect_after: Duration::from_millis(300),
        dead_after: Duration::from_millis(800),
        ..StaticConfig::default()
    }
}

/// Waits up to 10 s until `cluster` sees `members` live.
fn wait_live(cluster: &ClusterClient, members: usize) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while cluster.membership().live_members().len() < members {
        assert!(
            Instant::now() < deadline,
            "{members} members never all live"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Three nodes (each in an `Option`, so that a test can stop one) and a cluster client over
/// them that sees all three live.
fn three_nodes() -> (Vec<Option<Node>>, ClusterClient) {
    let nodes: Vec<Option<Node>> = (0..3).map(|_| Some(node())).collect();
    let cluster = ClusterClient::new(ClusterConfig {
        membership: fast_membership(nodes.iter().flatten().map(Node::control_addr).collect())
            .into(),
        ..ClusterConfig::default()
    })
    .unwrap();
    wait_live(&cluster, 3);
    (nodes, cluster)
}

fn value(i: u64) -> Vec<u8> {
    let len = 1000 + (i * 7919 % 9000) as usize;
    (0..len).map(|j| (i as usize * 31 + j) as u8).collect()
}

#[test]
fn reads_fail_over_without_errors_when_a_replica_stops() {
    let (mut nodes, cluster) = three_nodes();
    const KEYS: u64 = 2000;
    for i in 0..KEYS {
        let held = cluster.put(format!("k{i}").as_bytes(), &value(i)).unwrap();
        assert_eq!(held.len(), 2);
        assert_ne!(held[0], held[1], "two distinct replicas");
    }
    // Every node holds about 2/3 of the blocks.
    for node in nodes.iter().flatten() {
        let blocks = node.engine().stats().tiers[0].blocks;
        assert!(
            (1000..1700).contains(&blocks),
            "unbalanced: {blocks} of {KEYS}"
        );
    }

    let stop = AtomicBool::new(false);
    let tally = ReadTally::default();
    std::thread::scope(|scope| {
        scope.spawn(|| {
            tally.read_until(&cluster, &stop, KEYS, |i| format!("k{i}"), value);
        });
        std::thread::sleep(Duration::from_millis(300));
        // Stop a node in the middle of the reads.
        nodes[1]
            .take()
            .unwrap()
            .shutdown(Duration::from_secs(1))
            .unwrap();
        std::thread::sleep(Duration::from_millis(1500));
        stop.store(true, Ordering::Relaxed);
    });
    let (reads, errors, misses, wrong) = tally.counts();
    eprintln!("{reads} reads, {errors} errors, {misses} misses, {wrong} wrong");
    assert!(reads > KEYS);
    assert_eq!(errors, 0);
    assert_eq!(misses, 0);
    assert_eq!(wrong, 0);
    // Every acknowledged block is still readable.
    for i in 0..KEYS {
        assert_eq!(
            cluster.get(format!("k{i}").as_bytes()).unwrap(),
            Some(value(i))
        );
    }

    // Two live members, R = 2, W = 2: puts still succeed on both. Stop another: a put asks
    // the one left and meets a quorum of min(W, live) = 1.
    assert_eq!(cluster.put(b"after", b"two left").unwrap().len(), 2);
    nodes[2]
        .take()
        .unwrap()
        .shutdown(Duration::from_secs(1))
        .unwrap();
    // While the stopped node is still believed live, a put to it fails and says why.
    match cluster.put(b"during", b"one stopped") {
        Ok(held) => assert_eq!(held.len(), 1, "membership already saw it go"),
        Err(ClusterError::Quorum {
            acked, failures, ..
        }) => {
            assert_eq!(acked, 1);
            assert_eq!(failures.len(), 1);
            assert_eq!(failures[0].addr.ip().to_string(), "127.0.0.1");
            assert!(failures[0].addr.port() != 0);
        }
        Err(other) => panic!("unexpected {other}"),
    }
}

#[test]
fn settings_that_cannot_work_are_refused() {
    for (r, w) in [(0, 0), (2, 0), (2, 3)] {
        assert!(matches!(
            ClusterClient::new(ClusterConfig {
                replication_factor: r,
                write_quorum: w,
                ..ClusterConfig::default()
            }),
            Err(ClusterError::Config(_))
        ));
    }
    let empty = ClusterClient::new(ClusterConfig::default()).unwrap();
    assert!(matches!(
        empty.put(b"k", b"v"),
        Err(ClusterError::NoLiveMember)
    ));
}

/// After a node stops, the survivors copy each block that lost a replica to its new owner:
/// every block has R live replicas again, and the figures say how many were copied.
#[test]
fn repair_restores_the_replication_factor_after_a_node_stops() {
    use mooncake_kv_replication::repair::RepairConfig;
    use mooncake_kv_replication::{Client, ClientConfig};

    let mut nodes: Vec<Option<Node>> = (0..3).map(|_| Some(node())).collect();
    let peers: Vec<_> = nodes.iter().flatten().map(Node::control_addr).collect();
    for node in nodes.iter().flatten() {
        node.start_repair(RepairConfig {
            membership: fast_membership(peers.clone()).into(),
            ..RepairConfig::default()
        })
        .unwrap();
    }
    let cluster = ClusterClient::new(ClusterConfig {
        membership: fast_membership(peers.clone()).into(),
        ..ClusterConfig::default()
    })
    .unwrap();
    wait_live(&cluster, 3);
    const KEYS: u64 = 1000;
    for i in 0..KEYS {
        cluster.put(format!("r{i}").as_bytes(), &value(i)).unwrap();
    }
    let stopped_blocks = nodes[1].as_ref().unwrap().engine().stats().tiers[0].blocks;
    nodes[1]
        .take()
        .unwrap()
        .shutdown(Duration::from_secs(1))
        .unwrap();

    let clients: Vec<(u64, Client)> = nodes
        .iter()
        .flatten()
        .map(|n| {
            (
                n.member_id(),
                Client::connect(n.control_addr(), ClientConfig::default()).unwrap(),
            )
        })
        .collect();
    let under_replicated = || {
        (0..KEYS)
            .filter(|i| {
                let key = format!("r{i}").into_bytes();
                clients
                    .iter()
                    .filter(|(_, c)| c.exists(&[&key]).unwrap()[0])
                    .count()
                    < 2
            })
            .count()
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let missing = under_replicated();
        if missing == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{missing} blocks still under-replicated"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let copied: u64 = nodes
        .iter()
        .flatten()
        .map(|n| {
            n.repair_stats()
                .unwrap()
                .blocks_copied
                .load(Ordering::Relaxed)
        })
        .sum();
    eprintln!("the stopped node held {stopped_blocks} blocks; repair copied {copied}");
    assert!(
        copied >= stopped_blocks / 2,
        "copied {copied} of {stopped_blocks}"
    );
    assert!(
        copied <= 2 * stopped_blocks,
        "copied far too much: {copied}"
    );
    for i in 0..KEYS {
        assert_eq!(
            cluster.get(format!("r{i}").as_bytes()).unwrap(),
            Some(value(i))
        );
    }
    assert!(
        nodes[0]
            .as_ref()
            .unwrap()
            .metrics_text()
            .contains("mooncake_repair_blocks_copied_total")
    );
}

/// A fourth node joins a cluster of three while a writer keeps putting new blocks: the share
/// of new writes it takes rises gradually over the join ramp (4 s here, 60 s by default),
/// instead of jumping to its full share (half of the blocks, with R = 2 of 4) at once. The
/// share is measured on the nodes themselves: which new blocks the fourth node holds.
#[test]
fn a_joining_node_takes_new_writes_gradually() {
    let nodes: Vec<Node> = (0..3).map(|_| node()).collect();
    // The fourth node's address, reserved now, served later.
    let fourth_addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap();
    let mut peers: Vec<_> = nodes.iter().map(Node::control_addr).collect();
    peers.push(fourth_addr);
    let ramp = Duration::from_secs(4);
    let cluster = ClusterClient::new(ClusterConfig {
        membership: StaticConfig {
            join_ramp: ramp,
            ..fast_membership(peers)
        }
        .into(),
        ..ClusterConfig::default()
    })
    .unwrap();
    wait_live(&cluster, 3);
    // Let the first three finish their own ramp, so the cluster is in its steady state.
    std::thread::sleep(ramp);

    let stop = AtomicBool::new(false);
    let written = parking_lot::Mutex::new(Vec::<(Duration, u64)>::new());
    let joined = parking_lot::Mutex::new(None::<Instant>);
    let fourth = std::thread::scope(|scope| {
        scope.spawn(|| {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                cluster
                    .put(format!("new/{i}").as_bytes(), &value(i))
                    .expect("put under load");
                if let Some(at) = *joined.lock() {
                    written.lock().push((at.elapsed(), i));
                }
                i += 1;
            }
        });
        std::thread::sleep(Duration::from_millis(300));
        // Room for every block it takes: an eviction would take the oldest out of the count
        // below (on a fast machine, all of the first second's).
        let fourth = Node::start(NodeConfig {
            listen: fourth_addr.to_string(),
            data_listen: "127.0.0.1:0".into(),
            engine: EngineConfig {
                dram_capacity_bytes: 1 << 30,
                ..EngineConfig::default()
            },
            ..NodeConfig::default()
        })
        .expect("start the fourth node");
        wait_live(&cluster, 4);
        *joined.lock() = Some(Instant::now());
        std::thread::sleep(ramp + Duration::from_secs(1));
        stop.store(true, Ordering::Relaxed);
        fourth
    });

    // Share of each half second's new blocks the fourth node holds.
    let written = written.into_inner();
    let windows = (ramp.as_millis() / 500 + 2) as usize;
    let (mut shares, mut counts) = (Vec::new(), Vec::new());
    for w in 0..windows {
        let keys: Vec<Vec<u8>> = written
            .iter()
            .filter(|(at, _)| at.as_millis() as usize / 500 == w)
            .map(|(_, i)| format!("new/{i}").into_bytes())
            .collect();
        if keys.is_empty() {
            continue;
        }
        let held = keys.iter().filter(|k| fourth.engine().exists(k)).count();
        shares.push(held as f64 / keys.len() as f64);
        counts.push(keys.len());
    }
    eprintln!(
        "fourth node's share of new writes per 0.5 s since it joined: {:?} of {counts:?}",
        shares
            .iter()
            .map(|s| format!("{:.0}%", s * 100.0))
            .collect::<Vec<_>>()
    );
    assert!(shares.len() >= windows - 1, "too few writes: {shares:?}");
    let dram = &fourth.engine().stats().tiers[0];
    assert_eq!(
        dram.evictions, 0,
        "the count needs every block the node took"
    );
    let (first, last) = (shares[0], shares[shares.len() - 1]);
    // Weight 1-12% of a full member in the first half second: a small share, not half.
    assert!(first < 0.15, "took {first:.2} of new writes at once");
    // After the ramp, its full share: half the blocks (R = 2 of 4 members).
    assert!((0.38..=0.62).contains(&last), "full share {last:.2}");
    // In between it rises, window after window, give or take sampling noise: which node a
    // key lands on is a coin toss, so two windows' shares near a half differ by up to three
    // standard deviations, more when a loaded machine writes fewer keys per window.
    for (w, pair) in shares.windows(2).enumerate() {
        let noise = 3.0 * (0.25 / counts[w] as f64 + 0.25 / counts[w + 1] as f64).sqrt();
        assert!(
            pair[1] > pair[0] - noise.max(0.08),
            "share fell: {shares:?} of {counts:?}"
        );
    }
    let mid = shares[shares.len() / 2];
    assert!(first < mid && mid < last, "not gradual: {shares:?}");
}

/// A node restarted on its data directory in a cluster of one (its member list is itself)
/// has nobody to reconcile with: it serves what it read back from disk as soon as it sees
/// itself, not after the wait meant for absent peers.
#[test]
fn a_lone_member_back_with_its_data_serves_it_at_once() {
    use mooncake_kv_replication::repair::RepairConfig;
    let dir = tempfile::tempdir().unwrap();
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap();
    let config = || NodeConfig {
        listen: addr.to_string(),
        data_listen: "127.0.0.1:0".into(),
        engine: EngineConfig {
            dram_capacity_bytes: 16 << 20,
            data_dir: Some(dir.path().to_owned()),
            nvme_capacity_bytes: 16 << 20,
            ..EngineConfig::default()
        },
        ..NodeConfig::default()
    };
    let repair = || RepairConfig {
        membership: StaticConfig {
            peers: vec![addr],
            heartbeat: Duration::from_millis(50),
            ..StaticConfig::default()
        }
        .into(),
        replication_factor: 1,
        ..RepairConfig::default()
    };
    {
        let node = Node::start(config()).unwrap();
        node.engine().put(b"kept", b"from before").unwrap();
        node.shutdown(Duration::from_secs(1)).unwrap();
    }
    let node = Node::start(config()).unwrap();
    node.start_repair(repair()).unwrap();
    let client = mooncake_kv_replication::Client::connect(
        node.control_addr(),
        mooncake_kv_replication::ClientConfig::default(),
    )
    .unwrap();
    let started = Instant::now();
    while client.get(b"kept").unwrap().is_none() {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "a lone member kept its own blocks hidden"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(
        client.get(b"kept").unwrap().as_deref(),
        Some(&b"from before"[..])
    );
}

fn lookups(node: &Node) -> u64 {
    mooncake_kv_test_support::metric(
        &node.metrics_text(),
        "mooncake_requests_total{kind=\"lookup\"}",
    )
}

/// A batch read's items: each key (with the value it should read, if any) and its buffer.
fn batch<'a>(
    keys: &'a [(Vec<u8>, Option<u64>)],
    bufs: &'a mut [Vec<u8>],
) -> Vec<(&'a [u8], &'a mut [u8])> {
    keys.iter()
        .zip(bufs.iter_mut())
        .map(|((k, _), b)| (k.as_slice(), b.as_mut_slice()))
        .collect()
}

#[test]
fn a_batch_read_asks_each_member_once_per_round_and_fails_over() {
    let (mut nodes, cluster) = three_nodes();
    const KEYS: u64 = 30;
    const ABSENT: usize = 20;
    for i in 0..KEYS {
        cluster.put(format!("b{i}").as_bytes(), &value(i)).unwrap();
    }
    // Every value, a key no one has after every third one, and a buffer too small (for b8).
    let mut keys: Vec<(Vec<u8>, Option<u64>)> = Vec::new();
    for i in 0..KEYS {
        keys.push((format!("b{i}").into_bytes(), Some(i)));
        if keys.len() % 3 == 2 && keys.iter().filter(|k| k.1.is_none()).count() < ABSENT {
            keys.push((format!("b-none-{i}").into_bytes(), None));
        }
    }
    while keys.iter().filter(|k| k.1.is_none()).count() < ABSENT {
        let j = keys.len();
        keys.push((format!("b-none-tail-{j}").into_bytes(), None));
    }
    let short = keys.iter().position(|k| k.1 == Some(8)).unwrap();
    let check = |cluster: &ClusterClient, round: &str| {
        let mut bufs: Vec<Vec<u8>> = keys.iter().map(|_| vec![0u8; 10_000]).collect();
        bufs[short] = vec![0u8; 10];
        let mut items = batch(&keys, &mut bufs);
        let results = cluster.get_into_batch(&mut items);
        assert_eq!(results.len(), keys.len());
        for (at, ((result, buf), (_, expected))) in results.iter().zip(&bufs).zip(&keys).enumerate()
        {
            match (expected, result) {
                (None, Ok(None)) => {}
                (Some(8), Err(ClusterError::BufferTooSmall { needed, available })) => {
                    assert_eq!((*needed, *available), (value(8).len(), 10), "{round}");
                }
                (Some(i), Ok(Some(len))) if *i != 8 => {
                    assert_eq!(
                        &buf[..*len],
                        &value(*i)[..],
                        "{round}: item {at} read wrong"
                    );
                }
                (_, other) => panic!("{round}: item {at} ({expected:?}): {other:?}"),
            }
        }
    };
    // All live: in each round every member is asked at most once, for the keys whose turn it
    // is; the keys no one has go down their read order, three members in three rounds. Key by
    // key, the misses alone would take 60 lookups.
    let before: Vec<u64> = nodes.iter().flatten().map(lookups).collect();
    check(&cluster, "all live");
    let asked: u64 = nodes
        .iter()
        .flatten()
        .zip(&before)
        .map(|(node, before)| lookups(node) - before)
        .sum();
    assert!(
        asked <= 3 * 3,
        "{asked} lookups for a batch of {} keys ({ABSENT} absent) over 3 members",
        keys.len()
    );
    // A member stops, and the client has not noticed yet: its share is read from the other
    // replicas, with no error and no wrong byte.
    nodes[0]
        .take()
        .unwrap()
        .shutdown(Duration::from_secs(1))
        .unwrap();
    check(&cluster, "one stopped");
    // Every member stopped: each key fails (every member asked failed, or the client already
    // knows none is live), none passes for a miss.
    for node in nodes.iter_mut().filter_map(Option::take) {
        node.shutdown(Duration::from_secs(1)).unwrap();
    }
    let mut bufs: Vec<Vec<u8>> = keys.iter().map(|_| vec![0u8; 10_000]).collect();
    let mut items = batch(&keys, &mut bufs);
    for (at, result) in cluster.get_into_batch(&mut items).iter().enumerate() {
        assert!(
            matches!(
                result,
                Err(ClusterError::AllReplicasFailed(_) | ClusterError::NoLiveMember)
            ),
            "all stopped: item {at}: {result:?}"
        );
    }
}

fn requests(node: &Node, kind: &str) -> u64 {
    mooncake_kv_test_support::metric(
        &node.metrics_text(),
        &format!("mooncake_requests_total{{kind=\"{kind}\"}}"),
    )
}

#[test]
fn a_batch_asks_the_members_beyond_its_keys_replicas_at_once_whether_they_hold_them() {
    use mooncake_kv_replication::{Client, ClientConfig};
    // Five members, R = 2: past a key's two replicas, three more members to look on.
    let nodes: Vec<Node> = (0..5).map(|_| node()).collect();
    let cluster = ClusterClient::new(ClusterConfig {
        membership: fast_membership(nodes.iter().map(Node::control_addr).collect()).into(),
        ..ClusterConfig::default()
    })
    .unwrap();
    wait_live(&cluster, 5);
    let count = |kind: &str| nodes.iter().map(|node| requests(node, kind)).sum::<u64>();
    // A block on a member that is not one of its replicas, as an older membership may have
    // left it before repair moves it.
    let elsewhere = b"elsewhere".as_slice();
    let replicas: Vec<SocketAddr> = cluster.replicas(elsewhere).iter().map(|r| r.1).collect();
    assert_eq!(replicas.len(), 2);
    let holder = nodes
        .iter()
        .find(|node| !replicas.contains(&node.control_addr()))
        .unwrap();
    Client::connect(holder.control_addr(), ClientConfig::default())
        .unwrap()
        .put(elsewhere, &value(7))
        .unwrap();

    // One key: every member in turn.
    assert_eq!(cluster.get(b"nowhere").unwrap(), None);
    assert_eq!(cluster.get(elsewhere).unwrap(), Some(value(7)));

    // A batch: 10 present keys, 20 absent, and the one beyond its replicas.
    for i in 0..10 {
        cluster.put(format!("p{i}").as_bytes(), &value(i)).unwrap();
    }
    let mut keys: Vec<(Vec<u8>, Option<u64>)> = (0..10)
        .map(|i| (format!("p{i}").into_bytes(), Some(i)))
        .chain((0..20).map(|i| (format!("absent{i}").into_bytes(), None)))
        .collect();
    keys.insert(15, (elsewhere.to_vec(), Some(7)));
    let mut bufs: Vec<Vec<u8>> = keys.iter().map(|_| vec![0u8; 10_000]).collect();
    let mut items = batch(&keys, &mut bufs);
    let (lookups, exists) = (count("lookup"), count("exists"));
    let results = cluster.get_into_batch(&mut items);
    let (lookups, exists) = (count("lookup") - lookups, count("exists") - exists);
    for (at, ((result, buf), (_, expected))) in results.iter().zip(&bufs).zip(&keys).enumerate() {
        match (expected, result) {
            (None, Ok(None)) => {}
            (Some(i), Ok(Some(len))) => {
                assert_eq!(&buf[..*len], &value(*i)[..], "item {at} read wrong");
            }
            (_, other) => panic!("item {at} ({expected:?}): {other:?}"),
        }
    }
    // Two rounds over the replicas and one for the block found elsewhere, each member asked
    // once a round at most; one `exists` each at most. Member by member, as before, the
    // absent keys alone took five rounds.
    assert!(lookups <= 2 * 5 + 1, "{lookups} lookups");
    assert!(exists <= 5, "{exists} exists");
}

#[test]
fn a_batch_put_sends_each_member_its_share_and_counts_each_key_against_the_quorum() {
    let (mut nodes, cluster) = three_nodes();
    let keys: Vec<Vec<u8>> = (0..24u64).map(|i| format!("p{i}").into_bytes()).collect();
    let values: Vec<Vec<u8>> = (0..24).map(value).collect();
    let items: Vec<(&[u8], &[u8])> = keys
        .iter()
        .zip(&values)
        .map(|(k, v)| (k.as_slice(), v.as_slice()))
        .collect();
    let blocks_before: Vec<u64> = nodes
        .iter()
        .flatten()
        .map(|n| n.engine().stats().tiers[0].blocks)
        .collect();
    for (i, outcome) in cluster.put_batch(&items).into_iter().enumerate() {
        let held = outcome.unwrap_or_else(|e| panic!("key {i}: {e}"));
        assert_eq!(held.len(), 2, "key {i}");
        assert_ne!(held[0], held[1], "key {i}: two distinct replicas");
        // On the replicas placement names, as a single put would be.
        let mut placed: Vec<u64> = cluster.replicas(&keys[i]).iter().map(|r| r.0).collect();
        let mut held = held;
        placed.sort_unstable();
        held.sort_unstable();
        assert_eq!(held, placed, "key {i}");
    }
    let added: u64 = nodes
        .iter()
        .flatten()
        .zip(&blocks_before)
        .map(|(n, before)| n.engine().stats().tiers[0].blocks - before)
        .sum();
    assert_eq!(added, 48, "24 blocks, two replicas each");
    for (key, v) in keys.iter().zip(&values) {
        assert_eq!(cluster.get(key).unwrap().as_ref(), Some(v));
    }
    // A member stops before the client notices: a key it is a replica of fails the quorum
    // (W = 2) and names it; the others are held as before.
    let stopped = nodes[0].as_ref().unwrap().control_addr();
    nodes[0]
        .take()
        .unwrap()
        .shutdown(Duration::from_secs(1))
        .unwrap();
    let (mut held, mut refused) = (0, 0);
    for (i, outcome) in cluster.put_batch(&items).into_iter().enumerate() {
        match outcome {
            Ok(replicas) => {
                assert_eq!(replicas.len(), 2, "key {i}");
                held += 1;
            }
            Err(ClusterError::Quorum {
                acked, failures, ..
            }) => {
                assert_eq!(acked, 1, "key {i}");
                assert_eq!(failures.len(), 1, "key {i}");
                assert_eq!(failures[0].addr, stopped, "key {i}");
                refused += 1;
            }
            Err(other) => panic!("key {i}: {other}"),
        }
    }
    assert!(held > 0 && refused > 0, "{held} held, {refused} refused");
}
