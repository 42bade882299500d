//! Admission on a node in this process, probed over real sockets as a hostile or unlucky
//! client would: connections that never authenticate, that stall in the middle of a frame,
//! that announce a huge Hello, and quiet data-plane connections, none of which may lock out a
//! legitimate client.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use mooncake_kv_engine::EngineConfig;
use mooncake_kv_replication::proto::{
    ErrorCode, FrameHeader, Request, Response, decode_response, encode_body, read_frame,
    write_frame,
};
use mooncake_kv_replication::{
    Client, ClientConfig, ClientError, Node, NodeConfig, TransportChoice,
};

const TOKEN: &[u8] = b"let me in";

fn node(config: NodeConfig) -> Node {
    Node::start(NodeConfig {
        listen: "127.0.0.1:0".into(),
        data_listen: "127.0.0.1:0".into(),
        token: Some(TOKEN.to_vec()),
        engine: EngineConfig {
            dram_capacity_bytes: 16 << 20,
            ..EngineConfig::default()
        },
        ..config
    })
    .expect("start a node")
}

fn client(node: &Node, transport: TransportChoice) -> Result<Client, ClientError> {
    Client::connect(
        node.control_addr(),
        ClientConfig {
            token: Some(TOKEN.to_vec()),
            transport,
            timeout: Duration::from_secs(5),
            connections: 1,
            ..ClientConfig::default()
        },
    )
}

/// Reads until the peer closes; the time it took. Panics if it sends anything but a close
/// within `limit`.
fn closed_within(stream: &mut TcpStream, limit: Duration) -> Duration {
    let started = Instant::now();
    stream.set_read_timeout(Some(limit)).unwrap();
    let mut sink = Vec::new();
    match stream.read_to_end(&mut sink) {
        Ok(_) => started.elapsed(),
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => started.elapsed(),
        Err(e) => panic!("not closed within {limit:?}: {e}"),
    }
}

fn quiet(addr: SocketAddr, n: usize) -> Vec<TcpStream> {
    (0..n).map(|_| TcpStream::connect(addr).unwrap()).collect()
}

#[test]
fn connections_that_have_not_authenticated_never_take_an_authenticated_place() {
    let node = node(NodeConfig {
        max_connections: 4,
        max_unauthenticated: 8,
        hello_timeout: Duration::from_secs(60),
        ..NodeConfig::default()
    });
    let idle = quiet(node.control_addr(), 40);
    // Four legitimate clients, each served at once, while the quiet sockets are held.
    let clients: Vec<Client> = (0..4)
        .map(|i| {
            let c = client(&node, TransportChoice::Tcp).expect("a legitimate client is served");
            c.put(format!("k{i}").as_bytes(), b"value").unwrap();
            c
        })
        .collect();
    assert_eq!(
        clients[3].get(b"k0").unwrap().as_deref(),
        Some(&b"value"[..])
    );
    let stats = clients[0].stats().unwrap();
    assert_eq!(stats.connections, 4);
    // 32 of the quiet ones gave way as the flood came in, one more for the first client;
    // the other clients found a place free (the first had authenticated).
    assert_eq!(stats.admission.unauthenticated, 7, "{:?}", stats.admission);
    assert_eq!(stats.admission.refused, 33, "{:?}", stats.admission);
    let metrics = node.metrics_text();
    assert!(
        metrics.contains("mooncake_unauthenticated_connections 7"),
        "{metrics}"
    );
    // A fifth authenticated connection is past the limit: refused as busy, not hung.
    match client(&node, TransportChoice::Tcp) {
        Err(ClientError::Refused(reply)) => {
            assert_eq!(reply.code, ErrorCode::Busy, "{}", reply.message);
        }
        other => panic!("expected Busy, got {other:?}"),
    }
    drop(idle);
    drop(clients);
}

