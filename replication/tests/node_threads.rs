//! A node dropped in this process leaves none of its threads behind: a worker that outlived
//! it would hold the node's state, engine and RocksDB included, and could close them while
//! the process exits (RocksDB then aborts it: "pthread lock: Invalid argument"). Alone in
//! its own test binary, so that no other test's node is running beside it.
//!
//! The case that aborted a CI run (a worker that had counted itself out but not yet let go
//! of the node's state when the node returned) lasts microseconds: this test did not catch
//! it in 60 rounds before the fix. It holds the rule the fix keeps (every thread of the node
//! joined before shutdown returns), which a thread left running after shutdown would break.

use std::time::{Duration, Instant};

use mooncake_kv_engine::EngineConfig;
use mooncake_kv_replication::{Client, ClientConfig, Node, NodeConfig};

/// The names of this process's threads that belong to a node (`mooncake-node-serve`,
/// `-accept`, `-loop-N`, `-leases`, as the kernel keeps them: 15 bytes).
fn node_threads() -> Vec<String> {
    std::fs::read_dir("/proc/self/task")
        .expect("list this process's threads")
        .filter_map(|task| std::fs::read_to_string(task.ok()?.path().join("comm")).ok())
        .map(|comm| comm.trim_end().to_owned())
        .filter(|comm| comm.starts_with("mooncake-node"))
        .collect()
}

#[test]
fn a_dropped_node_leaves_no_thread_behind() {
    let dir = tempfile::tempdir().unwrap();
    for round in 0..20 {
        let node = Node::start(NodeConfig {
            listen: "127.0.0.1:0".into(),
            data_listen: "127.0.0.1:0".into(),
            engine: EngineConfig {
                dram_capacity_bytes: 8 << 20,
                data_dir: Some(dir.path().to_owned()),
                nvme_capacity_bytes: 8 << 20,
                ..EngineConfig::default()
            },
            ..NodeConfig::default()
        })
        .expect("start a node");
        let client = Client::connect(node.control_addr(), ClientConfig::default()).unwrap();
        // Hello and puts go to workers: at least one serves this client.
        client
            .put(format!("k{round}").as_bytes(), b"value")
            .unwrap();
        assert_eq!(
            client
                .get(format!("k{round}").as_bytes())
                .unwrap()
                .as_deref(),
            Some(&b"value"[..])
        );
        assert!(
            node_threads().iter().any(|t| t == "mooncake-node-s"),
            "no worker thread seen: {:?}",
            node_threads()
        );
        drop(client);
        node.shutdown(Duration::from_secs(1)).unwrap();
        // A joined thread may still be on its way out of the kernel for a moment (its joiner
        // is woken before it is gone from /proc); none stays.
        let deadline = Instant::now() + Duration::from_secs(1);
        while !node_threads().is_empty() {
            assert!(
                Instant::now() < deadline,
                "round {round}: threads left running: {:?}",
                node_threads()
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    }
}
