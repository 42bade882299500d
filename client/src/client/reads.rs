//! Reads: a lookup, then one-sided reads of the block's head into a small buffer and of its
//! payload straight into the caller's, verified against the descriptor by the format's one
//! verification before the read counts; inline reads over the control connection; batches.

use std::io::Read;

use mooncake_kv_format::{self as format, HEADER_BYTES, MAX_PAYLOAD_OFFSET};
use mooncake_kv_transfer::{ReadOp, RemoteSlice};

use super::{BlockId, Client, ClientError, Inline, Result, io, unexpected};
use crate::proto::{Descriptor, ErrorCode, FrameError, Outcome, Request, Response};

/// Where a read puts the value it finds.
enum Sink<'a> {
    /// Into a new `Vec`.
    New,
    /// Into the start of the caller's buffer.
    Into(&'a mut [u8]),
}

/// What a read found: the value in a new `Vec`, or its length in the caller's buffer.
enum Got {
    Value(Vec<u8>),
    Len(usize),
}

/// Bytes received at a time when checksumming a payload as it arrives: small enough to be
/// checksummed while still in cache.
const RECEIVE_CHUNK: usize = 128 << 10;

/// Bytes of buffers an inline batch needs per connection before it is spread over more than
/// one: below this, another lookup and a thread's start are a fair part of the time a lane
/// saves.
const LANE_BYTES: usize = 4 << 20;

/// A lookup refused because the block failed the node's own check (and was dropped) is a
/// damaged block to the caller, as one that fails the client's check twice.
fn damaged(key: &[u8], error: ClientError) -> ClientError {
    match error {
        ClientError::Refused(reply) if reply.code == ErrorCode::Corrupt => ClientError::Corrupt {
            key: shown_key(key),
            generation: None,
            dropped: true,
        },
        other => other,
    }
}

/// A key as text when it is printable UTF-8, else as `0x` and hex.
fn shown_key(key: &[u8]) -> String {
    match std::str::from_utf8(key) {
        Ok(text) if !text.is_empty() && !text.chars().any(char::is_control) => text.to_owned(),
        _ => format!(
            "0x{}",
            key.iter().map(|b| format!("{b:02x}")).collect::<String>()
        ),
    }
}

/// Receives one inline block that follows a lookup's answer on `reader`: its head into a
/// small buffer, its payload straight into `dst` (or a new buffer when `dst` is `None`),
/// checksummed piece by piece as it arrives, then verified. Leaves the stream in step in
/// every case but a descriptor that does not check (a protocol error: the caller drops the
/// connection).
fn receive_inline(
    reader: &mut impl Read,
    key: &[u8],
    d: &Descriptor,
    mut dst: Option<&mut [u8]>,
) -> Result<Inline> {
    check_descriptor(d)?;
    let len = d.payload_len as usize;
    let mut head = vec![0u8; d.payload_offset as usize];
    reader
        .read_exact(&mut head)
        .map_err(io("read a block header"))?;
    let mut owned = Vec::new();
    let payload: &mut [u8] = match dst.as_deref_mut() {
        Some(buf) if buf.len() >= len => &mut buf[..len],
        Some(buf) => {
            // Keep the stream in step, then say why.
            std::io::copy(&mut reader.take(len as u64), &mut std::io::sink())
                .map_err(io("skip a block"))?;
            return Err(ClientError::BufferTooSmall {
                needed: len,
                available: buf.len(),
            });
        }
        None => {
            owned = vec![0u8; len];
            &mut owned
        }
    };
    let mut crc = crc32fast::Hasher::new();
    for piece in payload.chunks_mut(RECEIVE_CHUNK) {
        reader
            .read_exact(piece)
            .map_err(io("read a block payload"))?;
        crc.update(piece);
    }
    if !verify_with_crc(key, d, &head, crc.finalize()) {
        return Ok(Inline::Mismatch((d.offset, d.generation)));
    }
    Ok(if dst.is_some() {
        Inline::Read(len)
    } else {
        Inline::Owned(owned)
    })
}

/// An item of a batch: a key, and the buffer its value goes into.
type Item<'k, 'b> = (&'k [u8], &'b mut [u8]);

