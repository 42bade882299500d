//! The descriptor cache: a block read again within `descriptor_ttl` is read by the descriptor
//! its last lookup returned, with no lookup at all, while no write this client knows of may
//! have changed it.

use std::hash::BuildHasher;
use std::sync::atomic::Ordering;
use std::time::Duration;

use mooncake_kv_transfer::coarse_clock_ns;

use super::Client;
use crate::proto::{Descriptor, MAX_CACHED_KEYS};

/// Descriptors from recent lookups, each with the time it was asked for (on the coarse clock,
/// [`coarse_clock_ns`]: a TTL holds to within its few milliseconds). Entries are found by
/// a 64-bit hash of the key, not the key itself, and each is one cache line: a read through
/// the cache waits on one memory load before it can fetch the block's header. Two keys with
/// the same hash share an entry; a read through the other key's descriptor fails
/// verification (the block's header names its key) and looks up.
#[derive(Default)]
pub(super) struct DescriptorCache {
    entries: hashbrown::HashTable<Cached>,
    hasher: hashbrown::DefaultHashBuilder,
    /// Bumped by every put or remove of this client: a lookup that began before one may have
    /// seen the block it replaced, so its descriptor is not kept.
    writes: u64,
}

/// A cached descriptor: everything a read needs but the lease (a cached read holds none).
#[derive(Debug, Clone, Copy)]
#[repr(C, align(64))]
struct Cached {
    /// The key's hash: the entry's name in the table.
    slot: u64,
    /// When the lookup that found it was asked for (coarse clock nanoseconds).
    asked: u64,
    region_id: u64,
    remote_key: u64,
    offset: u64,
    block_len: u64,
    generation: u64,
    payload_offset: u32,
    payload_len: u32,
}

const _: () = assert!(std::mem::size_of::<Cached>() == 64);

impl Cached {
    pub(super) fn descriptor(&self) -> Descriptor {
        Descriptor {
            region_id: self.region_id,
            remote_key: self.remote_key,
            offset: self.offset,
            block_len: self.block_len,
            payload_offset: self.payload_offset,
            payload_len: self.payload_len,
            generation: self.generation,
            lease_ms: 0,
            lease_id: 0,
        }
    }
}

/// How long ago `stamp` (coarse clock nanoseconds) was.
pub(super) fn age(stamp: u64) -> Duration {
    Duration::from_nanos(coarse_clock_ns().saturating_sub(stamp))
}

impl DescriptorCache {
    pub(super) fn slot(&self, key: &[u8]) -> u64 {
        self.hasher.hash_one(key)
    }

    pub(super) fn get(&mut self, key: &[u8], ttl: Duration) -> Option<Descriptor> {
        let slot = self.slot(key);
        let entry = self.entries.find_entry(slot, |e| e.slot == slot).ok()?;
        if age(entry.get().asked) < ttl {
            return Some(entry.get().descriptor());
        }
        entry.remove();
        None
    }

    /// Keeps `descriptor`, asked for at `asked` (coarse clock nanoseconds) when this cache had
    /// seen `writes` writes.
    pub(super) fn insert(
        &mut self,
        key: &[u8],
        descriptor: &Descriptor,
        asked: u64,
        writes: u64,
        limit: usize,
        ttl: Duration,
    ) {
        if writes != self.writes || limit == 0 {
            return;
        }
        let slot = self.slot(key);
        let cached = Cached {
            slot,
            asked,
            region_id: descriptor.region_id,
            remote_key: descriptor.remote_key,
            offset: descriptor.offset,
            block_len: descriptor.block_len,
            generation: descriptor.generation,
            payload_offset: descriptor.payload_offset,
            payload_len: descriptor.payload_len,
        };
        if let Ok(mut entry) = self.entries.find_entry(slot, |e| e.slot == slot) {
            *entry.get_mut() = cached;
            return;
        }
        if self.entries.len() >= limit {
            self.entries.retain(|e| age(e.asked) < ttl);
            if self.entries.len() >= limit {
                self.entries.clear();
            }
        }
        self.entries.insert_unique(slot, cached, |e| e.slot);
    }

    pub(super) fn remove(&mut self, key: &[u8]) {
        let slot = self.slot(key);
        if let Ok(entry) = self.entries.find_entry(slot, |e| e.slot == slot) {
            entry.remove();
        }
    }

