//! Prefix chains put over the control protocol (`Client::put_chain`): the node links the
//! blocks as the engine's `put_chain_with` does, so its prefix-aware eviction keeps what stays
//! of a chain a prefix, and lets unused partial last blocks go first; a chain the client says
//! is over (`Client::end_chain`) goes before everything else.

use mooncake_kv_engine::{ChainEnd, EngineConfig, EvictionPolicyKind};
use mooncake_kv_replication::{Client, ClientConfig, Node, NodeConfig};

const BLOCK: usize = 64 << 10;

/// A node whose DRAM holds about 62 blocks of 64 KiB and evicts only what a put needs.
fn node() -> Node {
    Node::start(NodeConfig {
        listen: "127.0.0.1:0".into(),
        data_listen: "127.0.0.1:0".into(),
        engine: EngineConfig {
            dram_capacity_bytes: 4 << 20,
            high_watermark_percent: 100,
            low_watermark_percent: 99,
            eviction_policy: EvictionPolicyKind::PrefixAware,
            ..EngineConfig::default()
        },
        ..NodeConfig::default()
    })
    .expect("start a node")
}

fn chain_keys(chain: usize, blocks: usize) -> Vec<Vec<u8>> {
    (0..blocks)
        .map(|b| format!("c{chain}-b{b}").into_bytes())
        .collect()
}

fn put_chain(client: &Client, parent: Option<&[u8]>, keys: &[Vec<u8>], end: ChainEnd) {
    let value = vec![3u8; BLOCK];
    let items: Vec<(&[u8], &[u8])> = keys
        .iter()
        .map(|k| (k.as_slice(), value.as_slice()))
        .collect();
    for outcome in client.put_chain(parent, &items, end, false).expect("put") {
        outcome.expect("each block stored");
    }
}

fn present(client: &Client, keys: &[Vec<u8>]) -> Vec<bool> {
    let refs: Vec<&[u8]> = keys.iter().map(Vec::as_slice).collect();
    client.exists(&refs).expect("exists")
}

#[test]
fn a_chain_put_over_the_network_loses_its_tail_before_its_head() {
    let node = node();
    let client = Client::connect(node.control_addr(), ClientConfig::default()).unwrap();
    // 40 chains of 8 blocks, each put in two requests (the second names the first's last
    // block as its parent): about five times what DRAM holds.
    for chain in 0..40 {
        let keys = chain_keys(chain, 8);
        put_chain(&client, None, &keys[..4], ChainEnd::Full);
        put_chain(&client, Some(&keys[3]), &keys[4..], ChainEnd::Full);
        for c in 0..=chain {
            let present = present(&client, &chain_keys(c, 8));
            let held = present.iter().take_while(|&&p| p).count();
            assert!(
                present[held..].iter().all(|&p| !p),
                "chain {c} after putting chain {chain}: {present:?}"
            );
        }
    }
    assert!(client.stats().unwrap().tiers[0].evictions > 200);
    let last = chain_keys(39, 8);
    let refs: Vec<&[u8]> = last.iter().map(Vec::as_slice).collect();
    assert_eq!(client.prefix_match(&refs).unwrap(), 8);
}

#[test]
fn a_partial_last_block_put_over_the_network_goes_first() {
    let node = node();
    let client = Client::connect(node.control_addr(), ClientConfig::default()).unwrap();
    // 8 chains of 5 full blocks, then 20 prompts of one partial block: 60 blocks. Without
    // the hint, the old, deep tails of the first chains would go first.
    for chain in 0..8 {
        put_chain(&client, None, &chain_keys(chain, 5), ChainEnd::Full);
    }
    for chain in 8..28 {
        put_chain(&client, None, &chain_keys(chain, 1), ChainEnd::Partial);
    }
    assert_eq!(client.stats().unwrap().tiers[0].evictions, 0);
    put_chain(&client, None, &chain_keys(28, 8), ChainEnd::Full);
    let evictions = client.stats().unwrap().tiers[0].evictions as usize;
    assert!((1..20).contains(&evictions), "{evictions} evictions");
    for chain in 0..8 {
        assert_eq!(
            present(&client, &chain_keys(chain, 5)),
            vec![true; 5],
            "chain {chain}"
        );
    }
    let gone: Vec<usize> = (8..28)
        .filter(|&chain| !present(&client, &chain_keys(chain, 1))[0])
        .collect();
    assert_eq!(gone, (8..8 + evictions).collect::<Vec<_>>());
}

#[test]
fn a_chain_ended_over_the_network_goes_first() {
    let node = node();
    let client = Client::connect(node.control_addr(), ClientConfig::default()).unwrap();
    // A shared head, then 12 conversations of 5 blocks under it: 61 blocks, no eviction.
    let head = b"system-prompt".to_vec();
    put_chain(&client, None, std::slice::from_ref(&head), ChainEnd::Full);
    for conversation in 0..12 {
        put_chain(
            &client,
            Some(&head),
            &chain_keys(conversation, 5),
            ChainEnd::Full,
        );
    }
    assert_eq!(client.stats().unwrap().tiers[0].evictions, 0);
    // The newest conversation is over; the client names its whole chain.
    let ended: Vec<Vec<u8>> = std::iter::once(head.clone())
        .chain(chain_keys(11, 5))
        .collect();
    let refs: Vec<&[u8]> = ended.iter().map(Vec::as_slice).collect();
    assert!(client.end_chain(&refs).unwrap());
    assert!(!client.end_chain(&[b"never-put".as_slice()]).unwrap());
    // Without the hint, the oldest conversation's tail would make room.
    put_chain(&client, Some(&head), &chain_keys(12, 5), ChainEnd::Full);
    let evictions = client.stats().unwrap().tiers[0].evictions as usize;
    assert!((1..=5).contains(&evictions), "{evictions} evictions");
    assert!(
        present(&client, std::slice::from_ref(&head))[0],
        "the shared head went"
    );
    for conversation in (0..11).chain([12]) {
        assert_eq!(
            present(&client, &chain_keys(conversation, 5)),
            vec![true; 5],
            "conversation {conversation}"
        );
    }
    let mut expected = vec![true; 5];
    expected[5 - evictions..].fill(false);
    assert_eq!(present(&client, &chain_keys(11, 5)), expected);
}
