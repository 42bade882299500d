//! What `mooncake_kv.mooncake.MooncakeDistributedStore` needs natively: Mooncake's pointer
//! API (raw addresses checked against registered ranges) and its numeric return codes, one
//! per key, never an exception for a bad key, pointer or size.

#![expect(unsafe_code, reason = "raw addresses inside registered ranges")]

use std::borrow::Cow;

use mooncake_kv_format::{MAX_KEY_BYTES, MAX_VALUE_BYTES};
use pyo3::prelude::*;

use crate::backend::Backend;
use crate::buffer::{Span, View, disjoint};
use crate::errors::{Kind, StoreError, code};
use crate::store::{Store, bytes_of};

/// A key from Mooncake's API: `str` or `bytes` (any other type raises `TypeError`, as
/// Mooncake's binding does); one the store cannot take is that key's `INVALID_PARAMS`.
fn key_code(obj: &Bound<'_, PyAny>) -> PyResult<Result<Vec<u8>, i64>> {
    let key = bytes_of(obj, "a key")?;
    if key.is_empty() || key.len() > MAX_KEY_BYTES {
        return Ok(Err(code::INVALID_PARAMS));
    }
    Ok(Ok(key))
}

fn keys_codes(objs: &[Bound<'_, PyAny>]) -> PyResult<Vec<Result<Vec<u8>, i64>>> {
    objs.iter().map(key_code).collect()
}

fn backend(store: &Store) -> Result<std::sync::Arc<Backend>, i64> {
    store.backend().map_err(|e| e.kind.code())
}

/// Each key's pieces as spans, from parallel lists of addresses and sizes.
fn pieces(ptrs: Vec<Vec<usize>>, sizes: Vec<Vec<usize>>) -> Vec<Result<Vec<Span>, i64>> {
    ptrs.into_iter()
        .zip(sizes)
        .map(|(ptrs, sizes)| {
            if ptrs.len() != sizes.len() || ptrs.is_empty() {
                return Err(code::INVALID_PARAMS);
            }
            Ok(ptrs
                .into_iter()
                .zip(sizes)
                .map(|(addr, len)| Span { addr, len })
                .collect())
        })
        .collect()
}

fn check_lengths(keys: usize, ptrs: usize, sizes: usize) -> PyResult<()> {
    if keys != ptrs || keys != sizes {
        return Err(pyo3::exceptions::PyValueError::new_err(format!(
            "{keys} keys, {ptrs} pointer lists and {sizes} size lists"
        )));
    }
    Ok(())
}

/// Puts one value per key, gathered from its pieces (read where they are when there is one
/// piece, copied together when there are several); with `if_absent`, keys that exist are
/// left as they are and answered 0 (Mooncake's put). `readable` says whether a piece may be
/// read (inside a registered range, or a live buffer view). One code per key.
fn put_pieces(
    backend: &Backend,
    keys: &[Result<Vec<u8>, i64>],
    pieces: &[Result<Vec<Span>, i64>],
    if_absent: bool,
    readable: &dyn Fn(Span) -> bool,
) -> Vec<i64> {
    let mut codes: Vec<i64> = keys
        .iter()
        .zip(pieces)
        .map(|(key, pieces)| match (key, pieces) {
            (Err(code), _) | (_, Err(code)) => *code,
            (Ok(_), Ok(pieces)) => {
                let total = pieces.iter().try_fold(0usize, |t, p| t.checked_add(p.len));
                if !pieces.iter().all(|&p| readable(p)) || total.is_none_or(|t| t > MAX_VALUE_BYTES)
                {
                    code::INVALID_PARAMS
                } else {
                    code::OK
                }
            }
        })
        .collect();
    let mut todo: Vec<usize> = (0..keys.len()).filter(|&i| codes[i] == code::OK).collect();
    if if_absent && !todo.is_empty() {
        let asked: Vec<&[u8]> = todo
            .iter()
            .filter_map(|&i| keys[i].as_ref().ok().map(Vec::as_slice))
            .collect();
        match backend.exists(&asked) {
            Ok(flags) => {
                todo = todo
                    .into_iter()
                    .zip(flags)
                    .filter_map(|(i, present)| (!present).then_some(i))
                    .collect();
            }
            Err(error) => {
                for &i in &todo {
                    codes[i] = error.kind.code();
                }
                return codes;
            }
        }
    }
    let values: Vec<Cow<'_, [u8]>> = todo
        .iter()
        .map(|&i| match &pieces[i] {
            // SAFETY: every piece was checked `readable` (inside a range the caller holds
            // registered, or a buffer view alive for this call); it is only read.
            Ok(p) if p.len() == 1 => Cow::Borrowed(unsafe { p[0].bytes() }),
            // SAFETY: as above.
            Ok(p) => Cow::Owned(
                p.iter()
                    .flat_map(|s| unsafe { s.bytes() })
                    .copied()
                    .collect(),
            ),
            Err(_) => Cow::Borrowed(&[][..]),
        })
        .collect();
    let items: Vec<(&[u8], &[u8])> = todo
        .iter()
        .zip(&values)
        .filter_map(|(&i, v)| keys[i].as_ref().ok().map(|k| (k.as_slice(), v.as_ref())))
        .collect();
    for (&i, result) in todo.iter().zip(backend.put_batch(&items)) {
        codes[i] = result.map_or_else(|e| e.kind.code(), |()| code::OK);
    }
    codes
}

/// Reads each key's value into its pieces: straight into a single piece (or pieces that
/// follow each other in memory), else through a buffer scattered over them. Each answer is
/// the value's length, or a negative code (`OBJECT_NOT_FOUND` for a miss,
/// `BUFFER_OVERFLOW` when the pieces are smaller than the value).
fn get_pieces(
    backend: &Backend,
    keys: &[Result<Vec<u8>, i64>],
    pieces: &[Result<Vec<Span>, i64>],
    writable: &dyn Fn(Span) -> bool,
) -> Vec<i64> {
    let mut codes = vec![code::OK; keys.len()];
    // One span per key when its pieces are contiguous.
    let mut direct: Vec<(usize, Span)> = Vec::new();
    let mut scattered: Vec<usize> = Vec::new();
    for (i, (key, pieces)) in keys.iter().zip(pieces).enumerate() {
        match (key, pieces) {
            (Err(c), _) | (_, Err(c)) => codes[i] = *c,
            (Ok(_), Ok(pieces)) if !pieces.iter().all(|&p| writable(p)) => {
                codes[i] = code::INVALID_PARAMS;
            }
            (Ok(_), Ok(pieces)) => match merged(pieces) {
                Some(span) => direct.push((i, span)),
                None => scattered.push(i),
            },
        }
    }
    let all: Vec<Span> = direct
        .iter()
        .map(|&(_, s)| s)
        .chain(
            scattered
                .iter()
                .flat_map(|&i| pieces[i].iter().flatten().copied()),
        )
        .collect();
    if !disjoint(&all) {
        // Writing into the same bytes twice at once: refuse the whole batch.
        return vec![code::INVALID_PARAMS; keys.len()];
    }
    let mut items: Vec<(&[u8], &mut [u8])> = direct
        .iter()
        .filter_map(|&(i, span)| {
            let key = keys[i].as_ref().ok()?;
            // SAFETY: the span is writable memory the caller registered (held registered
            // for this call) or a live writable buffer view, and disjoint from every other
            // span written in this call (checked above).
            Some((key.as_slice(), unsafe { span.bytes_mut() }))
        })
        .collect();
    for (&(i, _), result) in direct.iter().zip(backend.get_into_batch(&mut items)) {
        codes[i] = read_code(result);
    }
    for i in scattered {
        let (Ok(key), Ok(pieces)) = (&keys[i], &pieces[i]) else {
            continue;
        };
        let room: usize = pieces.iter().map(|p| p.len).sum();
        codes[i] = match backend.get(key) {
            Ok(Some(value)) if value.len() <= room => {
                let mut rest = value.as_slice();
                for piece in pieces {
                    let n = piece.len.min(rest.len());
                    // SAFETY: as for the direct spans above.
                    let dst = unsafe { piece.bytes_mut() };
                    dst[..n].copy_from_slice(&rest[..n]);
                    rest = &rest[n..];
                }
                value.len() as i64
            }
            Ok(Some(_)) => code::BUFFER_OVERFLOW,
            Ok(None) => code::OBJECT_NOT_FOUND,
            Err(error) => error.kind.code(),
        };
    }
    codes
}

fn read_code(result: Result<Option<usize>, StoreError>) -> i64 {
    match result {
        Ok(Some(len)) => len as i64,
        Ok(None) => code::OBJECT_NOT_FOUND,
        Err(error) if error.kind == Kind::BufferTooSmall => code::BUFFER_OVERFLOW,
        Err(error) => error.kind.code(),
    }
}

/// The pieces as one span, when each starts where the one before ends.
fn merged(pieces: &[Span]) -> Option<Span> {
    let first = *pieces.first()?;
    let mut end = first.addr.checked_add(first.len)?;
    for piece in &pieces[1..] {
        if piece.addr != end {
            return None;
        }
        end = end.checked_add(piece.len)?;
    }
    Some(Span {
        addr: first.addr,
        len: end - first.addr,
    })
}

/// `register_buffer(ptr, size)`: 0, or `INVALID_PARAMS`.
#[pyfunction]
pub(crate) fn _register(store: &Bound<'_, Store>, ptr: usize, size: usize) -> i64 {
    match store.get().registry.register(ptr, size) {
        Ok(()) => code::OK,
        Err(error) => error.kind.code(),
    }
}

/// `unregister_buffer(ptr)`: 0 once no call uses the range, or `INVALID_PARAMS`.
#[pyfunction]
pub(crate) fn _unregister(py: Python<'_>, store: &Bound<'_, Store>, ptr: usize) -> i64 {
    let store = store.get();
    match py.detach(|| store.registry.unregister(ptr)) {
        Ok(()) => code::OK,
        Err(error) => error.kind.code(),
    }
}

/// Runs `op` on the keys and their pieces (raw addresses) with the interpreter detached and
/// the registrations held: what `_put_from` and `_get_into` share.
fn with_pointers(
    py: Python<'_>,
    store: &Bound<'_, Store>,
    keys: &[Bound<'_, PyAny>],
    ptrs: Vec<Vec<usize>>,
    sizes: Vec<Vec<usize>>,
    op: impl FnOnce(
        &Backend,
        &[Result<Vec<u8>, i64>],
        &[Result<Vec<Span>, i64>],
        &dyn Fn(Span) -> bool,
    ) -> Vec<i64>
    + Send,
) -> PyResult<Vec<i64>> {
    check_lengths(keys.len(), ptrs.len(), sizes.len())?;
    let keys = keys_codes(keys)?;
    let pieces = pieces(ptrs, sizes);
    let store = store.get();
    let backend = match backend(store) {
        Ok(b) => b,
        Err(c) => return Ok(vec![c; keys.len()]),
    };
    Ok(py.detach(|| {
        store
            .registry
            .with(|inside| op(&backend, &keys, &pieces, inside))
    }))
}

/// `batch_put_from[_multi_buffers]`: one value per key from registered memory.
#[pyfunction]
pub(crate) fn _put_from(
    py: Python<'_>,
    store: &Bound<'_, Store>,
    keys: Vec<Bound<'_, PyAny>>,
    ptrs: Vec<Vec<usize>>,
    sizes: Vec<Vec<usize>>,
    if_absent: bool,
) -> PyResult<Vec<i64>> {
    with_pointers(
        py,
        store,
        &keys,
        ptrs,
        sizes,
        |backend, keys, pieces, inside| put_pieces(backend, keys, pieces, if_absent, inside),
    )
}

/// `batch_get_into[_multi_buffers]`: one value per key into registered memory.
#[pyfunction]
pub(crate) fn _get_into(
    py: Python<'_>,
    store: &Bound<'_, Store>,
    keys: Vec<Bound<'_, PyAny>>,
    ptrs: Vec<Vec<usize>>,
    sizes: Vec<Vec<usize>>,
) -> PyResult<Vec<i64>> {
    with_pointers(py, store, &keys, ptrs, sizes, get_pieces)
}

/// `put` and `put_parts`: one value per key, the concatenation of its buffers (any
/// bytes-like objects).
#[pyfunction]
pub(crate) fn _put_buffers(
    py: Python<'_>,
    store: &Bound<'_, Store>,
    keys: Vec<Bound<'_, PyAny>>,
    parts: Vec<Vec<Bound<'_, PyAny>>>,
    if_absent: bool,
) -> PyResult<Vec<i64>> {
    check_lengths(keys.len(), parts.len(), parts.len())?;
    let keys = keys_codes(&keys)?;
    let views: Vec<Vec<View>> = parts
        .iter()
        .map(|p| p.iter().map(View::read).collect::<PyResult<Vec<_>>>())
        .collect::<PyResult<_>>()?;
    let pieces: Vec<Result<Vec<Span>, i64>> = views
        .iter()
        .map(|v| Ok(v.iter().map(View::span).collect()))
        .collect();
    let store = store.get();
    let backend = match backend(store) {
        Ok(b) => b,
        Err(c) => return Ok(vec![c; keys.len()]),
    };
    // Every span is a live view's (they are dropped after this returns).
    let codes = py.detach(|| put_pieces(&backend, &keys, &pieces, if_absent, &|_| true));
    drop(views);
    Ok(codes)
}

/// `batch_is_exist`: 1, 0, or -1 (an error, or a key the store cannot take) per key.
#[pyfunction]
pub(crate) fn _exists(
    py: Python<'_>,
    store: &Bound<'_, Store>,
    keys: Vec<Bound<'_, PyAny>>,
) -> PyResult<Vec<i64>> {
    let keys = keys_codes(&keys)?;
    let Ok(backend) = backend(store.get()) else {
        return Ok(vec![-1; keys.len()]);
    };
    let valid: Vec<&[u8]> = keys
        .iter()
        .filter_map(|k| k.as_ref().ok().map(Vec::as_slice))
        .collect();
    let flags = py.detach(|| backend.exists(&valid));
    let Ok(flags) = flags else {
        return Ok(vec![-1; keys.len()]);
    };
    let mut flags = flags.into_iter();
    Ok(keys
        .iter()
        .map(|k| match k {
            Ok(_) => i64::from(flags.next().unwrap_or(false)),
            Err(_) => -1,
        })
        .collect())
}
