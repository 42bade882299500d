//! Seeded traces of the regimes a KVCache store meets, in the JSON-lines format of the
//! Mooncake trace release (`timestamp` in ms, `input_length` and `output_length` in tokens,
//! `hash_ids`: one id per block of [`TOKENS_PER_BLOCK`] tokens, shared ids for shared
//! prefixes). An eviction policy fitted on one trace is a guess until these agree; each regime
//! stresses one thing:
//!
//! - [`Regime::SystemPrompts`]: long system prompts shared by many requests, their
//!   popularity Zipf-distributed (s = 0.9 over 512 prompts of 4 to 24 blocks: about 7,000
//!   blocks, more than the smaller capacities hold), each request adding a short question of
//!   its own (1 to 4 blocks). Rewards keeping the popular heads, not the questions.
//! - [`Regime::Conversations`]: multi-turn conversations: each turn re-sends the whole
//!   conversation so far (the previous prompt, the answer, a new message of 1 to 3 blocks),
//!   after a think time drawn from an exponential of mean 30 s; 2 to 12 turns, 64 open at
//!   once. Rewards recency within a conversation, and a chain's tail going before its head.
//! - [`Regime::Documents`]: one-off long documents (16 to 96 blocks, never seen again)
//!   interleaved, half and half, with requests on a hot set (2,048 prompts of 8 blocks, Zipf
//!   s = 0.9: about 5% of the distinct blocks). A scan: a policy that lets the documents
//!   flush the hot set loses.
//! - [`Regime::Agents`]: agent loops that re-send a context growing by 1 to 3 blocks every 2
//!   to 5 s, for 10 to 40 steps, 16 at once. Rewards keeping every loop's latest chain.
//! - [`Regime::Mix`]: the four interleaved, a quarter each.

use std::io::Write;

use crate::bench::Rng;

/// Tokens per block in generated traces (as in the Mooncake traces).
pub const TOKENS_PER_BLOCK: u64 = 512;

/// A workload regime; see the module's documentation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Regime {
    /// A few long, popular system prompts.
    SystemPrompts,
    /// Multi-turn conversations with think times.
    Conversations,
    /// One-off long documents beside a small hot set.
    Documents,
    /// Agent loops re-sending a growing context.
    Agents,
    /// The four interleaved.
    Mix,
}

/// One generated request.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct GeneratedRequest {
    /// Arrival, in milliseconds from the start.
    pub timestamp: u64,
    /// Prompt tokens.
    pub input_length: u64,
    /// Answer tokens.
    pub output_length: u64,
    /// One id per block of the prompt.
    pub hash_ids: Vec<u64>,
}

impl Rng {
    /// Uniform in `[0, 1)`.
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `lo..=hi`.
    fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    /// Exponential with this mean.
    fn exponential(&mut self, mean: f64) -> f64 {
        -mean * (1.0 - self.unit()).ln()
    }
}

/// Draws ranks `0..n` with probability proportional to `1 / (rank + 1)^s`.
struct Zipf(Vec<f64>);

impl Zipf {
    fn new(n: usize, s: f64) -> Self {
        let mut cumulative = Vec::with_capacity(n);
        let mut total = 0.0;
        for rank in 0..n {
            total += 1.0 / ((rank + 1) as f64).powf(s);
            cumulative.push(total);
        }
        Self(cumulative.into_iter().map(|c| c / total).collect())
    }

    fn draw(&self, rng: &mut Rng) -> usize {
        let u = rng.unit();
        self.0.partition_point(|&c| c < u).min(self.0.len() - 1)
    }
}

/// A source of requests of one regime; `next` gives the next arrival (a timestamp in ms)
/// and its prompt's blocks.
trait Source {
    fn next(&mut self, rng: &mut Rng, ids: &mut u64) -> (f64, Vec<u64>);
}

fn fresh(ids: &mut u64, n: u64) -> Vec<u64> {
    let start = *ids;
    *ids += n;
    (start..start + n).collect()
}

/// Mean time between arrivals of the regimes with a Poisson arrival process, in ms.
const MEAN_GAP_MS: f64 = 100.0;

struct SystemPrompts {
    prompts: Vec<Vec<u64>>,
    zipf: Zipf,
    clock: f64,
}

impl SystemPrompts {
    fn new(rng: &mut Rng, ids: &mut u64) -> Self {
        let prompts = (0..512)
            .map(|_| {
                let n = rng.between(4, 24);
                fresh(ids, n)
            })
            .collect();
        Self {
            prompts,
            zipf: Zipf::new(512, 0.9),
            clock: 0.0,
        }
    }
}

impl Source for SystemPrompts {
    fn next(&mut self, rng: &mut Rng, ids: &mut u64) -> (f64, Vec<u64>) {
        self.clock += rng.exponential(MEAN_GAP_MS);
        let mut blocks = self.prompts[self.zipf.draw(rng)].clone();
        let question = rng.between(1, 4);
        blocks.extend(fresh(ids, question));
        (self.clock, blocks)
    }
}

/// Chains that grow each time they are sent again, each with its next arrival: the
/// conversations and the agent loops.
struct Growing {
    open: Vec<(f64, Vec<u64>, u64)>,
    /// How many to keep open, and how a new one and a next step look.
    width: usize,
    first: (u64, u64),
    step: (u64, u64),
    steps: (u64, u64),
    /// Think time: exponential with this mean (ms), or uniform in this range.
    gap: Gap,
    clock: f64,
}

enum Gap {
    Exponential(f64),
    Uniform(u64, u64),
}

impl Growing {
    fn conversations() -> Self {
        Self {
            open: Vec::new(),
            width: 64,
            first: (2, 8),
            step: (1, 3),
            steps: (2, 12),
            gap: Gap::Exponential(30_000.0),
            clock: 0.0,
        }
    }

