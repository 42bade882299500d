//! The Pythonic API: `Store` (every operation) and the three ways to make one, `Client` (one
//! node), `Cluster` (many, with replicas) and `EmbeddedStore` (the engine in this process).
//!
//! Every call that touches the network or copies a block runs with the interpreter detached
//! (other Python threads run meanwhile); a store is safe to share between threads. Buffers
//! are used where they are (the buffer protocol): a put reads the caller's bytes, a
//! `get_into` writes the value straight into the caller's buffer.

#![expect(unsafe_code, reason = "buffers that Python objects export")]

use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::Arc;
use std::time::Duration;

use mooncake_kv_client::cluster::{ClusterClient, ClusterConfig};
use mooncake_kv_client::membership::{MembershipConfig, StaticConfig};
use mooncake_kv_client::{ChainEnd, Client, ClientConfig, TransportChoice};
use mooncake_kv_format::{MAX_KEY_BYTES, MAX_VALUE_BYTES};
use parking_lot::RwLock;
use pyo3::prelude::*;
use pyo3::types::{PyByteArray, PyBytes, PyDict, PyList, PyString};

use crate::backend::Backend;
use crate::buffer::{Registry, Span, View, disjoint};
use crate::errors::{StoreError, TooLargeError};

/// The bytes of `obj`, a `str` (its UTF-8) or `bytes`; `TypeError` naming `what` otherwise.
pub(crate) fn bytes_of(obj: &Bound<'_, PyAny>, what: &str) -> PyResult<Vec<u8>> {
    if let Ok(text) = obj.cast::<PyString>() {
        Ok(text.to_cow()?.into_owned().into_bytes())
    } else if let Ok(bytes) = obj.cast::<PyBytes>() {
        Ok(bytes.as_bytes().to_vec())
    } else {
        Err(pyo3::exceptions::PyTypeError::new_err(format!(
            "{what} is str or bytes, not {}",
            obj.get_type().name()?
        )))
    }
}

/// A key from Python: `str` (its UTF-8 bytes) or `bytes`, 1 to 1,024 bytes.
pub(crate) fn key_of(obj: &Bound<'_, PyAny>) -> PyResult<Vec<u8>> {
    let key = bytes_of(obj, "a key")?;
    check_key(&key)?;
    Ok(key)
}

/// The store's limits on a key, as an exception.
pub(crate) fn check_key(key: &[u8]) -> PyResult<()> {
    if key.is_empty() {
        return Err(StoreError::invalid("a key cannot be empty").into());
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(TooLargeError::new_err(format!(
            "a key of {} bytes is over the limit of {MAX_KEY_BYTES}",
            key.len()
        )));
    }
    Ok(())
}

/// The store's limit on a value, as an exception.
pub(crate) fn check_value_len(len: usize) -> PyResult<()> {
    if len > MAX_VALUE_BYTES {
        return Err(TooLargeError::new_err(format!(
            "a value of {len} bytes is over the limit of {MAX_VALUE_BYTES}"
        )));
    }
    Ok(())
}

