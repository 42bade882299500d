//! Replays a prefix-reuse trace against a cache and counts prefix hits.
//!
//! A trace is JSON lines, one request each, in arrival order (the format of the Mooncake
//! FAST'25 trace release): `{"timestamp": ms, "input_length": tokens, "output_length": tokens,
//! "hash_ids": [block ids of the prompt's prefix chain, one per block of tokens]}`. Only
//! `input_length` and `hash_ids` are needed; other fields are ignored.
//!
//! For each request, in order: ask how many leading blocks of its chain are cached (the
//! prefix hit: a block after the first missing one is of no use), then store the blocks from
//! the first missing one on, linked as a chain whose end is marked partial when the prompt's
//! last block holds fewer tokens than a full block. The hit ratio in blocks is hit blocks over
//! block references; in tokens, the same weighted by each block's tokens (the last block of
//! a request is usually partial).
//!
//! Five ways to count, side by side:
//! - [`replay_engine`]: a real [`Engine`](mooncake_kv_engine::Engine) holding `capacity` blocks (payloads scaled down),
//!   optionally with an NVMe tier below DRAM; hits are read back and checked byte for byte;
//! - [`simulate`]: the engine's eviction policy alone, on block ids, with the same links;
//! - [`belady`]: Belady's MIN, offline (evict the block used farthest in the future), the
//!   reference an online policy is measured against;
//! - [`lru_with_reuse_oracle`]: LRU that, offline, caches only blocks that will be used again:
//!   what knowing which blocks have a future (and nothing about when) is worth;
//! - [`most_used`]: the blocks the whole trace references most, kept for good: what knowing
//!   each block's popularity (and nothing about when) is worth; the best any policy does
//!   where requests are independent draws of a fixed popularity.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;

use anyhow::{Context, bail, ensure};
use serde::{Deserialize, Serialize};

pub mod generate;
mod real;
mod simulate;
#[cfg(test)]
mod tests;

pub use real::*;
pub use simulate::*;

/// The longest line a trace may have, and the most blocks one request may name.
const MAX_LINE_BYTES: usize = 64 << 20;
const MAX_BLOCKS_PER_REQUEST: usize = 1 << 20;

/// One request of a trace.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// Prompt tokens.
    pub input_length: u64,
    /// The prompt's prefix chain, one id per block.
    pub hash_ids: Vec<u64>,
}

/// A whole trace, in arrival order.
#[derive(Debug, Clone, Default)]
pub struct Trace {
    /// The requests.
    pub requests: Vec<Request>,
    /// Tokens per full block (the trace's block size; 512 for the Mooncake traces).
    pub tokens_per_block: u64,
}

#[derive(Deserialize)]
struct RawRequest {
    input_length: u64,
    hash_ids: Vec<u64>,
}

impl Trace {
    /// Reads a JSON-lines trace. Blank lines are skipped.
    ///
    /// # Errors
    ///
    /// The file cannot be read, or a line (named by number) is not a request: bad JSON, a
    /// missing field, an over-long line or chain.
    pub fn load(path: &Path, tokens_per_block: u64) -> anyhow::Result<Self> {
        ensure!(tokens_per_block > 0, "tokens per block must be positive");
        let file = std::fs::File::open(path)
            .with_context(|| format!("cannot open trace {}", path.display()))?;
        let mut reader = BufReader::new(file);
        let mut requests = Vec::new();
        let mut line = String::new();
        for number in 1.. {
            line.clear();
            let read = Read::take(&mut reader, MAX_LINE_BYTES as u64 + 1)
                .read_line(&mut line)
                .with_context(|| format!("{}:{number}: cannot read", path.display()))?;
            if read == 0 {
                break;
            }
            ensure!(
                line.len() <= MAX_LINE_BYTES,
                "{}:{number}: line longer than {MAX_LINE_BYTES} bytes",
                path.display()
            );
            if line.trim().is_empty() {
                continue;
            }
            let raw: RawRequest = serde_json::from_str(&line)
                .with_context(|| format!("{}:{number}: not a trace request", path.display()))?;
            ensure!(
                raw.hash_ids.len() <= MAX_BLOCKS_PER_REQUEST,
                "{}:{number}: {} blocks in one request (at most {MAX_BLOCKS_PER_REQUEST})",
                path.display(),
                raw.hash_ids.len()
            );
            requests.push(Request {
                input_length: raw.input_length,
                hash_ids: raw.hash_ids,
            });
        }
        if requests.is_empty() {
            bail!("{}: no requests", path.display());
        }
        Ok(Self {
            requests,
            tokens_per_block,
        })
    }

