//! Two-phase puts against a node in this process: reserve, commit (with the payload over
//! tcp), abort, and a reservation reclaimed when its commit never comes.

use std::time::Duration;

use mooncake_kv_engine::EngineConfig;
use mooncake_kv_replication::proto::ErrorCode;
use mooncake_kv_replication::{Client, ClientConfig, ClientError, Node, NodeConfig};

fn node() -> Node {
    Node::start(NodeConfig {
        listen: "127.0.0.1:0".into(),
        data_listen: "127.0.0.1:0".into(),
        reservation_timeout: Duration::from_millis(200),
        engine: EngineConfig {
            dram_capacity_bytes: 32 << 20,
            ..EngineConfig::default()
        },
        ..NodeConfig::default()
    })
    .expect("start a node")
}

fn dram_used(client: &Client) -> u64 {
    client.stats().expect("stats").tiers[0].used_bytes
}

#[test]
fn reserve_then_commit_makes_the_block_and_nothing_before() {
    let node = node();
    let client = Client::connect(node.control_addr(), ClientConfig::default()).unwrap();
    let value: Vec<u8> = (0..300_000u32).map(|i| (i % 253) as u8).collect();
    let reserved = client.reserve(b"two-phase", value.len() as u32).unwrap();
    assert_eq!(reserved.region_id, client.hello().region_id);
    assert!(reserved.offset + u64::from(reserved.len) <= client.hello().region_len);
    assert_eq!(
        client.get(b"two-phase").unwrap(),
        None,
        "invisible before the commit"
    );
    // A payload of the wrong length is refused, and that uses the reservation up.
    match client.commit(&reserved, Some(&value[1..]), false) {
        Err(ClientError::Refused(reply)) => assert_eq!(reply.code, ErrorCode::BadRequest),
        other => panic!("expected a refusal, got {other:?}"),
    }
    let reserved = client.reserve(b"two-phase", value.len() as u32).unwrap();
    let generation = client.commit(&reserved, Some(&value), false).unwrap();
    assert_eq!(
        client.get(b"two-phase").unwrap().as_deref(),
        Some(&value[..])
    );
    assert!(generation > 0);
    // A reservation is committed once.
    assert!(client.commit(&reserved, Some(&value), false).is_err());
}

#[test]
fn abandoned_reservations_give_their_space_back() {
    let node = node();
    let client = Client::connect(node.control_addr(), ClientConfig::default()).unwrap();
    let before = dram_used(&client);
    let aborted = client.reserve(b"a", 1 << 20).unwrap();
    assert!(dram_used(&client) > before);
    assert!(client.abort(&aborted).unwrap());
    assert!(
        !client.abort(&aborted).unwrap(),
        "a second abort finds nothing"
    );
    assert_eq!(dram_used(&client), before);

    let forgotten = client.reserve(b"b", 1 << 20).unwrap();
    assert!(dram_used(&client) > before);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(dram_used(&client), before, "reclaimed after the timeout");
    match client.commit(&forgotten, Some(&vec![0; 1 << 20]), false) {
        Err(ClientError::Refused(reply)) => assert_eq!(reply.code, ErrorCode::BadRequest),
        other => panic!("expected a refusal, got {other:?}"),
    }
    assert!(!client.exists(&[b"b"]).unwrap()[0]);
    // Oversize reservations are refused like oversize puts.
    match client.reserve(b"huge", u32::MAX) {
        Err(ClientError::Refused(reply)) => assert_eq!(reply.code, ErrorCode::TooLarge),
        other => panic!("expected TooLarge, got {other:?}"),
    }
}

/// A client that connects and then sends nothing, or stops in the middle of a frame, loses
/// its connection after the idle timeout: it does not hold a connection thread for good.
/// Clients that keep talking are not affected, and one whose pooled connection was closed
/// reconnects on its next request.
#[test]
fn stalled_connections_are_closed_after_the_idle_timeout() {
    use std::io::{Read, Write};
    let node = Node::start(NodeConfig {
        listen: "127.0.0.1:0".into(),
        data_listen: "127.0.0.1:0".into(),
        idle_timeout: Duration::from_millis(300),
        engine: EngineConfig {
            dram_capacity_bytes: 16 << 20,
            ..EngineConfig::default()
        },
        ..NodeConfig::default()
    })
    .unwrap();
    let mut silent = std::net::TcpStream::connect(node.control_addr()).unwrap();
    let mut half = std::net::TcpStream::connect(node.control_addr()).unwrap();
    half.write_all(b"MKCP\x01\x00").unwrap(); // the start of a header, then nothing
    let client = Client::connect(node.control_addr(), ClientConfig::default()).unwrap();
    let started = std::time::Instant::now();
    for stream in [&mut silent, &mut half] {
        stream
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut byte = [0u8; 1];
        // The node closes it: end of stream (or a reset), not our own 5 s timeout.
        match stream.read(&mut byte) {
            Ok(0) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
            other => panic!("expected the node to close the connection, got {other:?}"),
        }
    }
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(250), "{waited:?}");
    assert!(waited < Duration::from_secs(4), "{waited:?}");
    // The idle client's own connection was closed too; its next request reconnects.
    client.put(b"after", b"idle").unwrap();
    assert_eq!(client.get(b"after").unwrap().as_deref(), Some(&b"idle"[..]));
}