/// `items` cut into `lanes` contiguous runs (fewer only if there are fewer items), none empty,
/// of about equal bytes of buffers.
fn split_by_bytes<'a, 'k, 'b>(
    mut items: &'a mut [Item<'k, 'b>],
    lanes: usize,
) -> Vec<&'a mut [Item<'k, 'b>]> {
    let lanes = lanes.clamp(1, items.len().max(1));
    let mut runs = Vec::with_capacity(lanes);
    for left in (2..=lanes).rev() {
        let bytes: usize = items.iter().map(|(_, dst)| dst.len()).sum();
        let share = bytes.div_ceil(left);
        // At least one item, and one left for each run after this one.
        let mut cut = 0;
        let mut taken = 0;
        while cut < items.len() - (left - 1) && (cut == 0 || taken < share) {
            taken += items[cut].1.len();
            cut += 1;
        }
        let (run, rest) = std::mem::take(&mut items).split_at_mut(cut);
        runs.push(run);
        items = rest;
    }
    runs.push(items);
    runs
}

impl Client {
    /// Whether reads take the inline path (see [`ClientConfig::inline_tcp_reads`]).
    pub(super) fn inline(&self) -> bool {
        self.transport_name == "tcp" && self.config.inline_tcp_reads
    }

    /// One lookup with the block inline: the header and key into a small buffer, the payload
    /// straight into `dst` (or a new buffer when `dst` is `None`), then verification.
    pub(super) fn read_inline(&self, key: &[u8], mut dst: Option<&mut [u8]>) -> Result<Inline> {
        let release = std::mem::take(&mut *self.done_leases.lock());
        let cached_keys = self.take_cached_keys();
        let request = Request::Lookup {
            keys: vec![key],
            release,
            stale_reads: self.take_unreported_stale(),
            cached_reads: self.take_unreported_cached(),
            cached_keys: cached_keys.iter().map(Vec::as_slice).collect(),
            inline: true,
        };
        self.call_then(&request, &[], |control, response| {
            let Response::Lookup(mut outcomes) = response else {
                return Err(unexpected("lookup"));
            };
            let d = match (outcomes.pop(), outcomes.is_empty()) {
                (Some(Outcome::Ok(Some(d))), true) => d,
                (Some(Outcome::Ok(None)), true) => return Ok(Inline::Miss),
                (Some(Outcome::Err(e)), true) => return Err(ClientError::Refused(e)),
                _ => return Err(unexpected("lookup")),
            };
            receive_inline(&mut control.reader, key, &d, dst.as_deref_mut())
        })
    }

    /// An inline batch, over several connections at once when it is large enough
    /// ([`ClientConfig::batch_lanes`]): contiguous runs of items of about equal bytes, one
    /// lookup and one stream each, a thread each (this one takes the last). One stream
    /// keeps one thread here and one event loop on the node busy; on a host with few cores
    /// the scheduler also tends to put both ends of a lone stream on one core after a pause
    /// (docs/development.md, "The serving loop").
    fn get_into_batch_inline_spread(
        &self,
        items: &mut [(&[u8], &mut [u8])],
    ) -> Vec<Result<Option<usize>>> {
        let bytes: usize = items.iter().map(|(_, dst)| dst.len()).sum();
        let lanes = (bytes / LANE_BYTES)
            .min(self.config.batch_lanes)
            .min(self.pool.len())
            .min(items.len());
        if lanes <= 1 {
            return self.get_into_batch_inline(items);
        }
        mooncake_kv_transfer::run_in_lanes(split_by_bytes(items, lanes), |_, run| {
            self.get_into_batch_inline(run)
        })
    }

    /// [`get_into_batch`](Self::get_into_batch) over tcp with inline reads: one lookup of
    /// every key, answered by the node with every block it found right after the answer
    /// (one stream, no round trip per block, so the node sends while this side receives).
    /// Keys with a fresh descriptor are not special here: the inline path keeps none.
    fn get_into_batch_inline(
        &self,
        items: &mut [(&[u8], &mut [u8])],
    ) -> Vec<Result<Option<usize>>> {
        self.inline_batch(items, true)
    }

