use super::cache::DescriptorCache;
use super::reads::{check_descriptor, verify_with_crc};
use super::*;
use crate::proto::Descriptor;
use mooncake_kv_format as format;
use mooncake_kv_transfer::coarse_clock_ns;

fn verify(key: &[u8], d: &Descriptor, head: &[u8], payload: &[u8]) -> bool {
    verify_with_crc(key, d, head, crc32fast::hash(payload))
}

fn block(key: &[u8], payload: &[u8], generation: u64) -> (Descriptor, Vec<u8>) {
    let len = format::encoded_len(key.len(), payload.len(), 64);
    let mut bytes = vec![0u8; len];
    format::encode_into(&mut bytes, key, payload, generation, 64).unwrap();
    let header = format::decode_header(&bytes).unwrap();
    let d = Descriptor {
        region_id: 1,
        remote_key: 2,
        offset: 0,
        block_len: len as u64,
        payload_offset: header.payload_offset,
        payload_len: header.payload_len,
        generation,
        lease_ms: 0,
        lease_id: 0,
    };
    (d, bytes)
}

#[test]
fn verification_accepts_the_block_and_nothing_else() {
    let (d, bytes) = block(b"key", &[5u8; 3000], 9);
    let split = d.payload_offset as usize;
    let (head, payload) = bytes.split_at(split);
    assert!(verify(b"key", &d, head, payload));
    // Another key, another generation, a torn payload, a torn header.
    assert!(!verify(b"kez", &d, head, payload));
    assert!(!verify(
        b"key",
        &Descriptor {
            generation: 10,
            ..d
        },
        head,
        payload
    ));
    let mut torn = payload.to_vec();
    torn[1234] ^= 1;
    assert!(!verify(b"key", &d, head, &torn));
    let mut bad_head = head.to_vec();
    bad_head[70] ^= 1;
    assert!(!verify(b"key", &d, &bad_head, payload));
    // A reused slot: another block of the same length at the same place.
    let (_, other) = block(b"key", &[6u8; 3000], 11);
    let (other_head, other_payload) = other.split_at(split);
    assert!(!verify(b"key", &d, other_head, other_payload));
    assert!(!verify(b"key", &d, head, other_payload));
}

#[test]
fn implausible_descriptors_are_refused_before_allocating() {
    let (d, _) = block(b"k", b"v", 1);
    assert!(check_descriptor(&d).is_ok());
    let huge = Descriptor {
        payload_len: u32::MAX,
        block_len: u64::from(d.payload_offset) + u64::from(u32::MAX),
        ..d
    };
    assert!(check_descriptor(&huge).is_err());
    assert!(check_descriptor(&Descriptor { block_len: 5, ..d }).is_err());
}

#[test]
fn the_descriptor_cache_keeps_only_what_no_write_may_have_changed() {
    let (d, _) = block(b"k", b"v", 1);
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
