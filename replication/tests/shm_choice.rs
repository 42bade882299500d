//! Which data path a client takes on the node's host, and why not shared memory when it
//! cannot be used.

use mooncake_kv_replication::{
    Client, ClientConfig, ClientError, Node, NodeConfig, TransportChoice,
};

fn connect(node: &Node, transport: TransportChoice) -> Result<Client, ClientError> {
    Client::connect(
        node.control_addr(),
        ClientConfig {
            transport,
            ..ClientConfig::default()
        },
    )
}

#[test]
fn a_client_that_cannot_use_the_offered_socket_says_why() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("kvd.sock");
    let node = Node::start(NodeConfig {
        listen: "127.0.0.1:0".into(),
        data_listen: "127.0.0.1:0".into(),
        shm_path: Some(socket.clone()),
        ..NodeConfig::default()
    })
    .unwrap();
    let usable = connect(&node, TransportChoice::Auto).unwrap();
    assert_eq!(usable.transport_name(), "shm");
    assert_eq!(usable.shm_unavailable(), None);
    drop(usable);

    // The socket the node advertises is gone (as when it is another node's path, or the
    // directory is not visible from here).
    std::fs::remove_file(&socket).unwrap();
    let fallback = connect(&node, TransportChoice::Auto).unwrap();
    assert_eq!(fallback.transport_name(), "tcp");
    let why = fallback.shm_unavailable().expect("a reason");
    assert!(
        why.contains(socket.to_str().unwrap()),
        "names the socket: {why}"
    );
    fallback.put(b"k", b"still served").unwrap();
    assert_eq!(
        fallback.get(b"k").unwrap().as_deref(),
        Some(&b"still served"[..])
    );
    drop(fallback);
    match connect(&node, TransportChoice::Shm) {
        Err(error @ ClientError::NoSharedMemory(_)) => {
            let text = error.to_string();
            assert!(text.contains(socket.to_str().unwrap()), "{text}");
        }
        other => panic!("expected NoSharedMemory, got {other:?}"),
    }
    let tcp = connect(&node, TransportChoice::Tcp).unwrap();
    assert_eq!(tcp.shm_unavailable(), None, "not asked for");
}

#[test]
fn a_node_without_a_socket_is_read_over_tcp_and_says_so() {
    let node = Node::start(NodeConfig {
        listen: "127.0.0.1:0".into(),
        data_listen: "127.0.0.1:0".into(),
        ..NodeConfig::default()
    })
    .unwrap();
    let client = connect(&node, TransportChoice::Auto).unwrap();
    assert_eq!(client.transport_name(), "tcp");
    assert!(
        client
            .shm_unavailable()
            .is_some_and(|why| why.contains("offers no")),
        "{:?}",
        client.shm_unavailable()
    );
}
