//! Two-phase puts against a node in this process: reserve, commit (with the payload over
//! tcp), abort, and a reservation reclaimed when its commit never comes.

use std::time::Duration;

use mooncake_kv_engine::EngineConfig;
use mooncake_kv_replication::proto::{ErrorCode, ErrorReply};
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

fn single_connection_client(node: &Node) -> Client {
    Client::connect(
        node.control_addr(),
        ClientConfig {
            connections: 1,
            ..ClientConfig::default()
        },
    )
    .unwrap()
}

/// Reserves 1 MiB blocks on `client` until refused; the reservations and the refusal.
fn reserve_until_refused(
    client: &Client,
    prefix: &str,
) -> (
    Vec<mooncake_kv_replication::proto::ReservedReply>,
    ErrorReply,
) {
    let mut held = Vec::new();
    loop {
        match client.reserve(format!("{prefix}-{}", held.len()).as_bytes(), 1 << 20) {
            Ok(reserved) => held.push(reserved),
            Err(ClientError::Refused(reply)) => return (held, reply),
            Err(other) => panic!("expected a refusal, got {other:?}"),
        }
        assert!(held.len() < 64, "never refused");
    }
}

#[test]
fn one_connection_cannot_hold_the_tier_in_reservations() {
    let node = Node::start(NodeConfig {
        listen: "127.0.0.1:0".into(),
        data_listen: "127.0.0.1:0".into(),
        reservation_timeout: Duration::from_secs(60),
        engine: EngineConfig {
            dram_capacity_bytes: 32 << 20,
            ..EngineConfig::default()
        },
        ..NodeConfig::default()
    })
    .unwrap();
    // A quarter of the tier: 8 MiB, so at most 7 reservations of 1 MiB and a header each.
    let hog = single_connection_client(&node);
    let (held, refusal) = reserve_until_refused(&hog, "hog");
    assert_eq!(refusal.code, ErrorCode::NoSpace);
    assert!(refusal.message.contains("budget"), "{}", refusal.message);
    assert!((6..=8).contains(&held.len()), "{} held", held.len());
    // Another client still puts.
    let other = single_connection_client(&node);
    other.put(b"other", &vec![1u8; 1 << 20]).unwrap();
    // Enough connections together fill the tier; a put that finds no space then says what
    // the reservations hold.
    let mut hogs = vec![hog];
    for i in 0..8 {
        let hog = single_connection_client(&node);
        let (_, refusal) = reserve_until_refused(&hog, &format!("hog{i}"));
        hogs.push(hog);
        if !refusal.message.contains("budget") {
            break;
        }
    }
    match other.put(b"no room", &vec![2u8; 2 << 20]) {
        Err(ClientError::Refused(reply)) => {
            assert_eq!(reply.code, ErrorCode::NoSpace);
            assert!(
                reply.message.contains("open reservations hold"),
                "{}",
                reply.message
            );
        }
        other => panic!("expected NoSpace, got {other:?}"),
    }
    // Aborting gives the space back at once.
    for reserved in &held {
        hogs[0].abort(reserved).unwrap();
    }
    other.put(b"room again", &vec![3u8; 2 << 20]).unwrap();
}