    fn agents() -> Self {
        Self {
            open: Vec::new(),
            width: 16,
            first: (4, 12),
            step: (1, 3),
            steps: (10, 40),
            gap: Gap::Uniform(2_000, 5_000),
            clock: 0.0,
        }
    }

    fn gap(&self, rng: &mut Rng) -> f64 {
        match self.gap {
            Gap::Exponential(mean) => rng.exponential(mean),
            Gap::Uniform(lo, hi) => rng.between(lo, hi) as f64,
        }
    }
}

impl Source for Growing {
    fn next(&mut self, rng: &mut Rng, ids: &mut u64) -> (f64, Vec<u64>) {
        while self.open.len() < self.width {
            // New chains start spread over the next few seconds.
            self.clock += rng.exponential(MEAN_GAP_MS);
            let first = rng.between(self.first.0, self.first.1);
            let steps = rng.between(self.steps.0, self.steps.1);
            self.open.push((self.clock, fresh(ids, first), steps));
        }
        let (at, _) = self
            .open
            .iter()
            .enumerate()
            .map(|(i, (t, _, _))| (i, *t))
            .fold(
                (0, f64::MAX),
                |best, (i, t)| if t < best.1 { (i, t) } else { best },
            );
        let (time, blocks, left) = self.open.swap_remove(at);
        if left > 1 {
            // The answer and the next message join the chain. The last block was partly
            // filled; filled further it holds other tokens, so it is another block (a block's
            // key covers its tokens): only the full blocks before it are shared.
            let mut grown = blocks.clone();
            grown.pop();
            let step = rng.between(self.step.0, self.step.1);
            grown.extend(fresh(ids, step + 1));
            let next = time + self.gap(rng);
            self.open.push((next, grown, left - 1));
        }
        self.clock = self.clock.max(time);
        (time, blocks)
    }
}

struct Documents {
    hot: Vec<Vec<u64>>,
    zipf: Zipf,
    clock: f64,
}

impl Documents {
    fn new(ids: &mut u64) -> Self {
        Self {
            hot: (0..2048).map(|_| fresh(ids, 8)).collect(),
            zipf: Zipf::new(2048, 0.9),
            clock: 0.0,
        }
    }
}

impl Source for Documents {
    fn next(&mut self, rng: &mut Rng, ids: &mut u64) -> (f64, Vec<u64>) {
        self.clock += rng.exponential(MEAN_GAP_MS);
        let blocks = if rng.unit() < 0.5 {
            let mut hot = self.hot[self.zipf.draw(rng)].clone();
            hot.extend(fresh(ids, 1));
            hot
        } else {
            let n = rng.between(16, 96);
            fresh(ids, n)
        };
        (self.clock, blocks)
    }
}

fn source(regime: Regime, rng: &mut Rng, ids: &mut u64) -> Vec<Box<dyn Source>> {
    match regime {
        Regime::SystemPrompts => vec![Box::new(SystemPrompts::new(rng, ids))],
        Regime::Conversations => vec![Box::new(Growing::conversations())],
        Regime::Documents => vec![Box::new(Documents::new(ids))],
        Regime::Agents => vec![Box::new(Growing::agents())],
        Regime::Mix => [
            Regime::SystemPrompts,
            Regime::Conversations,
            Regime::Documents,
            Regime::Agents,
        ]
        .into_iter()
        .flat_map(|r| source(r, rng, ids))
        .collect(),
    }
}

/// `requests` requests of `regime`, in arrival order, the same for the same `seed`. Made
/// one at a time: a long trace is written as it is made, not held.
pub fn generate(regime: Regime, requests: usize, seed: u64) -> Generator {
    let mut rng = Rng(seed);
    let mut ids = 0u64;
    let mut sources = source(regime, &mut rng, &mut ids);
    // Each source's next request, merged by arrival time.
    let pending = sources
        .iter_mut()
        .map(|s| s.next(&mut rng, &mut ids))
        .collect();
    Generator {
        rng,
        ids,
        sources,
        pending,
        left: requests,
    }
}

/// The requests of a generated trace; see [`generate`].
pub struct Generator {
    rng: Rng,
    ids: u64,
    sources: Vec<Box<dyn Source>>,
    pending: Vec<(f64, Vec<u64>)>,
    left: usize,
}

impl Iterator for Generator {
    type Item = GeneratedRequest;

    fn next(&mut self) -> Option<GeneratedRequest> {
        if self.left == 0 {
            return None;
        }
        self.left -= 1;
        let pending = &self.pending;
        let i = (0..pending.len())
            .min_by(|&a, &b| pending[a].0.total_cmp(&pending[b].0))
            .unwrap_or(0);
        let next = self.sources[i].next(&mut self.rng, &mut self.ids);
        let (time, hash_ids) = std::mem::replace(&mut self.pending[i], next);
        // The last block of a prompt is partly filled (never full: see `Growing`).
        let blocks = hash_ids.len() as u64;
        let input_length =
            (blocks - 1) * TOKENS_PER_BLOCK + self.rng.between(1, TOKENS_PER_BLOCK - 1);
        Some(GeneratedRequest {
            timestamp: time as u64,
            input_length,
            output_length: self.rng.between(16, 1024),
            hash_ids,
        })
    }
}

/// Writes `requests` as JSON lines.
///
/// # Errors
///
/// The writer's.
pub fn write_trace(
    out: &mut impl Write,
    requests: impl IntoIterator<Item = GeneratedRequest>,
) -> std::io::Result<()> {
    for request in requests {
        serde_json::to_writer(&mut *out, &request)?;
        out.write_all(b"\n")?;
    }
    Ok(())
}
