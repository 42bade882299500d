//! A cluster client over three nodes on 127.0.0.1, R = 2, W = 2: replicated puts land on two
//! distinct nodes; while a reader keeps reading every key, one node stops: no read errors, no
//! misses, no wrong bytes. A put with too few live replicas says which failed and why.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use mooncake_kv_engine::EngineConfig;
use mooncake_kv_replication::cluster::{ClusterClient, ClusterConfig, ClusterError};
use mooncake_kv_replication::membership::StaticConfig;
use mooncake_kv_replication::{Node, NodeConfig};

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

fn value(i: u64) -> Vec<u8> {
    let len = 1000 + (i * 7919 % 9000) as usize;
    (0..len).map(|j| (i as usize * 31 + j) as u8).collect()
}

#[test]
fn reads_fail_over_without_errors_when_a_replica_stops() {
    let mut nodes: Vec<Option<Node>> = (0..3).map(|_| Some(node())).collect();
    let cluster = ClusterClient::new(ClusterConfig {
        membership: StaticConfig {
            peers: nodes.iter().flatten().map(Node::control_addr).collect(),
            heartbeat: Duration::from_millis(50),
            suspect_after: Duration::from_millis(300),
            dead_after: Duration::from_millis(800),
            token: None,
        }
        .into(),
        ..ClusterConfig::default()
    })
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while cluster.membership().live_members().len() < 3 {
        assert!(Instant::now() < deadline, "members never all live");
        std::thread::sleep(Duration::from_millis(20));
    }
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
    let (reads, errors, misses, wrong) = (
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
        AtomicU64::new(0),
    );
    std::thread::scope(|scope| {
        scope.spawn(|| {
            let mut i = 0;
            while !stop.load(Ordering::Relaxed) {
                match cluster.get(format!("k{i}").as_bytes()) {
                    Ok(Some(v)) if v == value(i) => {}
                    Ok(Some(_)) => {
                        wrong.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok(None) => {
                        misses.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => {
                        eprintln!("read error: {e}");
                        errors.fetch_add(1, Ordering::Relaxed);
                    }
                }
                reads.fetch_add(1, Ordering::Relaxed);
                i = (i + 1) % KEYS;
            }
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
    eprintln!(
        "{} reads, {} errors, {} misses, {} wrong",
        reads.load(Ordering::Relaxed),
        errors.load(Ordering::Relaxed),
        misses.load(Ordering::Relaxed),
        wrong.load(Ordering::Relaxed)
    );
    assert!(reads.load(Ordering::Relaxed) > KEYS);
    assert_eq!(errors.load(Ordering::Relaxed), 0);
    assert_eq!(misses.load(Ordering::Relaxed), 0);
    assert_eq!(wrong.load(Ordering::Relaxed), 0);
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

    let membership = |peers| StaticConfig {
        peers,
        heartbeat: Duration::from_millis(50),
        suspect_after: Duration::from_millis(300),
        dead_after: Duration::from_millis(800),
        token: None,
    };
    let mut nodes: Vec<Option<Node>> = (0..3).map(|_| Some(node())).collect();
    let peers: Vec<_> = nodes.iter().flatten().map(Node::control_addr).collect();
    for node in nodes.iter().flatten() {
        node.start_repair(RepairConfig {
            membership: membership(peers.clone()).into(),
            ..RepairConfig::default()
        })
        .unwrap();
    }
    let cluster = ClusterClient::new(ClusterConfig {
        membership: membership(peers.clone()).into(),
        ..ClusterConfig::default()
    })
    .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while cluster.membership().live_members().len() < 3 {
        assert!(Instant::now() < deadline, "members never all live");
        std::thread::sleep(Duration::from_millis(20));
    }
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
