//! Where a block's replicas live: weighted rendezvous (highest random weight) hashing over
//! the live members, so that any client computes a key's replica set from the membership
//! alone, and a member that joins or leaves moves only the keys it wins or held.
//!
//! Each (key, member) pair gets a pseudo-random `u` in (0, 1) from a hash of both; the member
//! scores `-weight / ln(u)`, and the `r` highest scores are the replicas, the first being the
//! primary. With this score a member wins the first place for a share of keys proportional to
//! its weight (the logarithmic method of weighted rendezvous hashing).
//!
//! A member that has just joined starts with a small weight that ramps up to full over
//! [`JOIN_RAMP`]: a fresh, empty node takes new primaries gradually instead of all at once.

use std::time::Duration;

/// How long a joining member takes to reach full weight.
pub const JOIN_RAMP: Duration = Duration::from_secs(60);
/// The weight a member has the moment it joins, as a share of full weight.
pub const JOIN_FLOOR: f64 = 0.01;

/// A member as placement sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Member {
    /// Stable id (a node's id, hashed to 64 bits).
    pub id: u64,
    /// Share of full weight, in (0, 1].
    pub weight: f64,
}

impl Member {
    /// A member at full weight.
    pub fn full(id: u64) -> Self {
        Self { id, weight: 1.0 }
    }

    /// A member that joined `since` ago: its weight ramps linearly from [`JOIN_FLOOR`] to 1
    /// over `ramp`.
    pub fn joining(id: u64, since: Duration, ramp: Duration) -> Self {
        let progress = if ramp.is_zero() {
            1.0
        } else {
            since.as_secs_f64() / ramp.as_secs_f64()
        };
        Self {
            id,
            weight: progress.clamp(JOIN_FLOOR, 1.0),
        }
    }
}

/// 64-bit FNV-1a of the key, then a final mix: stable across processes, platforms and
/// releases (placement must not change when a binary does).
pub fn key_hash(key: &[u8]) -> u64 {
    let h = key.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3)
    });
    mix(h)
}

fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn score(key_hash: u64, member: &Member) -> f64 {
    let h = mix(key_hash ^ mix(member.id));
    // 53 random bits, never 0 or 1.
    let u = ((h >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
    -member.weight / u.ln()
}

/// The ids of the `r` members that hold `key`'s replicas, primary first. Fewer when there are
/// fewer members. Ties (same score) go to the lower id, so every caller agrees.
pub fn replicas(key: &[u8], members: &[Member], r: usize) -> Vec<u64> {
    let h = key_hash(key);
    let mut scored: Vec<(f64, u64)> = members
        .iter()
        .filter(|m| m.weight > 0.0)
        .map(|m| (score(h, m), m.id))
        .collect();
    scored.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)));
    scored.into_iter().take(r).map(|(_, id)| id).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(n: usize) -> Vec<Vec<u8>> {
        (0..n).map(|i| format!("prompt/{i}").into_bytes()).collect()
    }

    fn primary_share(members: &[Member], id: u64, keys: &[Vec<u8>]) -> f64 {
        let won = keys
            .iter()
            .filter(|k| replicas(k, members, 1).first() == Some(&id))
            .count();
        won as f64 / keys.len() as f64
    }

    #[test]
    fn replicas_are_distinct_deterministic_and_spread_evenly() {
        let members: Vec<Member> = (1..=4).map(Member::full).collect();
        let keys = keys(40_000);
        let mut primaries = [0usize; 5];
        for k in &keys {
            let set = replicas(k, &members, 2);
            assert_eq!(set.len(), 2);
            assert_ne!(set[0], set[1]);
            assert_eq!(set, replicas(k, &members, 2), "same answer every time");
            // Order of the member list does not matter.
            let reversed: Vec<Member> = members.iter().rev().copied().collect();
            assert_eq!(set, replicas(k, &reversed, 2));
            primaries[set[0] as usize] += 1;
        }
        for &count in &primaries[1..] {
            let share = count as f64 / keys.len() as f64;
            assert!((share - 0.25).abs() < 0.02, "share {share}");
        }
        assert_eq!(
            replicas(b"k", &members[..1], 3),
            vec![1],
            "fewer members than r"
        );
        assert!(replicas(b"k", &[], 2).is_empty());
    }

    #[test]
    fn a_leaving_member_moves_only_the_keys_it_held() {
        let all: Vec<Member> = (1..=4).map(Member::full).collect();
        let without_3: Vec<Member> = all.iter().copied().filter(|m| m.id != 3).collect();
        for k in keys(5_000) {
            let before = replicas(&k, &all, 2);
            let after = replicas(&k, &without_3, 2);
            if !before.contains(&3) {
                assert_eq!(
                    before, after,
                    "a key that did not involve 3 kept its replicas"
                );
            } else {
                // The survivor keeps its place; one new member takes over 3's.
                let survivor = before.iter().find(|&&id| id != 3).unwrap();
                assert!(after.contains(survivor));
            }
        }
    }

    #[test]
    fn a_joining_member_takes_primaries_gradually() {
        let keys = keys(20_000);
        let old: Vec<Member> = (1..=3).map(Member::full).collect();
        let mut last = 0.0;
        for seconds in [0, 6, 15, 30, 45, 60, 120] {
            let mut members = old.clone();
            members.push(Member::joining(4, Duration::from_secs(seconds), JOIN_RAMP));
            let share = primary_share(&members, 4, &keys);
            let weight = members[3].weight;
            let expected = weight / (3.0 + weight);
            assert!(
                (share - expected).abs() < 0.02,
                "at {seconds}s: share {share}, expected about {expected}"
            );
            assert!(share >= last, "the share only grows");
            last = share;
        }
        assert!(
            primary_share(
                &[
                    old.as_slice(),
                    &[Member::joining(4, Duration::ZERO, JOIN_RAMP)]
                ]
                .concat(),
                4,
                &keys
            ) < 0.01
        );
        assert!((last - 0.25).abs() < 0.02, "full weight after the ramp");
    }
}
