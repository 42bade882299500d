//! `kvctl bench`: a load generator against a running node, and the self-checking values it
//! writes.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use mooncake_kv_replication::{Client, ClientError};

/// What a bench run does.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    /// Bytes of each value (at least 16: seed and key index head every value).
    pub value_bytes: usize,
    /// Keys per request (a put batch, or a batch of gets: one lookup, then all the reads).
    pub batch: usize,
    /// Client threads.
    pub concurrency: usize,
    /// Share of operations that are reads, 0 to 100.
    pub read_percent: u8,
    /// Keys in the key space.
    pub keys: u64,
    /// Stop after this long (when `count` is `None`).
    pub duration: Duration,
    /// Stop after this many operations in all.
    pub count: Option<u64>,
    /// Put every key once before measuring.
    pub prefill: bool,
    /// Prefix of every key.
    pub key_prefix: String,
    /// Seed of the key choice and of the values written.
    pub seed: u64,
    /// The order keys are taken in.
    pub order: KeyOrder,
    /// Run this long before measuring, unmeasured: connections opened and descriptors cached,
    /// as in a reader that has been running a while. Wrong values and errors still count.
    pub warm_up: Duration,
}

/// The order a bench takes keys in.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum KeyOrder {
    /// Uniformly at random.
    #[default]
    Random,
    /// One after the other, each thread from its own share of the key space, wrapping
    /// around: how a prefix chain's blocks, put together, are read back.
    Sequential,
}

/// Latency quantiles, in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Quantiles {
    /// Median.
    pub p50_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// 99.9th percentile.
    pub p999_us: f64,
}

/// What a bench run measured.
#[derive(Debug, Clone, Default)]
pub struct BenchReport {
    /// Reads done (hits and misses).
    pub reads: u64,
    /// Reads that found no block.
    pub misses: u64,
    /// Writes done.
    pub writes: u64,
    /// Value bytes moved (read and written).
    pub bytes: u64,
    /// Wall time of the measured part.
    pub elapsed: Duration,
    /// Per read request (a batch of gets counts once).
    pub read_latency: Quantiles,
    /// Per read, from when its request was ready to the first bytes of its answer: measured
    /// by the many-connection load generator only (zero otherwise). It is what
    /// `redis-benchmark` reports as a request's latency, so the figure to compare with its.
    pub read_first_byte: Quantiles,
    /// Per put request.
    pub write_latency: Quantiles,
    /// Values whose bytes were not what was written under their key.
    pub wrong_values: u64,
    /// Operations that failed, and the first error seen.
    pub errors: u64,
    /// The first error seen, in words.
    pub first_error: Option<String>,
    /// Reads the client re-did after a verification failure (block moved or replaced).
    pub verification_retries: u64,
    /// Reads served through a cached descriptor, with no lookup.
    pub cached_reads: u64,
    /// Operations of the warm-up, not counted in the figures (its wrong values and errors are).
    pub warm_up_ops: u64,
    /// Value bytes read per second of time spent inside reads (the bench's own checking of
    /// each value excluded), in MiB: what one reader thread gets, to set next to memcpy.
    pub read_mib_per_busy_second: f64,
}

impl BenchReport {
    /// Operations per second.
    pub fn ops_per_second(&self) -> f64 {
        (self.reads + self.writes) as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }

    /// Value bytes per second, in MiB.
    pub fn mib_per_second(&self) -> f64 {
        self.bytes as f64 / self.elapsed.as_secs_f64().max(1e-9) / f64::from(1 << 20)
    }
}

/// A zeroed buffer that starts on a 4 KiB boundary, as an inference engine's pinned transfer
/// buffers do. The bench reads into these, and the memcpy reference copies between them:
/// `memcpy` runs about 12% slower when its source and destination sit at different offsets
/// within a cache line (a store's payloads are 64-byte aligned, a `Vec<u8>` only 16), which
/// would measure the buffer rather than the store.
struct PageAligned {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl PageAligned {
    const ALIGN: usize = 4096;