    /// [`get_into_batch_inline`](Self::get_into_batch_inline), which may (`again`) send what
    /// a failed connection left unread once more as a batch.
    fn inline_batch(
        &self,
        items: &mut [(&[u8], &mut [u8])],
        again: bool,
    ) -> Vec<Result<Option<usize>>> {
        let release = std::mem::take(&mut *self.done_leases.lock());
        let cached_keys = self.take_cached_keys();
        let request = Request::Lookup {
            keys: items.iter().map(|(key, _)| *key).collect(),
            release,
            stale_reads: self.take_unreported_stale(),
            cached_reads: self.take_unreported_cached(),
            cached_keys: cached_keys.iter().map(Vec::as_slice).collect(),
            inline: true,
        };
        let mut results: Vec<Option<Result<Option<usize>>>> = items.iter().map(|_| None).collect();
        // What the batch did not settle is read again: after a failed connection (the
        // exchange's error), once more as a batch on a new one, then each item fails with that
        // error (not a connection per item: a node gone would cost a timeout each); a block
        // that did not verify, on its own below.
        let exchange = self.call_then(&request, &[], |control, response| {
            let Response::Lookup(outcomes) = response else {
                return Err(unexpected("lookup"));
            };
            if outcomes.len() != items.len() {
                return Err(unexpected("lookup"));
            }
            for ((outcome, (key, dst)), result) in
                outcomes.into_iter().zip(items.iter_mut()).zip(&mut results)
            {
                *result = match outcome {
                    Outcome::Ok(None) => Some(Ok(None)),
                    Outcome::Err(e) => Some(Err(ClientError::Refused(e))),
                    Outcome::Ok(Some(d)) => {
                        match receive_inline(&mut control.reader, key, &d, Some(&mut **dst)) {
                            Ok(Inline::Read(len)) => Some(Ok(Some(len))),
                            // Read again on its own below.
                            Ok(_) => {
                                self.count_stale_read();
                                None
                            }
                            Err(error @ ClientError::BufferTooSmall { .. }) => Some(Err(error)),
                            // The stream is out of step: nothing after this can be read.
                            Err(error) => return Err(error),
                        }
                    }
                };
            }
            Ok(())
        });
        if let Err(error @ (ClientError::Io { .. } | ClientError::Protocol(_))) = exchange {
            let unread: Vec<usize> = (0..items.len()).filter(|&i| results[i].is_none()).collect();
            if again && !unread.is_empty() {
                let mut rest: Vec<(&[u8], &mut [u8])> = items
                    .iter_mut()
                    .zip(&results)
                    .filter(|(_, result)| result.is_none())
                    .map(|((key, dst), _)| (*key, &mut **dst))
                    .collect();
                let answers = self.inline_batch(&mut rest, false);
                for (i, answer) in unread.into_iter().zip(answers) {
                    results[i] = Some(answer);
                }
            } else {
                for i in unread {
                    results[i] = Some(Err(error.duplicate()));
                }
            }
        }
        items
            .iter_mut()
            .zip(results)
            .map(|((key, dst), result)| result.unwrap_or_else(|| self.get_into(key, dst)))
            .collect()
    }

    pub(super) fn lookup(&self, key: &[u8]) -> Result<Option<Descriptor>> {
        let release = std::mem::take(&mut *self.done_leases.lock());
        let cached_keys = self.take_cached_keys();
        let Response::Lookup(mut outcomes) = self.call(&Request::Lookup {
            keys: vec![key],
            release,
            stale_reads: self.take_unreported_stale(),
            cached_reads: self.take_unreported_cached(),
            cached_keys: cached_keys.iter().map(Vec::as_slice).collect(),
            inline: false,
        })?
        else {
            return Err(unexpected("lookup"));
        };
        match (outcomes.pop(), outcomes.is_empty()) {
            (Some(Outcome::Ok(d)), true) => Ok(d),
            (Some(Outcome::Err(e)), true) => Err(ClientError::Refused(e)),
            _ => Err(unexpected("lookup")),
        }
    }