pub(crate) fn keys_of(objs: &[Bound<'_, PyAny>]) -> PyResult<Vec<Vec<u8>>> {
    objs.iter().map(key_of).collect()
}

pub(crate) fn as_slices(keys: &[Vec<u8>]) -> Vec<&[u8]> {
    keys.iter().map(Vec::as_slice).collect()
}

fn same_length(what: &str, a: usize, b: usize) -> PyResult<()> {
    if a != b {
        return Err(StoreError::invalid(format!("{a} keys but {b} {what}")).into());
    }
    Ok(())
}

/// The first error of a batch, raised; else the results.
fn first_error<T>(results: Vec<crate::errors::Result<T>>) -> PyResult<Vec<T>> {
    results
        .into_iter()
        .map(|r| r.map_err(PyErr::from))
        .collect()
}

/// A store: the operations every kind shares. Made by `Client`, `Cluster` or
/// `EmbeddedStore`.
#[pyclass(subclass, frozen, module = "mooncake_kv._native")]
pub(crate) struct Store {
    backend: RwLock<Option<Arc<Backend>>>,
    /// Where it is, for `repr` and `get_hostname`.
    pub(crate) label: String,
    /// Ranges registered for the pointer API (Mooncake's `register_buffer`).
    pub(crate) registry: Registry,
}

impl Store {
    pub(crate) fn new(backend: Backend, label: String) -> Self {
        Self {
            backend: RwLock::new(Some(Arc::new(backend))),
            label,
            registry: Registry::default(),
        }
    }

    /// The backend, unless the store was closed.
    pub(crate) fn backend(&self) -> Result<Arc<Backend>, StoreError> {
        self.backend.read().clone().ok_or_else(StoreError::closed)
    }

    /// Puts values that `views` export, one per key, with the interpreter detached.
    fn put_views(
        &self,
        py: Python<'_>,
        keys: &[Vec<u8>],
        views: &[View],
    ) -> PyResult<Vec<crate::errors::Result<()>>> {
        let backend = self.backend()?;
        let spans: Vec<Span> = views.iter().map(View::span).collect();
        for span in &spans {
            check_value_len(span.len)?;
        }
        Ok(py.detach(|| {
            let items: Vec<(&[u8], &[u8])> = keys
                .iter()
                .zip(&spans)
                // SAFETY: each view (alive until this closure has returned) keeps its
                // object's bytes where they are and unresized; they are only read here.
                .map(|(key, span)| (key.as_slice(), unsafe { span.bytes() }))
                .collect();
            backend.put_batch(&items)
        }))
    }

    /// `op` on the backend and `keys`, with the interpreter detached.
    fn on_keys<T: Send>(
        &self,
        py: Python<'_>,
        keys: &[Bound<'_, PyAny>],
        op: impl FnOnce(&Backend, &[&[u8]]) -> Result<T, StoreError> + Send,
    ) -> PyResult<T> {
        let keys = keys_of(keys)?;
        let backend = self.backend()?;
        Ok(py.detach(|| op(&backend, &as_slices(&keys)))?)
    }

    /// The values of `keys` (`None` for a miss), with the interpreter detached.
    fn values(&self, py: Python<'_>, keys: &[Bound<'_, PyAny>]) -> PyResult<Vec<Option<Vec<u8>>>> {
        let keys = keys_of(keys)?;
        let backend = self.backend()?;
        Ok(py.detach(|| {
            keys.iter()
                .map(|key| backend.get(key))
                .collect::<Result<Vec<_>, StoreError>>()
        })?)
    }

    /// Reads values into the buffers `views` export, one per key, with the interpreter
    /// detached.
    fn get_into_views(
        &self,
        py: Python<'_>,
        keys: &[Vec<u8>],
        views: &[View],
    ) -> PyResult<Vec<crate::errors::Result<Option<usize>>>> {
        let backend = self.backend()?;
        let spans: Vec<Span> = views.iter().map(View::span).collect();
        if !disjoint(&spans) {
            return Err(StoreError::invalid("two of the buffers overlap").into());
        }
        Ok(py.detach(|| {
            let mut items: Vec<(&[u8], &mut [u8])> = keys
                .iter()
                .zip(&spans)
                // SAFETY: each view (alive until this closure has returned) keeps a writable
                // buffer where it is; the spans are disjoint (checked above), so each
                // mutable slice is the only one of its bytes.
                .map(|(key, span)| (key.as_slice(), unsafe { span.bytes_mut() }))
                .collect();
            backend.get_into_batch(&mut items)
        }))
    }
}

#[pymethods]
impl Store {
    /// Stores `value` (any bytes-like object, read where it is) under `key` (str or bytes),
    /// replacing what was there.
    fn put(
        &self,
        py: Python<'_>,
        key: &Bound<'_, PyAny>,
        value: &Bound<'_, PyAny>,
    ) -> PyResult<()> {
        let keys = vec![key_of(key)?];
        let views = vec![View::read(value)?];
        first_error(self.put_views(py, &keys, &views)?).map(drop)
    }

    /// Stores each value under its key in one request. Raises the first item's error, if
    /// any (the others are stored).
    fn put_batch(
        &self,
        py: Python<'_>,
        keys: Vec<Bound<'_, PyAny>>,
        values: Vec<Bound<'_, PyAny>>,
    ) -> PyResult<()> {
        same_length("values", keys.len(), values.len())?;
        let keys = keys_of(&keys)?;
        let views = values
            .iter()
            .map(View::read)
            .collect::<PyResult<Vec<_>>>()?;
        first_error(self.put_views(py, &keys, &views)?).map(drop)
    }

    /// Stores the blocks of one prefix chain in order, the first following `parent` (the key
    /// of the block before them, if any); `partial` says the last block is not full. The
    /// links are hints for eviction (a chain's tail goes before its head).
    #[pyo3(signature = (keys, values, parent=None, partial=false))]
    fn put_chain(
        &self,
        py: Python<'_>,
        keys: Vec<Bound<'_, PyAny>>,
        values: Vec<Bound<'_, PyAny>>,
        parent: Option<&Bound<'_, PyAny>>,
        partial: bool,
    ) -> PyResult<()> {
        same_length("values", keys.len(), values.len())?;
        let keys = keys_of(&keys)?;
        let parent = parent.map(key_of).transpose()?;
        let views = values
            .iter()
            .map(View::read)
            .collect::<PyResult<Vec<_>>>()?;
        let spans: Vec<Span> = views.iter().map(View::span).collect();
        for span in &spans {
            check_value_len(span.len)?;
        }
        let backend = self.backend()?;
        let end = if partial {
            ChainEnd::Partial
        } else {
            ChainEnd::Full
        };
        let results = py.detach(|| {
            let items: Vec<(&[u8], &[u8])> = keys
                .iter()
                .zip(&spans)
                // SAFETY: as in `put_views`: the views outlive this closure.
                .map(|(key, span)| (key.as_slice(), unsafe { span.bytes() }))
                .collect();
            backend.put_chain(parent.as_deref(), &items, end)
        });
        drop(views);
        first_error(results).map(drop)
    }

    /// The value of `key` as `bytes`, or `None` for a miss.
    fn get<'py>(
        &self,
        py: Python<'py>,
        key: &Bound<'py, PyAny>,
    ) -> PyResult<Option<Bound<'py, PyBytes>>> {
        let key = key_of(key)?;
        let backend = self.backend()?;
        let value = py.detach(|| backend.get(&key))?;
        Ok(value.map(|v| PyBytes::new(py, &v)))
    }

    /// The values of `keys` (`None` for each miss).
    fn get_batch<'py>(
        &self,
        py: Python<'py>,
        keys: Vec<Bound<'py, PyAny>>,
    ) -> PyResult<Vec<Option<Bound<'py, PyBytes>>>> {
        let values = self.values(py, &keys)?;
        Ok(values
            .into_iter()
            .map(|v| v.map(|v| PyBytes::new(py, &v)))
            .collect())
    }

    /// Reads the value of `key` straight into `buffer` (any writable, contiguous bytes-like
    /// object: bytearray, memoryview, numpy array, mmap) and returns its length, or `None`
    /// for a miss. A buffer smaller than the value raises `BufferTooSmallError` (nothing is
    /// truncated); bytes past the value's length are left alone.
    fn get_into(
        &self,
        py: Python<'_>,
        key: &Bound<'_, PyAny>,
        buffer: &Bound<'_, PyAny>,
    ) -> PyResult<Option<usize>> {
        let keys = vec![key_of(key)?];
        let views = vec![View::write(buffer)?];
        let mut results = first_error(self.get_into_views(py, &keys, &views)?)?;
        Ok(results.pop().flatten())
    }

    /// `get_into` for many keys, each into its own buffer, in one call. Raises the first
    /// item's error, if any.
    fn get_into_batch(
        &self,
        py: Python<'_>,
        keys: Vec<Bound<'_, PyAny>>,
        buffers: Vec<Bound<'_, PyAny>>,
    ) -> PyResult<Vec<Option<usize>>> {
        same_length("buffers", keys.len(), buffers.len())?;
        let keys = keys_of(&keys)?;
        let views = buffers
            .iter()
            .map(View::write)
            .collect::<PyResult<Vec<_>>>()?;
        first_error(self.get_into_views(py, &keys, &views)?)
    }

    /// Whether `key` has a block.
    fn exists(&self, py: Python<'_>, key: Bound<'_, PyAny>) -> PyResult<bool> {
        let flags = self.on_keys(py, &[key], |b, keys| b.exists(keys))?;
        Ok(flags.first().copied().unwrap_or(false))
    }

    /// Which of `keys` have blocks.
    fn exists_batch(&self, py: Python<'_>, keys: Vec<Bound<'_, PyAny>>) -> PyResult<Vec<bool>> {
        self.on_keys(py, &keys, |b, keys| b.exists(keys))
    }

    /// How many leading keys of the chain `keys` (head first) have blocks: the longest
    /// cached prefix, in one call.
    fn prefix_match(&self, py: Python<'_>, keys: Vec<Bound<'_, PyAny>>) -> PyResult<usize> {
        self.on_keys(py, &keys, |b, keys| b.prefix_match(keys))
    }

    /// Says that the chain `keys` (head first) is over: nothing will extend it or read it
    /// again, so eviction may let it go first. Whether any block of it was held.
    fn end_chain(&self, py: Python<'_>, keys: Vec<Bound<'_, PyAny>>) -> PyResult<bool> {
        self.on_keys(py, &keys, |b, keys| b.end_chain(keys))
    }

    /// Removes the block of `key`; whether there was one.
    fn remove(&self, py: Python<'_>, key: Bound<'_, PyAny>) -> PyResult<bool> {
        let flags = self.on_keys(py, &[key], |b, keys| b.remove(keys))?;
        Ok(flags.first().copied().unwrap_or(false))
    }

    /// Removes the blocks of `keys`; which there were.
    fn remove_batch(&self, py: Python<'_>, keys: Vec<Bound<'_, PyAny>>) -> PyResult<Vec<bool>> {
        self.on_keys(py, &keys, |b, keys| b.remove(keys))
    }

    /// Removes every block (an administrator's reset); how many.
    fn remove_all(&self, py: Python<'_>) -> PyResult<u64> {
        let backend = self.backend()?;
        Ok(py.detach(|| backend.remove_all())?)
    }

    /// Figures: `backend`, `transport`, `tiers` (each with `name`, `blocks`, `used_bytes`,
    /// `capacity_bytes`, `hits`, `evictions`) and the backend's counters.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let backend = self.backend()?;
        let figures = py.detach(|| backend.stats())?;
        let dict = PyDict::new(py);
        dict.set_item("backend", backend.kind())?;
        dict.set_item("transport", backend.transport())?;
        let tiers = PyList::empty(py);
        for tier in figures.tiers {
            let t = PyDict::new(py);
            t.set_item("name", tier.name)?;
            t.set_item("blocks", tier.blocks)?;
            t.set_item("used_bytes", tier.used_bytes)?;
            t.set_item("capacity_bytes", tier.capacity_bytes)?;
            t.set_item("hits", tier.hits)?;
            t.set_item("evictions", tier.evictions)?;
            tiers.append(t)?;
        }
        dict.set_item("tiers", tiers)?;
        for (name, value) in figures.counters {
            dict.set_item(name, value)?;
        }
        Ok(dict)
    }

    /// Closes the store: later calls raise `ClosedError`; calls in flight finish. An
    /// embedded store with a data directory first writes every block to it. Safe to call
    /// more than once.
    fn close(&self, py: Python<'_>) -> PyResult<()> {
        let Some(backend) = self.backend.write().take() else {
            return Ok(());
        };
        py.detach(|| {
            let flushed = backend.flush_before_close();
            drop(backend);
            flushed
        })?;
        Ok(())
    }

    /// Whether `close` was called.
    #[getter]
    fn closed(&self) -> bool {
        self.backend.read().is_none()
    }

    /// `node`, `cluster` or `embedded`.
    #[getter]
    fn kind(&self) -> PyResult<&'static str> {
        Ok(self.backend()?.kind())
    }

    /// The data path reads take: `shm` or `tcp` (a node), `mixed` (a cluster), `local`
    /// (embedded).
    #[getter]
    fn transport(&self) -> PyResult<&'static str> {
        Ok(self.backend()?.transport())
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (*_args))]
    fn __exit__(&self, py: Python<'_>, _args: &Bound<'_, pyo3::types::PyTuple>) -> PyResult<()> {
        self.close(py)
    }

    fn __repr__(&self) -> String {
        match self.backend.read().as_deref() {
            Some(backend) => format!("<mooncake_kv {} store {}>", backend.kind(), self.label),
            None => format!("<mooncake_kv store {} (closed)>", self.label),
        }
    }

    /// The values of `keys` as `bytearray`s (`None` for each miss).
    fn _get_bytearrays<'py>(
        &self,
        py: Python<'py>,
        keys: Vec<Bound<'py, PyAny>>,
    ) -> PyResult<Vec<Option<Bound<'py, PyByteArray>>>> {
        let values = self.values(py, &keys)?;
        Ok(values
            .into_iter()
            .map(|v| v.map(|v| PyByteArray::new(py, &v)))
            .collect())
    }
}