    pub(super) fn forget<'a>(&mut self, keys: impl IntoIterator<Item = &'a [u8]>) {
        self.writes += 1;
        for key in keys {
            self.remove(key);
        }
    }

    pub(super) fn forget_all(&mut self) {
        self.writes += 1;
        self.entries.clear();
    }
}

impl Client {
    /// What to hand [`remember`](Self::remember) after a lookup that starts now.
    pub(super) fn lookup_started(&self) -> (u64, u64) {
        (coarse_clock_ns(), self.descriptors.lock().writes)
    }

    /// Keeps the descriptor of a block just read and verified.
    pub(super) fn remember(&self, key: &[u8], d: &Descriptor, (asked, writes): (u64, u64)) {
        if self.caching() {
            let (limit, ttl) = (
                self.config.descriptor_cache_entries,
                self.config.descriptor_ttl,
            );
            self.descriptors
                .lock()
                .insert(key, d, asked, writes, limit, ttl);
        }
    }

    /// Drops the descriptors of keys this client is writing or removing.
    pub(super) fn forget<'a>(&self, keys: impl IntoIterator<Item = &'a [u8]>) {
        self.descriptors.lock().forget(keys);
    }

    /// The cached descriptor of `key`, if one is fresh.
    pub(super) fn cached(&self, key: &[u8]) -> Option<Descriptor> {
        if !self.caching() {
            return None;
        }
        self.descriptors.lock().get(key, self.config.descriptor_ttl)
    }

    /// A read through the cached descriptor `d` of `key`: `Some(len)` when it verified;
    /// `None` when it did not (the descriptor is dropped, and the caller looks up).
    pub(super) fn read_cached(&self, key: &[u8], d: &Descriptor, dst: &mut [u8]) -> Option<usize> {
        let len = d.payload_len as usize;
        let verified =
            dst.len() >= len && matches!(self.read_verified(key, d, &mut dst[..len]), Ok(true));
        if verified {
            self.cached_reads.fetch_add(1, Ordering::Relaxed);
            // Checked without the lock first: a reader that has not looked up for a while has
            // a full list, and its reads should not queue on it.
            if self.unreported_cached_key_count.load(Ordering::Relaxed) < MAX_CACHED_KEYS {
                let mut keys = self.unreported_cached_keys.lock();
                if keys.len() < MAX_CACHED_KEYS {
                    keys.push(key.to_vec());
                    self.unreported_cached_key_count
                        .store(keys.len(), Ordering::Relaxed);
                }
            }
            return Some(len);
        }
        self.descriptors.lock().remove(key);
        None
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use mooncake_kv_transfer::coarse_clock_ns;

    use super::DescriptorCache;
    use crate::proto::Descriptor;

    #[test]
    fn the_descriptor_cache_keeps_only_what_no_write_may_have_changed() {
        let d = Descriptor {
            region_id: 1,
            remote_key: 2,
            offset: 0,
            block_len: 129,
            payload_offset: 128,
            payload_len: 1,
            generation: 1,
            lease_ms: 0,
            lease_id: 0,
        };
        let ttl = Duration::from_secs(60);
        let limit = 8;
        let mut cache = DescriptorCache::default();
        // A lookup that began before a write of this client is not kept.
        let before = cache.writes;
        cache.forget([b"other".as_slice()]);
        cache.insert(b"k", &d, coarse_clock_ns(), before, limit, ttl);
        assert_eq!(cache.get(b"k", ttl), None);
        // One that began after is, without its lease.
        let leased = Descriptor {
            lease_id: 7,
            lease_ms: 100,
            ..d
        };
        cache.insert(b"k", &leased, coarse_clock_ns(), cache.writes, limit, ttl);
        assert_eq!(cache.get(b"k", ttl), Some(d));
        // A write of the key drops it.
        cache.forget([b"k".as_slice()]);
        assert_eq!(cache.get(b"k", ttl), None);
        // It ages out.
        let long_ago = coarse_clock_ns().saturating_sub(61_000_000_000);
        cache.insert(b"k", &d, long_ago, cache.writes, limit, ttl);
        assert_eq!(cache.get(b"k", ttl), None);
        assert!(cache.entries.is_empty());
        // Never more than the limit.
        for i in 0..100u32 {
            cache.insert(
                &i.to_le_bytes(),
                &d,
                coarse_clock_ns(),
                cache.writes,
                limit,
                ttl,
            );
            assert!(cache.entries.len() <= limit);
        }
        assert_eq!(cache.get(&99u32.to_le_bytes(), ttl), Some(d));
        cache.forget_all();
        assert!(cache.entries.is_empty());
    }
}
