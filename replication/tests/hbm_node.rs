//! A node embedded in a process whose engine has an HBM tier, on the host test device (host
//! memory posing as a GPU): `stats` names each tier, fastest first, with its own figures;
//! blocks the process puts through its engine land in HBM, and a peer reads them exactly
//! over every transport, shared memory included (its reader reaches only DRAM, so the lookup
//! brings the block there); blocks put over the network land in DRAM, where the transports
//! read them.

use std::sync::Arc;

use mooncake_kv_engine::{EngineConfig, HbmSettings, HostTestDevice};
use mooncake_kv_replication::{Client, ClientConfig, Node, NodeConfig, TransportChoice};

const BLOCK: usize = 64 << 10;

fn value(i: usize) -> Vec<u8> {
    (0..BLOCK).map(|j| (i * 131 + j * 7) as u8).collect()
}

fn key(i: usize) -> Vec<u8> {
    format!("hbm-node-{i}").into_bytes()
}

#[test]
fn a_node_with_hbm_names_its_tiers_and_serves_hbm_blocks_on_every_transport() {
    let dir = tempfile::tempdir().unwrap();
    let node = Node::start_with_device(
        NodeConfig {
            listen: "127.0.0.1:0".into(),
            data_listen: "127.0.0.1:0".into(),
            shm_path: Some(dir.path().join("kvd.sock")),
            engine: EngineConfig {
                dram_capacity_bytes: 8 << 20,
                hbm: Some(HbmSettings {
                    capacity_bytes: 4 << 20,
                    ..HbmSettings::default()
                }),
                ..EngineConfig::default()
            },
            ..NodeConfig::default()
        },
        Arc::new(HostTestDevice::new(64 << 20)),
    )
    .expect("start a node");
    let connect = |transport| {
        Client::connect(
            node.control_addr(),
            ClientConfig {
                transport,
                ..ClientConfig::default()
            },
        )
        .expect("connect")
    };
    // The process's own puts: into HBM.
    for i in 0..10 {
        node.engine().put(&key(i), &value(i)).expect("local put");
    }
    // A peer's puts: received straight into DRAM.
    let tcp = connect(TransportChoice::Tcp);
    for i in 10..20 {
        tcp.put(&key(i), &value(i)).expect("put");
    }

    let stats = tcp.stats().expect("stats");
    let names: Vec<&str> = stats.tiers.iter().map(|t| t.tier.as_str()).collect();
    assert_eq!(names, ["hbm", "dram"], "{stats:?}");
    let (hbm, dram) = (&stats.tiers[0], &stats.tiers[1]);
    assert_eq!((hbm.blocks, dram.blocks), (10, 10), "{stats:?}");
    assert_eq!(hbm.capacity_bytes, 4 << 20);
    assert_eq!(dram.capacity_bytes, 8 << 20);

    let shm = connect(TransportChoice::Shm);
    for i in 0..20 {
        assert_eq!(tcp.get(&key(i)).expect("tcp get"), Some(value(i)), "{i}");
        assert_eq!(shm.get(&key(i)).expect("shm get"), Some(value(i)), "{i}");
    }
    let stats = tcp.stats().expect("stats");
    assert_eq!(
        stats.tiers[1].blocks, 20,
        "each HBM block was brought into DRAM: {stats:?}"
    );
}