fn transport_of(name: &str) -> PyResult<TransportChoice> {
    match name {
        "auto" => Ok(TransportChoice::Auto),
        "shm" => Ok(TransportChoice::Shm),
        "tcp" => Ok(TransportChoice::Tcp),
        other => Err(StoreError::invalid(format!(
            "transport {other:?}: one of \"auto\", \"shm\", \"tcp\""
        ))
        .into()),
    }
}

fn seconds(what: &str, value: f64) -> PyResult<Duration> {
    Duration::try_from_secs_f64(value)
        .ok()
        .filter(|d| !d.is_zero())
        .ok_or_else(|| {
            StoreError::invalid(format!("{what} of {value} s: a positive number")).into()
        })
}

fn token_of(token: Option<&Bound<'_, PyAny>>) -> PyResult<Option<Vec<u8>>> {
    token.map(|t| bytes_of(t, "a token")).transpose()
}

/// How to reach nodes, from the keyword arguments `Client` and `Cluster` share.
pub(crate) fn client_config(
    token: Option<&Bound<'_, PyAny>>,
    transport: &str,
    timeout: f64,
    connections: usize,
    batch_lanes: Option<usize>,
) -> PyResult<ClientConfig> {
    if connections == 0 || connections > 1024 {
        return Err(
            StoreError::invalid(format!("connections = {connections}: from 1 to 1024")).into(),
        );
    }
    let defaults = ClientConfig::default();
    let batch_lanes = batch_lanes.unwrap_or(defaults.batch_lanes);
    if batch_lanes == 0 || batch_lanes > 1024 {
        return Err(
            StoreError::invalid(format!("batch_lanes = {batch_lanes}: from 1 to 1024")).into(),
        );
    }
    Ok(ClientConfig {
        token: token_of(token)?,
        timeout: seconds("timeout", timeout)?,
        connections,
        transport: transport_of(transport)?,
        batch_lanes,
        ..defaults
    })
}