    /// The value of `key`, or `None` on a miss.
    ///
    /// # Errors
    ///
    /// As [`get_into`](Self::get_into).
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.read_value(key, Sink::New)?.map(|got| match got {
            Got::Value(value) => value,
            Got::Len(_) => unreachable!("a new value is returned as a value"),
        }))
    }

    /// Reads the value of `key` straight into `dst` (one-sided, then verified); returns its
    /// length, or `None` on a miss. Bytes of `dst` past the value are left alone.
    ///
    /// # Errors
    ///
    /// [`ClientError::BufferTooSmall`]; [`ClientError::Stale`] if the block changed under
    /// every attempt; [`ClientError::Transfer`] if the read was refused; connection errors.
    pub fn get_into(&self, key: &[u8], dst: &mut [u8]) -> Result<Option<usize>> {
        Ok(self.read_value(key, Sink::Into(dst))?.map(|got| match got {
            Got::Len(len) => len,
            Got::Value(_) => unreachable!("a value read into a buffer is returned as its length"),
        }))
    }

    /// The read both [`get`](Self::get) and [`get_into`](Self::get_into) make: by cached
    /// descriptor if there is one, else inline or by lookup and one-sided read, again while
    /// the block changes under it (up to `max_attempts`).
    fn read_value(&self, key: &[u8], mut sink: Sink<'_>) -> Result<Option<Got>> {
        if let Some(d) = self.cached(key) {
            let got = match &mut sink {
                Sink::New => {
                    let mut value = vec![0u8; d.payload_len as usize];
                    self.read_cached(key, &d, &mut value)
                        .map(|_| Got::Value(value))
                }
                Sink::Into(dst) => self.read_cached(key, &d, dst).map(Got::Len),
            };
            if got.is_some() {
                return Ok(got);
            }
        }
        // The block that failed verification last: failing again the same way means its
        // bytes are damaged, not changing.
        let mut failed: Option<BlockId> = None;
        for _ in 0..self.config.max_attempts {
            if self.inline() {
                let dst = match &mut sink {
                    Sink::New => None,
                    Sink::Into(dst) => Some(&mut **dst),
                };
                let into = dst.is_some();
                match self.read_inline(key, dst).map_err(|e| damaged(key, e))? {
                    Inline::Miss => return Ok(None),
                    Inline::Owned(value) if !into => return Ok(Some(Got::Value(value))),
                    Inline::Read(len) if into => return Ok(Some(Got::Len(len))),
                    Inline::Mismatch(block) => {
                        self.count_stale_read();
                        self.failed_again(key, &mut failed, block)?;
                        continue;
                    }
                    Inline::Owned(_) | Inline::Read(_) => {
                        self.count_stale_read();
                        continue;
                    }
                }
            }
            let started = self.lookup_started();
            let Some(d) = self.lookup(key).map_err(|e| damaged(key, e))? else {
                return Ok(None);
            };
            check_descriptor(&d)?;
            let len = d.payload_len as usize;
            let got = match &mut sink {
                Sink::New => {
                    let mut value = vec![0u8; len];
                    self.read_verified(key, &d, &mut value)?
                        .then_some(Got::Value(value))
                }
                Sink::Into(dst) => {
                    if dst.len() < len {
                        return Err(ClientError::BufferTooSmall {
                            needed: len,
                            available: dst.len(),
                        });
                    }
                    self.read_verified(key, &d, &mut dst[..len])?
                        .then_some(Got::Len(len))
                }
            };
            if got.is_some() {
                self.remember(key, &d, started);
                return Ok(got);
            }
            self.failed_again(key, &mut failed, (d.offset, d.generation))?;
        }
        Err(ClientError::Stale {
            attempts: self.config.max_attempts,
        })
    }

    /// Notes that `block` failed verification; if it is the block that failed last, it is
    /// damaged: tells the node and returns [`ClientError::Corrupt`].
    fn failed_again(&self, key: &[u8], failed: &mut Option<BlockId>, block: BlockId) -> Result<()> {
        if failed.replace(block) != Some(block) {
            return Ok(());
        }
        let (_, generation) = block;
        let dropped = match self.call(&Request::ReportCorrupt { key, generation }) {
            Ok(Response::Flags(flags)) => flags.first().copied().unwrap_or(false),
            // The report is a courtesy to the node; what the caller learns is the damage.
            _ => false,
        };
        self.forget(std::iter::once(key));
        Err(ClientError::Corrupt {
            key: shown_key(key),
            generation: Some(generation),
            dropped,
        })
    }

    /// Reads the block `d` describes: its header and key into a small buffer, its payload
    /// straight into `payload`; then checks both against the descriptor and the key.
    /// `Ok(false)` when they do not match (the slot was reused or the block moved).
    pub(super) fn read_verified(
        &self,
        key: &[u8],
        d: &Descriptor,
        payload: &mut [u8],
    ) -> Result<bool> {
        if self.in_place() {
            return self.read_in_place(key, d, payload);
        }
        let mut head = vec![0u8; d.payload_offset as usize];
        let mut ops = block_reads(d, &mut head, payload);
        let results = self.transport.read_batch_crc32(&mut ops);
        if d.lease_id != 0 {
            self.done_leases.lock().push(d.lease_id);
        }
        let mut crcs = [0u32; 2];
        for (crc, result) in crcs.iter_mut().zip(results) {
            *crc = result?;
        }
        if verify_with_crc(key, d, ops[0].dst, crcs[1]) {
            Ok(true)
        } else {
            self.count_stale_read();
            Ok(false)
        }
    }

    /// [`read_verified`](Self::read_verified) over shared memory, without a payload CRC: the
    /// payload is copied, then the header and key are read and checked (see
    /// [`Transport::read_in_place`]). The node zeroes a block's header before any of its bytes
    /// can be reused, so a copy that caught bytes of a later block, or of none, is refused.
    pub(super) fn read_in_place(
        &self,
        key: &[u8],
        d: &Descriptor,
        payload: &mut [u8],
    ) -> Result<bool> {
        // Most heads (header, a short key, padding) fit on the stack; check_descriptor bounds
        // the rest.
        let mut small = [0u8; 256];
        let mut large = Vec::new();
        let len = d.payload_offset as usize;
        let head = if len <= small.len() {
            &mut small[..len]
        } else {
            large.resize(len, 0);
            &mut large[..]
        };
        let block = RemoteSlice {
            region_id: d.region_id,
            offset: d.offset,
            remote_key: d.remote_key,
        };
        let read = self.transport.read_in_place(
            block,
            head,
            u64::from(d.payload_offset),
            payload,
            &|head| verify_head(key, d, head).is_some(),
        );
        if d.lease_id != 0 {
            self.done_leases.lock().push(d.lease_id);
        }
        let verified = read?;
        if !verified {
            self.count_stale_read();
        }
        Ok(verified)
    }

    /// [`get_into`](Self::get_into) for many keys: one lookup for all of them, then all the
    /// one-sided reads in one batch (over tcp with inline reads: one lookup whose answer
    /// brings every block, in order). A block that fails verification is read again on its
    /// own. One result per item, in order.
    pub fn get_into_batch(&self, items: &mut [(&[u8], &mut [u8])]) -> Vec<Result<Option<usize>>> {
        if items.len() <= 1 {
            return items
                .iter_mut()
                .map(|(key, dst)| self.get_into(key, dst))
                .collect();
        }
        if self.inline() {
            return self.get_into_batch_inline_spread(items);
        }
        // Keys with fresh descriptors are read first, with no lookup.
        let keys: Vec<&[u8]> = items.iter().map(|(key, _)| *key).collect();
        let mut results: Vec<Option<Result<Option<usize>>>> = keys.iter().map(|_| None).collect();
        for ((key, dst), result) in items.iter_mut().zip(&mut results) {
            if let Some(d) = self.cached(key) {
                *result = self.read_cached(key, &d, dst).map(|len| Ok(Some(len)));
            }
        }
        let pending: Vec<usize> = (0..items.len()).filter(|&i| results[i].is_none()).collect();
        let started = self.lookup_started();
        let outcomes = if pending.is_empty() {
            // No lookup to send: what it would carry (leases to end, cached reads to report)
            // waits for the next one.
            Vec::new()
        } else {
            let release = std::mem::take(&mut *self.done_leases.lock());
            let cached_keys = self.take_cached_keys();
            match self.call(&Request::Lookup {
                keys: pending.iter().map(|&i| keys[i]).collect(),
                release,
                stale_reads: self.take_unreported_stale(),
                cached_reads: self.take_unreported_cached(),
                cached_keys: cached_keys.iter().map(Vec::as_slice).collect(),
                inline: false,
            }) {
                Ok(Response::Lookup(outcomes)) if outcomes.len() == pending.len() => outcomes,
                // The batch as a whole failed: each item says why on its own.
                _ => {
                    for &i in &pending {
                        let (key, dst) = &mut items[i];
                        results[i] = Some(self.get_into(key, dst));
                    }
                    Vec::new()
                }
            }
        };
        let mut planned: Vec<(usize, Descriptor)> = Vec::new();
        for (&i, outcome) in pending.iter().zip(outcomes) {
            match outcome {
                Outcome::Err(reply) => results[i] = Some(Err(ClientError::Refused(reply))),
                Outcome::Ok(None) => results[i] = Some(Ok(None)),
                Outcome::Ok(Some(d)) => {
                    if let Err(error) = check_descriptor(&d) {
                        results[i] = Some(Err(error));
                    } else if items[i].1.len() < d.payload_len as usize {
                        results[i] = Some(Err(ClientError::BufferTooSmall {
                            needed: d.payload_len as usize,
                            available: items[i].1.len(),
                        }));
                    } else {
                        planned.push((i, d));
                    }
                }
            }
        }
        let mut retry = Vec::new();
        if self.in_place() {
            // Copies out of shared memory: nothing to gain from one batch.
            for (i, d) in &planned {
                let (key, dst) = &mut items[*i];
                let len = d.payload_len as usize;
                results[*i] = Some(match self.read_in_place(key, d, &mut dst[..len]) {
                    Ok(true) => {
                        self.remember(key, d, started);
                        Ok(Some(len))
                    }
                    Ok(false) => {
                        retry.push(*i);
                        continue;
                    }
                    Err(error) => Err(error),
                });
            }
        } else {
            let mut heads: Vec<Vec<u8>> = planned
                .iter()
                .map(|(_, d)| vec![0u8; d.payload_offset as usize])
                .collect();
            // The planned items' buffers, in order (indexes in `planned` increase).
            let mut next = planned.iter().peekable();
            let mut payloads: Vec<&mut [u8]> = Vec::with_capacity(planned.len());
            for (i, (_, dst)) in items.iter_mut().enumerate() {
                if let Some((_, d)) = next.next_if(|(j, _)| *j == i) {
                    payloads.push(&mut dst[..d.payload_len as usize]);
                }
            }
            let mut ops: Vec<ReadOp<'_>> = Vec::with_capacity(planned.len() * 2);
            for (((_, d), head), payload) in planned.iter().zip(&mut heads).zip(payloads) {
                ops.extend(block_reads(d, head, payload));
            }
            let mut crcs = self.transport.read_batch_crc32(&mut ops).into_iter();
            self.done_leases.lock().extend(
                planned
                    .iter()
                    .map(|(_, d)| d.lease_id)
                    .filter(|&id| id != 0),
            );
            for (k, (i, d)) in planned.iter().enumerate() {
                let (Some(head_read), Some(payload_read)) = (crcs.next(), crcs.next()) else {
                    break;
                };
                results[*i] = Some(match (head_read, payload_read) {
                    (Err(e), _) | (_, Err(e)) => Err(e.into()),
                    (Ok(_), Ok(crc)) if verify_with_crc(keys[*i], d, ops[2 * k].dst, crc) => {
                        self.remember(keys[*i], d, started);
                        Ok(Some(d.payload_len as usize))
                    }
                    (Ok(_), Ok(_)) => {
                        self.count_stale_read();
                        retry.push(*i);
                        continue;
                    }
                });
            }
        }
        for i in retry {
            let (key, dst) = &mut items[i];
            results[i] = Some(self.get_into(key, dst));
        }
        results
            .into_iter()
            .map(|r| r.unwrap_or_else(|| Err(unexpected("lookup"))))
            .collect()
    }
}

