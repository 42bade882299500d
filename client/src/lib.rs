//! The mooncake KVCache client: what an application links to talk to `mooncake-kvd` nodes,
//! with no server in it (no engine, no RocksDB, no C++ to build).
//!
//! - [`Client`]: one node. A read is a lookup that returns a [`Descriptor`](proto::Descriptor)
//!   (where the block lies, its generation, a lease that keeps it in place for a while), then
//!   a one-sided read of the header and key into a small buffer and of the payload straight
//!   into the caller's, then verification of magic, key, generation and both CRCs against
//!   the descriptor; a block that moved or was replaced in between fails that check and is
//!   looked up again.
//! - [`cluster::ClusterClient`]: many nodes. Each key's replicas are placed by weighted
//!   rendezvous hashing ([`placement`]) over the live members ([`membership`]: a static list
//!   with heartbeats, or etcd registrations with the `etcd` feature); puts are acknowledged
//!   by a quorum, reads fail over.
//! - [`proto`]: the control protocol's frames, byte for byte in `docs/format.md`.
//!
//! It is not the node: serving an engine to peers, repair and the metrics endpoint are the
//! replication crate's (`mooncake-kv-replication`), which re-exports all of this.
//!
//! # Example
//!
//! ```no_run
//! use mooncake_kv_client::{Client, ClientConfig};
//!
//! let client = Client::connect("127.0.0.1:7700", ClientConfig::default())?;
//! client.put(b"block-0", &[7u8; 65536])?;
//! let mut kv_page = vec![0u8; 65536];
//! assert_eq!(client.get_into(b"block-0", &mut kv_page)?, Some(65536));
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Limits
//!
//! Keys and values as the block format allows (`MAX_KEY_BYTES`, `MAX_VALUE_BYTES`); control
//! frames are bounded as `proto` says; every wait on a node has a timeout
//! ([`ClientConfig`]).

mod client;
pub mod cluster;
pub mod membership;
pub mod placement;
pub mod proto;

pub use client::{Client, ClientConfig, ClientError, TransportChoice};
pub use mooncake_kv_format::ChainEnd;
