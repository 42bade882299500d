//! The mooncake KVCache node, and the client side re-exported.
//!
//! A [`Node`] serves one [`Engine`](mooncake_kv_engine::Engine) to peers: a control plane over
//! TCP ([`proto`]: put, lookup, exists, prefix_match, remove, stats, health) and the engine's
//! DRAM region registered with the transfer crate, served by its tcp data plane and, for
//! clients on the same host, its shared-memory socket. [`repair`] copies blocks to the
//! replicas that lack them when the cluster changes.
//!
//! The client side ([`Client`], [`cluster`], [`placement`], [`membership`], [`proto`]) is the
//! `mooncake-kv-client` crate, re-exported here whole; an application that only talks to
//! nodes depends on that crate alone and builds no engine.
//!
//! A [`Client`] reads a block in two steps: a lookup returns a [`Descriptor`](proto::Descriptor)
//! (where the block lies, its generation, a lease that keeps it in place for a while), then a
//! one-sided read fetches the header and key into a small buffer and the payload straight into
//! the caller's. The client checks magic, key, generation and both CRCs against the
//! descriptor; a block that moved or was replaced in between fails that check and is looked
//! up again. Leases make that rare; correctness never depends on them.
//!
//! # Example
//!
//! ```
//! use mooncake_kv_replication::{Client, ClientConfig, Node, NodeConfig};
//! use mooncake_kv_engine::EngineConfig;
//!
//! let node = Node::start(NodeConfig {
//!     listen: "127.0.0.1:0".into(),
//!     data_listen: "127.0.0.1:0".into(),
//!     engine: EngineConfig { dram_capacity_bytes: 16 << 20, ..EngineConfig::default() },
//!     ..NodeConfig::default()
//! })?;
//! let client = Client::connect(node.control_addr(), ClientConfig::default())?;
//! client.put(b"block-0", &[7u8; 65536])?;
//! assert_eq!(client.get(b"block-0")?.as_deref(), Some(&[7u8; 65536][..]));
//! assert_eq!(client.prefix_match(&[b"block-0", b"block-1"])?, 1);
//! let mut kv_page = vec![0u8; 65536];
//! assert_eq!(client.get_into(b"block-0", &mut kv_page)?, Some(65536));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

mod metrics;
mod node;
mod region;
pub mod repair;

/// The client side lives in its own crate, so that an application links it without the
/// server; re-exported here whole.
pub use mooncake_kv_client::{
    ChainEnd, Client, ClientConfig, ClientError, TransportChoice, cluster, membership, placement,
    proto,
};
pub use node::{Node, NodeConfig, NodeError, NodeMetrics};
