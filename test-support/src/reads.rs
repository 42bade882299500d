//! A reader that keeps reading every key through a cluster client while a test stops or
//! kills nodes, and counts what came back.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use mooncake_kv_client::cluster::ClusterClient;

/// What the reads came back with.
#[derive(Debug, Default)]
pub struct ReadTally {
    reads: AtomicU64,
    errors: AtomicU64,
    misses: AtomicU64,
    wrong: AtomicU64,
}

impl ReadTally {
    /// Reads `key(i)` for `i` in `0..keys`, round and round, until `stop`; each value must be
    /// `value(i)`.
    pub fn read_until(
        &self,
        cluster: &ClusterClient,
        stop: &AtomicBool,
        keys: u64,
        key: impl Fn(u64) -> String,
        value: impl Fn(u64) -> Vec<u8>,
    ) {
        let mut i = 0;
        while !stop.load(Ordering::Relaxed) {
            let counter = match cluster.get(key(i).as_bytes()) {
                Ok(Some(v)) if v == value(i) => None,
                Ok(Some(_)) => Some(&self.wrong),
                Ok(None) => Some(&self.misses),
                Err(e) => {
                    eprintln!("read error: {e}");
                    Some(&self.errors)
                }
            };
            if let Some(counter) = counter {
                counter.fetch_add(1, Ordering::Relaxed);
            }
            self.reads.fetch_add(1, Ordering::Relaxed);
            i = (i + 1) % keys;
        }
    }

    /// Reads, errors, misses and wrong values so far.
    pub fn counts(&self) -> (u64, u64, u64, u64) {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        (
            load(&self.reads),
            load(&self.errors),
            load(&self.misses),
            load(&self.wrong),
        )
    }
}