    fn new(len: usize) -> Self {
        Self::filled(len, 0)
    }

    fn filled(len: usize, byte: u8) -> Self {
        let storage = vec![byte; len + Self::ALIGN];
        let start = storage.as_ptr().align_offset(Self::ALIGN).min(Self::ALIGN);
        Self {
            storage,
            start,
            len,
        }
    }

    fn as_slice(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

/// The reference a same-host get is measured against: one thread copying `value_bytes` at a
/// time out of a 256 MiB buffer (so the source is as cold as a node's DRAM tier), for about
/// `seconds`; the values are taken in order, or with `random` in a random order, as a bench
/// that picks keys at random reads them. Values lie 64-byte aligned, as the DRAM tier lays
/// out payloads, and are copied into a page-aligned buffer, as the bench reads them. Returns
/// MiB per second.
pub fn memcpy_reference(value_bytes: usize, seconds: f64, random: bool) -> f64 {
    const SOURCE: usize = 256 << 20;
    let value_bytes = value_bytes.clamp(1, SOURCE / 2);
    let source = PageAligned::filled(SOURCE, 0x5a);
    let source = source.as_slice();
    let mut dst = PageAligned::new(value_bytes);
    let dst = dst.as_mut_slice();
    let stride = value_bytes.next_multiple_of(64);
    let slots = (SOURCE - value_bytes) / stride + 1;
    let mut rng = Rng(7);
    let started = Instant::now();
    let mut copied = 0u64;
    let mut i = 0;
    while started.elapsed().as_secs_f64() < seconds {
        for _ in 0..16 {
            let slot = if random {
                rng.next() as usize % slots
            } else {
                i % slots
            };
            let at = slot * stride;
            dst.copy_from_slice(std::hint::black_box(&source[at..at + value_bytes]));
            std::hint::black_box(&mut *dst);
            i += 1;
            copied += value_bytes as u64;
        }
    }
    copied as f64 / started.elapsed().as_secs_f64() / f64::from(1 << 20)
}

/// The reference a tcp get is measured against: a plain TCP socket pair on loopback, where
/// an 8-byte request (offset) gets `value_bytes` back, written from a 256 MiB buffer at a
/// rotating offset (as cold as a node's DRAM tier) and received into one buffer, one request
/// at a time, for about `seconds`. Returns MiB per second, or `None` if the sockets fail.
pub fn raw_tcp_reference(value_bytes: usize, seconds: f64) -> Option<f64> {
    use std::io::{Read, Write};
    const SOURCE: usize = 256 << 20;
    let value_bytes = value_bytes.clamp(1, SOURCE / 2);
    let listener = std::net::TcpListener::bind("127.0.0.1:0").ok()?;
    let addr = listener.local_addr().ok()?;
    let server = std::thread::spawn(move || -> std::io::Result<()> {
        let source = vec![0x5au8; SOURCE];
        let (mut stream, _) = listener.accept()?;
        stream.set_nodelay(true)?;
        let mut request = [0u8; 8];
        while stream.read_exact(&mut request).is_ok() {
            let at =
                usize::try_from(u64::from_le_bytes(request)).unwrap_or(0) % (SOURCE - value_bytes);
            stream.write_all(&source[at..at + value_bytes])?;
        }
        Ok(())
    });
    let mut stream = std::net::TcpStream::connect(addr).ok()?;
    stream.set_nodelay(true).ok()?;
    let mut dst = vec![0u8; value_bytes];
    let slots = (SOURCE / value_bytes).max(1) as u64;
    let started = Instant::now();
    let mut received = 0u64;
    let mut i = 0u64;
    while started.elapsed().as_secs_f64() < seconds {
        let at = (i % slots) * value_bytes as u64;
        stream.write_all(&at.to_le_bytes()).ok()?;
        stream.read_exact(&mut dst).ok()?;
        received += value_bytes as u64;
        i += 1;
    }
    let rate = received as f64 / started.elapsed().as_secs_f64() / f64::from(1 << 20);
    drop(stream);
    let _ = server.join();
    Some(rate)
}

/// The key of index `i`.
pub fn bench_key(prefix: &str, i: u64) -> Vec<u8> {
    format!("{prefix}{i:016x}").into_bytes()
}

/// Step between consecutive 8-byte words of a value: odd, so words never repeat.
const STEP: u64 = 0x9e37_79b9_7f4a_7c15;

fn first_word(seed: u64, index: u64) -> u64 {
    let mut z = seed ^ index.wrapping_mul(0xd6e8_feb8_6659_fd93);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Fills `out` with the value written under key index `index` by a writer using `seed`: the
/// seed, the index, then 8-byte words that are a function of both and of their position.
/// Any reader can check it, about as fast as it can read it.
pub fn fill_value(index: u64, seed: u64, out: &mut [u8]) {
    let (head, rest) = out.split_at_mut(16.min(out.len()));
    let mut id = [0u8; 16];
    id[..8].copy_from_slice(&seed.to_le_bytes());
    id[8..].copy_from_slice(&index.to_le_bytes());
    head.copy_from_slice(&id[..head.len()]);
    let mut word = first_word(seed, index);
    for chunk in rest.chunks_mut(8) {
        chunk.copy_from_slice(&word.to_le_bytes()[..chunk.len()]);
        word = word.wrapping_add(STEP);
    }
}

/// Whether `value` is exactly a value [`fill_value`] writes for key index `index` (with
/// whatever seed it carries): a value of another key, or made of pieces of two writes, fails.
pub fn check_value(index: u64, value: &[u8]) -> bool {
    if value.len() < 16 {
        return false;
    }
    let mut seed = [0u8; 8];
    seed.copy_from_slice(&value[..8]);
    let seed = u64::from_le_bytes(seed);
    if value[8..16] != index.to_le_bytes() {
        return false;
    }
    let mut word = first_word(seed, index);
    let mut chunks = value[16..].chunks_exact(8);
    let mut ok = true;
    for chunk in chunks.by_ref() {
        let mut w = [0u8; 8];
        w.copy_from_slice(chunk);
        ok &= u64::from_le_bytes(w) == word;
        word = word.wrapping_add(STEP);
    }
    let tail = chunks.remainder();
    ok && tail == &word.to_le_bytes()[..tail.len()]
}

/// splitmix64: small, seeded, and the same everywhere (the bench's key choice, the generated
/// traces).
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        // splitmix64
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
}

/// What one load thread counted.
#[derive(Default)]
pub(crate) struct Tally {
    pub(crate) reads: u64,
    pub(crate) misses: u64,
    pub(crate) writes: u64,
    pub(crate) bytes: u64,
    pub(crate) wrong: u64,
    pub(crate) errors: u64,
    pub(crate) first_error: Option<String>,
    pub(crate) read_ns: Vec<u64>,
    /// Per read, to the first bytes of its answer (the load generator's only).
    pub(crate) first_byte_ns: Vec<u64>,
    pub(crate) write_ns: Vec<u64>,
}

impl Tally {
    fn read_outcome(&mut self, index: u64, result: Result<Option<&[u8]>, ClientError>) {
        match result {
            Ok(Some(value)) => {
                self.bytes += value.len() as u64;
                if !check_value(index, value) {
                    self.wrong += 1;
                }
            }
            Ok(None) => self.misses += 1,
            Err(e) => self.error(&e),
        }
    }

    fn error(&mut self, error: &ClientError) {
        self.failed(error.to_string());
    }

    /// Counts a failed operation, keeping the first one's words.
    pub(crate) fn failed(&mut self, what: String) {
        self.errors += 1;
        self.first_error.get_or_insert(what);
    }
}

/// The threads' tallies summed into a report of a measured part of `elapsed`.
pub(crate) fn summarize(
    tallies: impl IntoIterator<Item = Tally>,
    elapsed: Duration,
    value_bytes: usize,
) -> BenchReport {
    let mut report = BenchReport {
        elapsed,
        ..BenchReport::default()
    };
    let (mut read_ns, mut first_byte_ns, mut write_ns) = (Vec::new(), Vec::new(), Vec::new());
    for t in tallies {
        report.reads += t.reads;
        report.misses += t.misses;
        report.writes += t.writes;
        report.bytes += t.bytes;
        report.wrong_values += t.wrong;
        report.errors += t.errors;
        if report.first_error.is_none() {
            report.first_error = t.first_error;
        }
        read_ns.extend(t.read_ns);
        first_byte_ns.extend(t.first_byte_ns);
        write_ns.extend(t.write_ns);
    }
    let busy_ns: u64 = read_ns.iter().sum();
    let read_bytes = (report.reads - report.misses) as f64 * value_bytes as f64;
    report.read_mib_per_busy_second =
        read_bytes / (busy_ns as f64 / 1e9).max(1e-9) / f64::from(1 << 20);
    report.read_latency = quantiles(&mut read_ns);
    report.read_first_byte = quantiles(&mut first_byte_ns);
    report.write_latency = quantiles(&mut write_ns);
    report
}

/// Puts every key once (in batches), so that reads hit.
///
/// # Errors
///
/// The first put that fails.
pub fn prefill(
    client: &Client,
    o: &BenchOptions,
    progress: &dyn Fn(u64),
) -> Result<(), ClientError> {
    let mut values = vec![vec![0u8; o.value_bytes]; o.batch.max(1)];
    let mut i = 0;
    while i < o.keys {
        let n = (o.keys - i).min(values.len() as u64) as usize;
        let keys: Vec<Vec<u8>> = (0..n as u64)
            .map(|k| bench_key(&o.key_prefix, i + k))
            .collect();
        for (k, v) in values.iter_mut().take(n).enumerate() {
            fill_value(i + k as u64, o.seed, v);
        }
        let items: Vec<(&[u8], &[u8])> = keys
            .iter()
            .zip(&values)
            .map(|(k, v)| (k.as_slice(), v.as_slice()))
            .collect();
        for outcome in client.put_batch(&items, false)? {
            outcome.map_err(ClientError::Refused)?;
        }
        i += n as u64;
        progress(n as u64);
    }
    Ok(())
}

/// Runs the load, after [`BenchOptions::warm_up`] of it unmeasured; `progress` is called with
/// the measured operations done since its last call.
pub fn run(client: &Client, o: &BenchOptions, progress: &(dyn Fn(u64) + Sync)) -> BenchReport {
    let warm = (!o.warm_up.is_zero()).then(|| {
        let warm_up = BenchOptions {
            duration: o.warm_up,
            count: None,
            ..o.clone()
        };
        measure(client, &warm_up, &|_| {})
    });
    let mut report = measure(client, o, progress);
    if let Some(warm) = warm {
        report.warm_up_ops = warm.reads + warm.writes;
        report.wrong_values += warm.wrong_values;
        report.errors += warm.errors;
        if report.first_error.is_none() {
            report.first_error = warm.first_error;
        }
    }
    report
}

/// One measured run of the workers.
fn measure(client: &Client, o: &BenchOptions, progress: &(dyn Fn(u64) + Sync)) -> BenchReport {
    let retries_before = client.verification_retries();
    let cached_before = client.cached_reads();
    let stop = AtomicBool::new(false);
    let done = AtomicU64::new(0);
    let started = Instant::now();
    let tallies: Vec<Tally> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..o.concurrency.max(1))
            .map(|t| {
                let (stop, done) = (&stop, &done);
                scope.spawn(move || worker(client, o, t as u64, stop, done, started, progress))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    });
    let mut report = summarize(tallies, started.elapsed(), o.value_bytes);
    report.verification_retries = client.verification_retries() - retries_before;
    report.cached_reads = client.cached_reads() - cached_before;
    report
}

fn quantiles(ns: &mut [u64]) -> Quantiles {
    if ns.is_empty() {
        return Quantiles::default();
    }
    ns.sort_unstable();
    let at = |q: f64| ns[((ns.len() as f64 * q) as usize).min(ns.len() - 1)] as f64 / 1e3;
    Quantiles {
        p50_us: at(0.50),
        p99_us: at(0.99),
        p999_us: at(0.999),
    }
}

/// Load thread `thread`'s own random sequence.
pub(crate) fn thread_rng(o: &BenchOptions, thread: u64) -> Rng {
    Rng(o.seed ^ (thread + 1).wrapping_mul(0xd6e8_feb8_6659_fd93))
}

/// Chooses a worker's keys in the bench's [`KeyOrder`].
pub(crate) struct KeyPicker {
    order: KeyOrder,
    keys: u64,
    next: u64,
}

impl KeyPicker {
    /// Thread `thread` of `o.concurrency` starts its sequential walk at its share of the keys.
    pub(crate) fn new(o: &BenchOptions, thread: u64) -> Self {
        let keys = o.keys.max(1);
        let share = u128::from(keys) * u128::from(thread) / o.concurrency.max(1) as u128;
        Self {
            order: o.order,
            keys,
            next: u64::try_from(share).unwrap_or(0) % keys,
        }
    }

