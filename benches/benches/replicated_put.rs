//! A replicated put (R = 2, acknowledged when both replicas hold it) next to an unreplicated
//! put of the same bytes to one node, in one run: three nodes in this process on 127.0.0.1,
//! 64 KiB and 512 KiB values, keys cycling over a space that fits every node's DRAM.
//! The target: the replicated put costs at most 2.2x the unreplicated one.
//! Run: `cargo bench -p mooncake-kv-benches --bench replicated_put`.

use std::hint::black_box;
use std::time::{Duration, Instant};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use mooncake_kv_engine::EngineConfig;
use mooncake_kv_replication::cluster::{ClusterClient, ClusterConfig};
use mooncake_kv_replication::membership::StaticConfig;
use mooncake_kv_replication::{Client, ClientConfig, Node, NodeConfig};

fn node() -> Node {
    Node::start(NodeConfig {
        listen: "127.0.0.1:0".into(),
        data_listen: "127.0.0.1:0".into(),
        engine: EngineConfig {
            dram_capacity_bytes: 512 << 20,
            ..EngineConfig::default()
        },
        ..NodeConfig::default()
    })
    .expect("start a node")
}

fn replicated_put(c: &mut Criterion) {
    let nodes: Vec<Node> = (0..3).map(|_| node()).collect();
    let cluster = ClusterClient::new(ClusterConfig {
        membership: StaticConfig {
            peers: nodes.iter().map(Node::control_addr).collect(),
            heartbeat: Duration::from_millis(200),
            ..StaticConfig::default()
        }
        .into(),
        ..ClusterConfig::default()
    })
    .expect("cluster client");
    let deadline = Instant::now() + Duration::from_secs(10);
    while cluster.membership().live_members().len() < 3 {
        assert!(Instant::now() < deadline, "members never all live");
        std::thread::sleep(Duration::from_millis(20));
    }
    let single =
        Client::connect(nodes[0].control_addr(), ClientConfig::default()).expect("connect");
    let mut group = c.benchmark_group("put");
    for size in [64usize << 10, 512 << 10] {
        let value = vec![0x42u8; size];
        let keys: Vec<Vec<u8>> = (0..256)
            .map(|i| format!("bench/{i}").into_bytes())
            .collect();
        group.throughput(Throughput::Bytes(size as u64));
        let mut i = 0;
        group.bench_function(BenchmarkId::new("unreplicated", size), |b| {
            b.iter(|| {
                i = (i + 1) % keys.len();
                single.put(black_box(&keys[i]), &value).expect("put")
            })
        });
        group.bench_function(BenchmarkId::new("replicated_r2_w2", size), |b| {
            b.iter(|| {
                i = (i + 1) % keys.len();
                cluster.put(black_box(&keys[i]), &value).expect("put")
            })
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(5));
    targets = replicated_put
}
criterion_main!(benches);
