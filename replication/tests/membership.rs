//! The static membership backend against real nodes on 127.0.0.1: everyone live, a stopped
//! node suspected then dead, a node started again at the same address live again as a new
//! member whose placement weight ramps up from the floor.

use std::time::{Duration, Instant};

use mooncake_kv_engine::EngineConfig;
use mooncake_kv_replication::membership::{Liveness, Membership, StaticConfig, StaticMembership};
use mooncake_kv_replication::placement::{self, JOIN_FLOOR};
use mooncake_kv_replication::{Node, NodeConfig};

fn node(listen: &str) -> Node {
    Node::start(NodeConfig {
        listen: listen.into(),
        data_listen: "127.0.0.1:0".into(),
        engine: EngineConfig {
            dram_capacity_bytes: 4 << 20,
            ..EngineConfig::default()
        },
        ..NodeConfig::default()
    })
    .expect("start a node")
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn members_are_suspected_declared_dead_and_rejoin() {
    let nodes: Vec<Node> = (0..3).map(|_| node("127.0.0.1:0")).collect();
    let addrs: Vec<_> = nodes.iter().map(Node::control_addr).collect();
    let membership = StaticMembership::start(StaticConfig {
        peers: addrs.clone(),
        heartbeat: Duration::from_millis(50),
        suspect_after: Duration::from_millis(300),
        dead_after: Duration::from_millis(800),
        token: None,
        ..StaticConfig::default()
    })
    .unwrap();
    wait_for("three live members", || {
        membership.live_members().len() == 3
    });
    let view = membership.view();
    assert!(
        view.iter()
            .all(|p| p.liveness == Liveness::Live && p.id.is_some())
    );
    let ids: Vec<u64> = view.iter().map(|p| p.id.unwrap()).collect();
    assert_eq!(
        ids.iter().collect::<std::collections::HashSet<_>>().len(),
        3,
        "distinct ids"
    );
    let replicas = placement::replicas(b"k", &membership.live_members(), 2);
    assert_eq!(replicas.len(), 2);

    // Stop the third node: suspected, then dead, then out of placement.
    let mut nodes = nodes;
    let third = nodes.pop().unwrap();
    third.shutdown(Duration::from_secs(1)).unwrap();
    wait_for("the stopped node suspected", || {
        membership.view()[2].liveness == Liveness::Suspect
    });
    wait_for("the stopped node dead", || {
        membership.view()[2].liveness == Liveness::Dead
    });
    let live = membership.live_members();
    assert_eq!(live.len(), 2);
    assert!(live.iter().all(|m| m.id != ids[2]));

    // Start a node again at the same address: live again, as a new member, ramping up.
    let again = node(&addrs[2].to_string());
    wait_for("the node back", || membership.live_members().len() == 3);
    let view = membership.view();
    assert_ne!(
        view[2].id,
        Some(ids[2]),
        "an empty node comes back as a new member"
    );
    let rejoined = membership
        .live_members()
        .into_iter()
        .find(|m| Some(m.id) == view[2].id)
        .unwrap();
    assert!(
        rejoined.weight < 0.1 && rejoined.weight >= JOIN_FLOOR,
        "a rejoining member starts light: {}",
        rejoined.weight
    );
    drop(again);
}