    pub(crate) fn next(&mut self, rng: &mut Rng) -> u64 {
        match self.order {
            KeyOrder::Random => rng.next() % self.keys,
            KeyOrder::Sequential => {
                let key = self.next;
                self.next = (key + 1) % self.keys;
                key
            }
        }
    }
}

fn worker(
    client: &Client,
    o: &BenchOptions,
    thread: u64,
    stop: &AtomicBool,
    done: &AtomicU64,
    started: Instant,
    progress: &(dyn Fn(u64) + Sync),
) -> Tally {
    let mut rng = thread_rng(o, thread);
    let mut tally = Tally::default();
    let batch = o.batch.max(1);
    let mut buf = PageAligned::new(o.value_bytes);
    let buf = buf.as_mut_slice();
    let mut values: Vec<PageAligned> = (0..batch)
        .map(|_| PageAligned::new(o.value_bytes))
        .collect();
    let write_seed = o.seed.wrapping_add(thread + 1);
    let mut picker = KeyPicker::new(o, thread);
    while !stop.load(Ordering::Relaxed) {
        if let Some(count) = o.count {
            if done.fetch_add(batch as u64, Ordering::Relaxed) >= count {
                stop.store(true, Ordering::Relaxed);
                break;
            }
        } else if started.elapsed() >= o.duration {
            stop.store(true, Ordering::Relaxed);
            break;
        }
        let indexes: Vec<u64> = (0..batch).map(|_| picker.next(&mut rng)).collect();
        let read = (rng.next() % 100) < u64::from(o.read_percent);
        if read && batch == 1 {
            let i = indexes[0];
            let key = bench_key(&o.key_prefix, i);
            let t = Instant::now();
            let result = client.get_into(&key, buf);
            tally.read_ns.push(t.elapsed().as_nanos() as u64);
            tally.reads += 1;
            tally.read_outcome(i, result.map(|n| n.map(|n| &buf[..n])));
        } else if read {
            let keys: Vec<Vec<u8>> = indexes
                .iter()
                .map(|&i| bench_key(&o.key_prefix, i))
                .collect();
            let mut items: Vec<(&[u8], &mut [u8])> = keys
                .iter()
                .zip(values.iter_mut())
                .map(|(k, v)| (k.as_slice(), v.as_mut_slice()))
                .collect();
            let t = Instant::now();
            let results = client.get_into_batch(&mut items);
            // One request: its latency counts once.
            tally.read_ns.push(t.elapsed().as_nanos() as u64);
            tally.reads += batch as u64;
            for ((&i, (_, value)), result) in indexes.iter().zip(&items).zip(results) {
                tally.read_outcome(i, result.map(|n| n.map(|n| &value[..n])));
            }
        } else {
            let keys: Vec<Vec<u8>> = indexes
                .iter()
                .map(|&i| bench_key(&o.key_prefix, i))
                .collect();
            for (v, &i) in values.iter_mut().zip(&indexes) {
                fill_value(i, write_seed, v.as_mut_slice());
            }
            let items: Vec<(&[u8], &[u8])> = keys
                .iter()
                .zip(&values)
                .map(|(k, v)| (k.as_slice(), v.as_slice()))
                .collect();
            let t = Instant::now();
            let result = client.put_batch(&items, false);
            tally.write_ns.push(t.elapsed().as_nanos() as u64);
            match result {
                Ok(outcomes) => {
                    for outcome in outcomes {
                        match outcome {
                            Ok(_) => {
                                tally.writes += 1;
                                tally.bytes += o.value_bytes as u64;
                            }
                            Err(reply) => tally.error(&ClientError::Refused(reply)),
                        }
                    }
                }
                Err(e) => tally.error(&e),
            }
        }
        progress(batch as u64);
    }
    tally
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequential_keys_walk_each_threads_share_and_wrap() {
        let o = BenchOptions {
            value_bytes: 16,
            batch: 1,
            concurrency: 4,
            read_percent: 100,
            keys: 10,
            duration: Duration::from_secs(1),
            count: None,
            prefill: false,
            key_prefix: String::new(),
            seed: 1,
            order: KeyOrder::Sequential,
            warm_up: Duration::ZERO,
        };
        let mut rng = Rng(1);
        let walk = |thread, rng: &mut Rng| {
            let mut p = KeyPicker::new(&o, thread);
            (0..6).map(|_| p.next(rng)).collect::<Vec<_>>()
        };
        assert_eq!(walk(0, &mut rng), [0, 1, 2, 3, 4, 5]);
        assert_eq!(walk(3, &mut rng), [7, 8, 9, 0, 1, 2]);
        let random = BenchOptions {
            order: KeyOrder::Random,
            ..o
        };
        let mut p = KeyPicker::new(&random, 0);
        let keys: Vec<u64> = (0..100).map(|_| p.next(&mut rng)).collect();
        assert!(keys.iter().all(|&k| k < 10));
        assert!(
            keys.windows(2).any(|w| w[1] != (w[0] + 1) % 10),
            "not a walk"
        );
    }

    #[test]
    fn page_aligned_buffers_start_on_a_page_and_hold_what_was_asked() {
        for len in [0, 1, 4095, 65536, 100_000] {
            let mut b = PageAligned::filled(len, 7);
            assert_eq!(b.as_slice().len(), len);
            assert!(b.as_slice().iter().all(|&x| x == 7));
            assert_eq!(b.as_mut_slice().as_ptr() as usize % PageAligned::ALIGN, 0);
        }
    }

    #[test]
    fn values_check_against_their_key_whatever_the_writer() {
        let mut a = vec![0u8; 1000];
        fill_value(7, 1, &mut a);
        assert!(check_value(7, &a));
        let mut b = vec![0u8; 1000];
        fill_value(7, 2, &mut b);
        assert!(check_value(7, &b));
        assert_ne!(a, b);
        assert!(!check_value(8, &a), "another key's value");
        let mut torn = a.clone();
        torn[500..].copy_from_slice(&b[500..]);
        assert!(!check_value(7, &torn), "half of one write, half of another");
        assert!(!check_value(7, &a[..10]));
    }
}
