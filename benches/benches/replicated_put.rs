//! A replicated put (R = 2, acknowledged when both replicas hold it) next to an unreplicated
//! put of the same bytes to one node, in one run: three nodes in this process on 127.0.0.1,
//! 64 KiB and 512 KiB values, keys cycling over a space that fits every node's DRAM.
//! The target: the replicated put costs at most 2.2x the unreplicated one.
//! Then a batch read of 32 such keys through the cluster client (`get_into_batch`), on three
//! and on eight members, with every key present, half of them absent, and all absent, next to
//! the same batch of present keys from one node; and a `get` of a key no member has. A key no
//! member has costs a batch a round per replica and one round of `exists` on the others.
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

/// `members` nodes in this process and a cluster client (R = 2) that sees them all live.
fn cluster_of(members: usize) -> (Vec<Node>, ClusterClient) {
    let nodes: Vec<Node> = (0..members).map(|_| node()).collect();
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
    while cluster.membership().live_members().len() < members {
        assert!(Instant::now() < deadline, "members never all live");
        std::thread::sleep(Duration::from_millis(20));
    }
    (nodes, cluster)
}

fn replicated_put(c: &mut Criterion) {
    let (nodes, cluster) = cluster_of(3);
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

fn batch_get(c: &mut Criterion) {
    const BATCH: usize = 32;
    const SIZE: usize = 64 << 10;
    let value = vec![0x42u8; SIZE];
    let present: Vec<Vec<u8>> = (0..BATCH)
        .map(|i| format!("bench/get/{i}").into_bytes())
        .collect();
    let absent: Vec<Vec<u8>> = (0..BATCH)
        .map(|i| format!("bench/none/{i}").into_bytes())
        .collect();
    let mut bufs: Vec<Vec<u8>> = (0..BATCH).map(|_| vec![0u8; SIZE]).collect();
    let mut group = c.benchmark_group("batch_get_32");
    group.throughput(Throughput::Bytes((BATCH * SIZE) as u64));
    for members in [3, 8] {
        let (nodes, cluster) = cluster_of(members);
        for key in &present {
            cluster.put(key, &value).expect("put");
        }
        let cases: [(&str, usize); 3] = [("all_present", 0), ("half_absent", 2), ("all_absent", 1)];
        for (name, absent_every) in cases {
            // Every `absent_every`-th key absent (0: none).
            let keys: Vec<&[u8]> = (0..BATCH)
                .map(|i| match absent_every {
                    0 => &present[i][..],
                    n if i % n == 0 => &absent[i][..],
                    _ => &present[i][..],
                })
                .collect();
            let id = BenchmarkId::new(format!("cluster_{members}"), name);
            group.bench_function(id, |b| {
                b.iter(|| {
                    let mut items = batch(keys.iter().copied(), &mut bufs);
                    for result in cluster.get_into_batch(black_box(&mut items)) {
                        result.expect("read");
                    }
                })
            });
        }
        // One key no member has, alone.
        let id = BenchmarkId::new(format!("cluster_{members}"), "get_absent");
        group.bench_function(id, |b| {
            b.iter(|| {
                let found = cluster.get(black_box(&absent[0])).expect("read");
                assert!(found.is_none());
            })
        });
        if members == 3 {
            let single =
                Client::connect(nodes[0].control_addr(), ClientConfig::default()).expect("connect");
            for key in &present {
                single.put(key, &value).expect("put");
            }
            group.bench_function(BenchmarkId::new("one_node", "all_present"), |b| {
                b.iter(|| {
                    let mut items = batch(present.iter().map(Vec::as_slice), &mut bufs);
                    for result in single.get_into_batch(black_box(&mut items)) {
                        result.expect("read");
                    }
                })
            });
        }
    }
    group.finish();
}

/// A batch read's items: each key with its buffer, in order.
fn batch<'a>(
    keys: impl Iterator<Item = &'a [u8]>,
    bufs: &'a mut [Vec<u8>],
) -> Vec<(&'a [u8], &'a mut [u8])> {
    keys.zip(bufs.iter_mut().map(Vec::as_mut_slice)).collect()
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(5));
    targets = replicated_put, batch_get
}
criterion_main!(benches);