/// Connects to one node, with the interpreter detached.
pub(crate) fn connect_node(py: Python<'_>, address: &str, config: ClientConfig) -> PyResult<Store> {
    let client = py
        .detach(|| Client::connect(address, config))
        .map_err(StoreError::from)?;
    Ok(Store::new(Backend::Node(client), address.to_owned()))
}

/// Starts a cluster client over static peers or etcd endpoints.
pub(crate) fn connect_cluster(
    py: Python<'_>,
    peers: &[String],
    etcd: Option<(Vec<String>, String)>,
    replicas: usize,
    write_quorum: Option<usize>,
    client: ClientConfig,
) -> PyResult<Store> {
    let membership: MembershipConfig = match (peers.is_empty(), etcd) {
        (false, None) => {
            let peers = peers
                .iter()
                .map(|p| {
                    p.to_socket_addrs()
                        .ok()
                        .and_then(|mut a| a.next())
                        .ok_or_else(|| StoreError::invalid(format!("peer address {p:?}")))
                })
                .collect::<Result<Vec<SocketAddr>, StoreError>>()?;
            StaticConfig {
                peers,
                token: client.token.clone(),
                ..StaticConfig::default()
            }
            .into()
        }
        (true, Some((endpoints, prefix))) => etcd_membership(endpoints, prefix)?,
        _ => {
            return Err(StoreError::invalid("give either peers or etcd endpoints").into());
        }
    };
    let label = if peers.is_empty() {
        "etcd".to_owned()
    } else {
        peers.join(",")
    };
    let config = ClusterConfig {
        membership,
        replication_factor: replicas,
        write_quorum: write_quorum.unwrap_or(replicas),
        client,
    };
    let cluster = py
        .detach(|| ClusterClient::new(config))
        .map_err(StoreError::from)?;
    Ok(Store::new(Backend::Cluster(cluster), label))
}