/// The two one-sided reads of a block: header, key and padding into `head`, the payload
/// into `payload`.
fn block_reads<'a>(d: &Descriptor, head: &'a mut [u8], payload: &'a mut [u8]) -> [ReadOp<'a>; 2] {
    let at = |offset| RemoteSlice {
        region_id: d.region_id,
        offset,
        remote_key: d.remote_key,
    };
    [
        ReadOp {
            src: at(d.offset),
            dst: head,
        },
        ReadOp {
            src: at(d.offset + u64::from(d.payload_offset)),
            dst: payload,
        },
    ]
}

/// A descriptor is the node's word, but its sizes still bound what this client allocates.
fn check_descriptor(d: &Descriptor) -> Result<()> {
    let plausible = (HEADER_BYTES..=MAX_PAYLOAD_OFFSET + HEADER_BYTES)
        .contains(&(d.payload_offset as usize))
        && d.payload_len as usize <= mooncake_kv_format::MAX_VALUE_BYTES
        && d.block_len == u64::from(d.payload_offset) + u64::from(d.payload_len);
    if plausible {
        Ok(())
    } else {
        Err(FrameError::Malformed(format!("implausible descriptor {d:?}")).into())
    }
}

/// Whether `head` (header, key, padding) and a payload whose CRC32 is `payload_crc` are the
/// block `d` describes, under `key`, whole.
fn verify_with_crc(key: &[u8], d: &Descriptor, head: &[u8], payload_crc: u32) -> bool {
    verify_head(key, d, head).is_some_and(|header| payload_crc == header.payload_crc32)
}