    /// For each request, whether a caller that knows when a conversation is over would say
    /// that its chain ended there: no later request uses any of its blocks after the first
    /// (the first, a system prompt in the Mooncake traces, is shared between conversations).
    /// Only `fraction` of such requests (chosen by a hash of their position) are marked: what
    /// a caller that knows about that share of the conversations it ends would tell.
    pub fn ended_chains(&self, fraction: f64) -> Vec<bool> {
        let mut used_later: std::collections::HashSet<u64> = std::collections::HashSet::new();
        let mut ended = vec![false; self.requests.len()];
        for (number, request) in self.requests.iter().enumerate().rev() {
            let tail = request.hash_ids.get(1..).unwrap_or_default();
            let draw = (mix(number as u64) >> 11) as f64 / (1u64 << 53) as f64;
            let chosen = draw < fraction;
            ended[number] =
                chosen && !tail.is_empty() && !tail.iter().any(|id| used_later.contains(id));
            used_later.extend(request.hash_ids.iter().copied());
        }
        ended
    }

    /// Block references in all requests.
    pub fn block_refs(&self) -> u64 {
        self.requests.iter().map(|r| r.hash_ids.len() as u64).sum()
    }

    /// Distinct block ids.
    pub fn unique_blocks(&self) -> usize {
        let mut ids: Vec<u64> = self
            .requests
            .iter()
            .flat_map(|r| r.hash_ids.iter().copied())
            .collect();
        ids.sort_unstable();
        ids.dedup();
        ids.len()
    }

    /// Tokens in block `index` of `request`: full blocks, and what is left of the input in
    /// the last one (a full block when the lengths disagree).
    fn tokens(&self, request: &Request, index: usize) -> u64 {
        let full = self.tokens_per_block;
        let before = full.saturating_mul(index as u64);
        match request.input_length.checked_sub(before) {
            Some(left) if left > 0 && index + 1 == request.hash_ids.len() => left.min(full),
            _ => full,
        }
    }

    /// Whether `request`'s last block holds fewer tokens than a full block: what a replay
    /// tells the engine with [`ChainEnd::Partial`].
    fn ends_partial(&self, request: &Request) -> bool {
        request
            .hash_ids
            .len()
            .checked_sub(1)
            .is_some_and(|last| self.tokens(request, last) < self.tokens_per_block)
    }

    /// The share of block references that repeat an earlier one: what an unbounded cache hits.
    pub fn ceiling(&self) -> Hits {
        let mut seen = std::collections::HashSet::new();
        let mut hits = Hits::default();
        for request in &self.requests {
            let matched = cached_prefix(&request.hash_ids, |id| seen.contains(id));
            hits.count(self, request, matched);
            seen.extend(request.hash_ids.iter().copied());
        }
        hits
    }
}

/// Prefix hits counted over a replay.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Hits {
    /// Block references.
    pub blocks: u64,
    /// Of those, in a cached prefix.
    pub hit_blocks: u64,
    /// Tokens in all block references.
    pub tokens: u64,
    /// Of those, in a cached prefix.
    pub hit_tokens: u64,
}

impl Hits {
    fn count(&mut self, trace: &Trace, request: &Request, matched: usize) {
        for index in 0..request.hash_ids.len() {
            let tokens = trace.tokens(request, index);
            self.blocks += 1;
            self.tokens += tokens;
            if index < matched {
                self.hit_blocks += 1;
                self.hit_tokens += tokens;
            }
        }
    }

    /// Hit blocks over block references.
    pub fn block_ratio(&self) -> f64 {
        ratio(self.hit_blocks, self.blocks)
    }

    /// Hit tokens over tokens.
    pub fn token_ratio(&self) -> f64 {
        ratio(self.hit_tokens, self.tokens)
    }
}

fn ratio(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 / whole as f64
    }
}

/// How many leading blocks of `chain` are cached: a prefix hit stops at the first miss.
fn cached_prefix(chain: &[u64], is_cached: impl Fn(&u64) -> bool) -> usize {
    chain.iter().take_while(|id| is_cached(id)).count()
}

/// A block id's key hash for a policy (the engine hashes real keys).
fn mix(id: u64) -> u64 {
    let mut x = id ^ 0x9e37_79b9_7f4a_7c15;
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}