#[cfg(feature = "etcd")]
fn etcd_membership(endpoints: Vec<String>, prefix: String) -> PyResult<MembershipConfig> {
    Ok(mooncake_kv_client::membership::EtcdConfig {
        endpoints,
        prefix,
        ..Default::default()
    }
    .into())
}

#[cfg(not(feature = "etcd"))]
fn etcd_membership(_endpoints: Vec<String>, _prefix: String) -> PyResult<MembershipConfig> {
    Err(StoreError::invalid("this build has no etcd support (the `etcd` feature)").into())
}

/// The engine in this process. `hbm` is the HBM tier's (device, bytes), if any.
#[cfg(feature = "embedded")]
pub(crate) fn open_embedded(
    py: Python<'_>,
    dram_bytes: u64,
    data_dir: Option<std::path::PathBuf>,
    nvme_bytes: Option<u64>,
    hbm: Option<(usize, u64)>,
) -> PyResult<Store> {
    let mut config = mooncake_kv_engine::EngineConfig {
        dram_capacity_bytes: dram_bytes,
        data_dir: data_dir.clone(),
        hbm: hbm.map(|(device, capacity_bytes)| mooncake_kv_engine::HbmSettings {
            device,
            capacity_bytes,
            ..Default::default()
        }),
        ..Default::default()
    };
    if let Some(nvme) = nvme_bytes {
        config.nvme_capacity_bytes = nvme;
    }
    let engine = py
        .detach(|| mooncake_kv_engine::Engine::open(config))
        .map_err(StoreError::from)?;
    let label = match data_dir {
        Some(dir) => format!("in process, {}", dir.display()),
        None => "in process".to_owned(),
    };
    Ok(Store::new(Backend::Embedded(engine), label))
}