#[test]
fn connections_that_do_not_authenticate_in_time_are_closed_however_they_trickle() {
    let node = node(NodeConfig {
        hello_timeout: Duration::from_millis(300),
        ..NodeConfig::default()
    });
    let addr = node.control_addr();
    let mut silent = TcpStream::connect(addr).unwrap();
    let mut half = TcpStream::connect(addr).unwrap();
    let hello = encode_body(&Request::Hello { token: TOKEN });
    let mut frame = Vec::new();
    write_frame(&mut frame, 1, &hello).unwrap();
    half.write_all(&frame[..16]).unwrap();
    // One byte every 100 ms: each read of the node ends well inside any read timeout.
    let trickler = {
        let mut stream = TcpStream::connect(addr).unwrap();
        let frame = frame.clone();
        std::thread::spawn(move || {
            let started = Instant::now();
            for byte in &frame {
                if stream.write_all(std::slice::from_ref(byte)).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(100));
            }
            (started.elapsed(), stream)
        })
    };
    let limit = Duration::from_secs(3);
    assert!(closed_within(&mut silent, limit) < limit);
    assert!(closed_within(&mut half, limit) < limit);
    let (took, mut stream) = trickler.join().unwrap();
    assert!(
        took < Duration::from_secs(3),
        "the node kept reading the trickle for {took:?}"
    );
    closed_within(&mut stream, limit);
    let c = client(&node, TransportChoice::Tcp).unwrap();
    let admission = c.stats().unwrap().admission;
    assert_eq!(admission.hello_timeouts, 3, "{admission:?}");
    assert_eq!(admission.unauthenticated, 0, "{admission:?}");
}

#[test]
fn a_hello_larger_than_a_few_kib_is_refused_from_its_header() {
    let node = node(NodeConfig::default());
    let mut s = TcpStream::connect(node.control_addr()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    // Announce 48 MiB and send none of it: refused at once, before any of it is awaited.
    let header = FrameHeader {
        request_id: 1,
        body_len: 48 << 20,
        body_crc32: 0,
    };
    s.write_all(&header.encode()).unwrap();
    let mut body = Vec::new();
    read_frame(&mut s, &mut body).unwrap().expect("an answer");
    match decode_response(&body).unwrap() {
        Response::Error(reply) => {
            assert_eq!(reply.code, ErrorCode::BadRequest);
            assert!(reply.message.contains("before Hello"), "{}", reply.message);
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    closed_within(&mut s, Duration::from_secs(5));
    // A token of a few KiB still fits.
    let long = Node::start(NodeConfig {
        listen: "127.0.0.1:0".into(),
        data_listen: "127.0.0.1:0".into(),
        token: Some(vec![b'x'; 4000]),
        ..NodeConfig::default()
    })
    .unwrap();
    Client::connect(
        long.control_addr(),
        ClientConfig {
            token: Some(vec![b'x'; 4000]),
            ..ClientConfig::default()
        },
    )
    .expect("a 4,000-byte token is read");
}

#[test]
fn quiet_data_plane_connections_make_room_for_readers() {
    // The node serves 1,024 data-plane connections; the flood takes 1,100 and each takes
    // two descriptors on the node's side, in this same process.
    mooncake_kv_test_support::raise_open_file_limit(8192);
    let node = node(NodeConfig::default());
    let reader = client(&node, TransportChoice::Tcp).unwrap();
    let writer = ClientConfig {
        token: Some(TOKEN.to_vec()),
        transport: TransportChoice::Tcp,
        inline_tcp_reads: false,
        ..ClientConfig::default()
    };
    let one_sided = Client::connect(node.control_addr(), writer).unwrap();
    let value: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    reader.put(b"block", &value).unwrap();
    // A one-sided read opens its data-plane connection, which then stays in the pool.
    assert_eq!(
        one_sided.get(b"block").unwrap().as_deref(),
        Some(&value[..])
    );
    let flood = quiet(node.data_addr(), 1_100);
    // The reader's pooled connection was the quietest and gave way; it reconnects, and the
    // read succeeds, as does one from a client that was not connected before the flood.
    assert_eq!(
        one_sided.get(b"block").unwrap().as_deref(),
        Some(&value[..])
    );
    let late = Client::connect(
        node.control_addr(),
        ClientConfig {
            token: Some(TOKEN.to_vec()),
            transport: TransportChoice::Tcp,
            inline_tcp_reads: false,
            ..ClientConfig::default()
        },
    )
    .unwrap();
    assert_eq!(late.get(b"block").unwrap().as_deref(), Some(&value[..]));
    drop(flood);
}