/// The header of `head` (header, key, padding) when it is whole and is the block `d`
/// describes, under `key` ([`format::verify_head`]: the format's one verification).
fn verify_head(key: &[u8], d: &Descriptor, head: &[u8]) -> Option<format::Header> {
    let expected = format::Expected {
        key,
        generation: d.generation,
        payload_len: d.payload_len,
        payload_offset: Some(d.payload_offset),
        payload_crc32: None,
    };
    // The head is read into a buffer of exactly the descriptor's payload offset.
    (head.len() == d.payload_offset as usize)
        .then(|| format::verify_head(head, &expected).ok())
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::{check_descriptor, split_by_bytes, verify_with_crc};
    use crate::proto::Descriptor;
    use mooncake_kv_format as format;

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

    /// Runs of the sizes `sizes` split into `lanes`: their item counts and bytes.
    fn runs(sizes: &[usize], lanes: usize) -> Vec<(usize, usize)> {
        let keys: Vec<Vec<u8>> = (0..sizes.len()).map(|i| vec![i as u8]).collect();
        let mut bufs: Vec<Vec<u8>> = sizes.iter().map(|&n| vec![0; n]).collect();
        let mut items: Vec<(&[u8], &mut [u8])> = keys
            .iter()
            .zip(&mut bufs)
            .map(|(k, b)| (k.as_slice(), b.as_mut_slice()))
            .collect();
        let runs = split_by_bytes(&mut items, lanes);
        // In order, nothing lost or repeated.
        let order: Vec<u8> = runs
            .iter()
            .flat_map(|r| r.iter().map(|(k, _)| k[0]))
            .collect();
        assert_eq!(order, (0..sizes.len() as u8).collect::<Vec<_>>());
        runs.iter()
            .map(|r| (r.len(), r.iter().map(|(_, b)| b.len()).sum()))
            .collect()
    }

    #[test]
    fn a_batch_splits_into_runs_of_about_equal_bytes() {
        assert_eq!(runs(&[1 << 20; 63], 2), [(32, 32 << 20), (31, 31 << 20)]);
        assert_eq!(
            runs(&[1 << 20; 16], 4),
            [(4, 4 << 20), (4, 4 << 20), (4, 4 << 20), (4, 4 << 20)]
        );
        // Bytes, not items: the large one is a run of its own.
        assert_eq!(
            runs(&[8 << 20, 1 << 20, 1 << 20, 1 << 20, 1 << 20], 2),
            [(1, 8 << 20), (4, 4 << 20)]
        );
        // Never an empty run, even when one item holds nearly everything.
        assert_eq!(
            runs(&[1, 100 << 20, 1], 3),
            [(1, 1), (1, 100 << 20), (1, 1)]
        );
        assert_eq!(runs(&[1 << 20; 2], 5), [(1, 1 << 20), (1, 1 << 20)]);
        assert_eq!(runs(&[1 << 20; 3], 1), [(3, 3 << 20)]);
        assert_eq!(runs(&[], 3), [(0, 0)]);
    }
}