#[cfg(not(feature = "embedded"))]
pub(crate) fn open_embedded(
    _py: Python<'_>,
    _dram_bytes: u64,
    _data_dir: Option<std::path::PathBuf>,
    _nvme_bytes: Option<u64>,
    _hbm: Option<(usize, u64)>,
) -> PyResult<Store> {
    Err(StoreError::invalid(
        "this build has no embedded store (the `embedded` feature): connect to a mooncake-kvd",
    )
    .into())
}

/// A store on one `mooncake-kvd` node.
///
/// `Client(address, token=None, transport="auto", timeout=5.0, connections=4,
/// batch_lanes=None)`: `address` is the node's control address (`host:port`); `transport`
/// is how reads travel: `"auto"` (shared memory when the node is on this host, else tcp),
/// `"shm"` or `"tcp"`. Over tcp a batch with at least 4 MiB of buffers per connection is read
/// over up to `batch_lanes` connections at once (default: this machine's cores).
#[pyclass(extends = Store, frozen, name = "Client", module = "mooncake_kv._native")]
pub(crate) struct NodeClient;

#[pymethods]
impl NodeClient {
    #[new]
    #[pyo3(signature = (address, *, token=None, transport="auto", timeout=5.0, connections=4,
        batch_lanes=None))]
    fn new(
        py: Python<'_>,
        address: &str,
        token: Option<&Bound<'_, PyAny>>,
        transport: &str,
        timeout: f64,
        connections: usize,
        batch_lanes: Option<usize>,
    ) -> PyResult<PyClassInitializer<Self>> {
        let config = client_config(token, transport, timeout, connections, batch_lanes)?;
        Ok(PyClassInitializer::from(connect_node(py, address, config)?).add_subclass(Self))
    }
}

/// A store over a cluster of nodes, each block on `replicas` of them.
///
/// `Cluster(peers=None, *, etcd=None, etcd_prefix="/mooncake/members/", replicas=2,
/// write_quorum=None, token=None, transport="auto", timeout=5.0, connections=4,
/// batch_lanes=None)`: the
/// members are the static `peers` (`host:port` each) or those registered in etcd at
/// `etcd` (endpoint URLs). A put is acknowledged once `write_quorum` (default: all)
/// replicas hold it; reads fail over.
#[pyclass(extends = Store, frozen, module = "mooncake_kv._native")]
pub(crate) struct Cluster;

#[pymethods]
impl Cluster {
    #[new]
    #[pyo3(signature = (peers=None, *, etcd=None, etcd_prefix="/mooncake/members/", replicas=2,
        write_quorum=None, token=None, transport="auto", timeout=5.0, connections=4,
        batch_lanes=None))]
    #[expect(clippy::too_many_arguments, reason = "Python keyword arguments")]
    fn new(
        py: Python<'_>,
        peers: Option<Vec<String>>,
        etcd: Option<Vec<String>>,
        etcd_prefix: &str,
        replicas: usize,
        write_quorum: Option<usize>,
        token: Option<&Bound<'_, PyAny>>,
        transport: &str,
        timeout: f64,
        connections: usize,
        batch_lanes: Option<usize>,
    ) -> PyResult<PyClassInitializer<Self>> {
        let config = client_config(token, transport, timeout, connections, batch_lanes)?;
        let etcd = etcd.map(|endpoints| (endpoints, etcd_prefix.to_owned()));
        let store = connect_cluster(
            py,
            &peers.unwrap_or_default(),
            etcd,
            replicas,
            write_quorum,
            config,
        )?;
        Ok(PyClassInitializer::from(store).add_subclass(Self))
    }
}

/// The store's engine in this process: no server at all.
///
/// `EmbeddedStore(dram_bytes=1 << 30, *, data_dir=None, nvme_bytes=None, hbm_bytes=None,
/// hbm_device=0)`: `dram_bytes` of memory (a multiple of 4 KiB, at least 1 MiB); with
/// `data_dir`, blocks are demoted to a preallocated NVMe file of `nvme_bytes` (default 4 GiB)
/// there and persist across restarts; with `hbm_bytes`, an HBM tier of that much memory of
/// CUDA device `hbm_device` above DRAM (puts land there first), which needs a wheel built
/// with the `cuda` feature and an NVIDIA driver.
#[pyclass(extends = Store, frozen, module = "mooncake_kv._native")]
pub(crate) struct EmbeddedStore;

#[pymethods]
impl EmbeddedStore {
    #[new]
    #[pyo3(signature = (dram_bytes=1 << 30, *, data_dir=None, nvme_bytes=None, hbm_bytes=None,
                        hbm_device=0))]
    fn new(
        py: Python<'_>,
        dram_bytes: u64,
        data_dir: Option<std::path::PathBuf>,
        nvme_bytes: Option<u64>,
        hbm_bytes: Option<u64>,
        hbm_device: usize,
    ) -> PyResult<PyClassInitializer<Self>> {
        let hbm = hbm_bytes.map(|capacity_bytes| (hbm_device, capacity_bytes));
        let store = open_embedded(py, dram_bytes, data_dir, nvme_bytes, hbm)?;
        Ok(PyClassInitializer::from(store).add_subclass(Self))
    }

    /// Reads the value of `key` straight into GPU memory: `ptr` is a device address on the
    /// HBM tier's GPU (a CUDA tensor's `data_ptr()`) with `size` bytes there. Returns the
    /// value's length, or `None` for a miss. A block in the HBM tier is copied within the
    /// device; one in DRAM or on NVMe is copied up from the host. Verified as every read is.
    /// Needs the HBM tier (`hbm_bytes`). The store cannot check a device address: the
    /// `size` bytes at `ptr` must be device memory of that GPU that nothing else uses during
    /// the call (as for any raw device pointer handed to a CUDA library).
    fn get_into_device(
        slf: PyRef<'_, Self>,
        py: Python<'_>,
        key: &Bound<'_, PyAny>,
        ptr: u64,
        size: u64,
    ) -> PyResult<Option<usize>> {
        let keys = vec![key_of(key)?];
        let mut results = first_error(device_reads(slf.as_super(), py, &keys, &[ptr], &[size])?)?;
        Ok(results.pop().flatten())
    }

    /// `get_into_device` for many keys, each into its own device range (the ranges must not
    /// overlap), in one call. Raises the first item's error, if any.
    fn get_into_device_batch(
        slf: PyRef<'_, Self>,
        py: Python<'_>,
        keys: Vec<Bound<'_, PyAny>>,
        ptrs: Vec<u64>,
        sizes: Vec<u64>,
    ) -> PyResult<Vec<Option<usize>>> {
        same_length("pointers", keys.len(), ptrs.len())?;
        same_length("sizes", keys.len(), sizes.len())?;
        let keys = keys_of(&keys)?;
        first_error(device_reads(slf.as_super(), py, &keys, &ptrs, &sizes)?)
    }
}

/// The reads of [`EmbeddedStore::get_into_device_batch`], one result per key.
#[cfg(feature = "embedded")]
fn device_reads(
    store: &Store,
    py: Python<'_>,
    keys: &[Vec<u8>],
    ptrs: &[u64],
    sizes: &[u64],
) -> PyResult<Vec<crate::errors::Result<Option<usize>>>> {
    use mooncake_kv_engine::DeviceRange;

    let backend = store.backend()?;
    let Backend::Embedded(engine) = &*backend else {
        return Err(StoreError::invalid("device reads need the engine in this process").into());
    };
    let mut targets = Vec::with_capacity(ptrs.len());
    for (&ptr, &len) in ptrs.iter().zip(sizes) {
        if ptr == 0 {
            return Err(StoreError::invalid("a device pointer cannot be 0").into());
        }
        if ptr.checked_add(len).is_none() {
            return Err(StoreError::invalid("a device range wraps around").into());
        }
        let (Ok(addr), Ok(len)) = (usize::try_from(ptr), usize::try_from(len)) else {
            return Err(StoreError::invalid("a device range past this machine's addresses").into());
        };
        targets.push(Span { addr, len });
    }
    if !disjoint(&targets) {
        return Err(StoreError::invalid("two of the device ranges overlap").into());
    }
    Ok(py.detach(|| {
        keys.iter()
            .zip(ptrs.iter().zip(sizes))
            .map(|(key, (&ptr, &len))| {
                // SAFETY: the range is device memory of the tier's GPU that nothing else uses
                // during the call: the caller's promise, stated in the method's documentation
                // (a device address cannot be checked from the host); the ranges do not
                // overlap (checked above), so no two reads write the same bytes.
                unsafe { engine.get_into_device(key, DeviceRange { ptr, len }) }
                    .map_err(StoreError::from)
            })
            .collect()
    }))
}

#[cfg(not(feature = "embedded"))]
fn device_reads(
    _store: &Store,
    _py: Python<'_>,
    _keys: &[Vec<u8>],
    _ptrs: &[u64],
    _sizes: &[u64],
) -> PyResult<Vec<crate::errors::Result<Option<usize>>>> {
    Err(StoreError::invalid("this build has no embedded store (the `embedded` feature)").into())
}
