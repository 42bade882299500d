"""Mooncake Store's Python class, on this store: ``MooncakeDistributedStore`` and
``ReplicateConfig`` with the surface SGLang, LMCache and vLLM call (``INTEROP.md`` section
7), Mooncake's return conventions (0 or a negative code per key; ``get`` returns ``b""`` on
a miss) and its numeric codes:

====== ======================= =====================================================
code   Mooncake's name         when
====== ======================= =====================================================
0      OK
-1     INTERNAL_ERROR          anything else (the log says what)
-10    BUFFER_OVERFLOW         a buffer smaller than the value (never truncated)
-200   NO_AVAILABLE_HANDLE     no space, even after eviction
-600   INVALID_PARAMS          a bad key, size, or pointer outside registered buffers
-704   OBJECT_NOT_FOUND        a miss
-801   CHECKSUM_MISMATCH       a block that failed verification
-900   RPC_FAIL                the node cannot be reached, or refused the token
-1010  UNAVAILABLE_IN_CURRENT_STATUS  not set up, or closed
====== ======================= =====================================================

``setup``'s ``master_server_addr`` names what to use (the metadata server, local hostname,
RDMA devices and transfer engine mean nothing here and are ignored):

- ``"host:port"``: one ``mooncake-kvd`` (its control address);
- ``"host:port,host:port,..."``: a cluster of static peers (2 replicas, or fewer peers);
- ``"etcd://host:port[,host:port]/prefix"``: a cluster registered in etcd;
- ``"embedded"``: the store in this process, with ``global_segment_size`` bytes of DRAM
  (default 1 GiB) and, when ``enable_ssd_offload``, ``ssd_offload_path`` as its data
  directory.

Each may start with ``mooncake-kv://``; ``token@`` before the address, or the environment
variable ``MOONCAKE_KV_TOKEN``, gives the node's token. ``protocol`` ``"tcp"`` and
``"rdma"`` mean the fastest verified path (shared memory when the node is on this host, else
tcp); ``MOONCAKE_KV_TRANSPORT`` (``auto``, ``shm``, ``tcp``) forces one.

Raw pointers (``put_from``, ``batch_get_into``, ...) must lie inside a range given to
``register_buffer``: any other is ``-600``, never a crash. They are host addresses (CUDA
device pointers are not supported).
"""

from __future__ import annotations

import logging
import os
import re
import socket
import threading
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

from . import _native

__all__ = ["MooncakeDistributedStore", "ReplicateConfig"]

log = logging.getLogger("mooncake_kv.mooncake")

OK = 0
INTERNAL_ERROR = -1
BUFFER_OVERFLOW = -10
NO_AVAILABLE_HANDLE = -200
INVALID_PARAMS = -600
OBJECT_NOT_FOUND = -704
RPC_FAIL = -900
UNAVAILABLE_IN_CURRENT_STATUS = -1010

_POSITIONAL = (
    "local_hostname",
    "metadata_server",
    "global_segment_size",
    "local_buffer_size",
    "protocol",
    "rdma_devices",
    "master_server_addr",
    "engine",
)
_KEYWORD_ONLY = (
    "enable_ssd_offload",
    "ssd_offload_path",
    "tenant_id",
    "enable_client_http_server",
    "client_http_port",
)
# Spellings the dict form also takes: LMCache forwards its legacy keys as they are.
_ALIASES = {
    "master_server_address": "master_server_addr",
    "device_name": "rdma_devices",
}
_DICT_ONLY = ("ipc_socket_path",)


def _code_of(error: BaseException) -> int:
    return int(getattr(error, "mooncake_code", INTERNAL_ERROR))


def _size(value: Any, name: str) -> int:
    """A size: an int, or a string such as ``"3355443200"``, ``"4gb"``, ``"16 MiB"``."""
    if isinstance(value, bool):
        raise ValueError(f"{name}: not a size: {value!r}")
    if isinstance(value, int):
        size = value
    else:
        m = re.fullmatch(r"\s*(\d+)\s*([kmgt]?)i?b?\s*", str(value), re.IGNORECASE)
        if not m:
            raise ValueError(f"{name}: not a size: {value!r}")
        size = int(m.group(1)) * 1024 ** "_kmgt".index(m.group(2).lower() or "_")
    if size < 0:
        raise ValueError(f"{name}: negative: {value!r}")
    return size


def _flag(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


class ReplicateConfig:
    """Mooncake's per-put placement settings. Accepted and kept; a cluster's replica count
    is fixed when it is set up, and placement is by key, so none of these changes where a
    block goes."""

    def __init__(self) -> None:
        self.replica_num: int = 1
        self.nof_replica_num: int = 0
        self.dfs_replica_num: int = 0
        self.with_soft_pin: bool = False
        self.with_hard_pin: bool = False
        self.preferred_segment: str = ""
        self.preferred_segments: List[str] = []
        self.prefer_alloc_in_same_node: bool = False
        self.group_ids: Optional[List[str]] = None

    def __repr__(self) -> str:
        return (
            f"ReplicateConfig(replica_num={self.replica_num}, "
            f"preferred_segment={self.preferred_segment!r})"
        )


class MooncakeDistributedStore:
    """Mooncake Store's client class, on a ``mooncake-kvd`` node, a cluster, or a store in
    this process. Safe to share between threads; every data call releases the GIL."""

    def __init__(self) -> None:
        self._store: Optional[_native.Store] = None
        self._hostname = ""
        self._lock = threading.Lock()

    # -- setting up -----------------------------------------------------------------------

    def setup(self, *args: Any, **kwargs: Any) -> int:
        """``setup(local_hostname, metadata_server, global_segment_size, local_buffer_size,
        protocol, rdma_devices, master_server_addr, engine=None, *, enable_ssd_offload=False,
        ssd_offload_path="", tenant_id="default", enable_client_http_server=False,
        client_http_port=9300)``, or ``setup(config: dict)``. Returns 0, or a negative
        code (the log says why). An unknown keyword raises ``TypeError`` naming it."""
        if len(args) == 1 and isinstance(args[0], dict) and not kwargs:
            settings = self._from_dict(args[0])
        else:
            settings = self._from_arguments(args, kwargs)
        return self._connect(settings)

    @staticmethod
    def _from_arguments(args: Sequence[Any], kwargs: Dict[str, Any]) -> Dict[str, Any]:
        if len(args) > len(_POSITIONAL):
            raise TypeError(
                f"setup() takes at most {len(_POSITIONAL)} positional arguments "
                f"({len(args)} given)"
            )
        settings = dict(zip(_POSITIONAL, args))
        for name, value in kwargs.items():
            if name not in _POSITIONAL and name not in _KEYWORD_ONLY:
                raise TypeError(f"setup() got an unexpected keyword argument '{name}'")
            if name in settings:
                raise TypeError(f"setup() got multiple values for argument '{name}'")
            settings[name] = value
        return settings

    @staticmethod
    def _from_dict(config: Dict[str, Any]) -> Dict[str, Any]:
        settings: Dict[str, Any] = {}
        for name, value in config.items():
            canonical = _ALIASES.get(name, name)
            if canonical in _POSITIONAL or canonical in _KEYWORD_ONLY:
                # The canonical spelling wins over an alias given too.
                if canonical == name or canonical not in config:
                    settings[canonical] = value
            elif name not in _DICT_ONLY:
                log.warning("setup: ignoring unknown setting %r", name)
        return settings

    def _connect(self, settings: Dict[str, Any]) -> int:
        engine = settings.get("engine")
        if engine is not None:
            warnings.warn(
                "mooncake_kv: setup() ignores the transfer engine it is given",
                RuntimeWarning,
                stacklevel=3,
            )
        try:
            store = _open(settings)
        except (ValueError, TypeError) as error:
            log.error("setup: %s", error)
            return INVALID_PARAMS
        except _native.MooncakeKVError as error:
            log.error("setup: %s", error)
            return _code_of(error)
        with self._lock:
            old, self._store = self._store, store
        if old is not None:
            try:
                old.close()
            except _native.MooncakeKVError as error:
                log.error("setup: closing the store set up before: %s", error)
        host = str(settings.get("local_hostname") or "") or socket.gethostname()
        self._hostname = host
        return OK

    def setup_dummy(self, mem_pool_size: int, local_buffer_size: int, server_address: str) -> int:
        """Mooncake's "client of a local real-client daemon": here, a client of the
        ``mooncake-kvd`` at ``server_address`` (shared memory when on this host)."""
        return self._connect({"master_server_addr": server_address})

    # -- writing --------------------------------------------------------------------------

    def put(self, key: str, value: Any, config: Optional[ReplicateConfig] = None) -> int:
        """Stores ``value`` (a bytes-like object) under ``key`` unless the key exists
        (Mooncake's put: insert if absent, 0 either way)."""
        return self._put_buffers([key], [[value]])[0]

    def put_parts(self, key: str, *parts: Any, config: Optional[ReplicateConfig] = None) -> int:
        """Stores the concatenation of ``parts`` (bytes-like objects) under ``key``."""
        return self._put_buffers([key], [list(parts)])[0]

    def put_batch(
        self, keys: List[str], values: List[Any], config: Optional[ReplicateConfig] = None
    ) -> int:
        """Stores each value under its key; 0, or the first item's negative code."""
        codes = self._put_buffers(keys, [[v] for v in values])
        return next((c for c in codes if c != OK), OK)

    def _put_buffers(self, keys: List[str], parts: List[List[Any]]) -> List[int]:
        store = self._store
        if store is None:
            return [UNAVAILABLE_IN_CURRENT_STATUS] * len(keys)
        return _native._put_buffers(store, keys, parts, True)

    def put_from(
        self, key: str, buffer_ptr: int, size: int, config: Optional[ReplicateConfig] = None
    ) -> int:
        """Stores ``size`` bytes at ``buffer_ptr`` (inside a registered buffer)."""
        return self.batch_put_from([key], [buffer_ptr], [size], config)[0]

    def batch_put_from(
        self,
        keys: List[str],
        buffer_ptrs: List[int],
        sizes: List[int],
        config: Optional[ReplicateConfig] = None,
    ) -> List[int]:
        """Stores ``sizes[i]`` bytes at ``buffer_ptrs[i]`` under ``keys[i]`` (keys that
        exist are left alone); one code per key."""
        return self.batch_put_from_multi_buffers(
            keys, [[p] for p in buffer_ptrs], [[s] for s in sizes], config
        )

    def batch_put_from_multi_buffers(
        self,
        keys: List[str],
        all_buffer_ptrs: List[List[int]],
        all_sizes: List[List[int]],
        config: Optional[ReplicateConfig] = None,
    ) -> List[int]:
        """Stores under ``keys[i]`` the concatenation of its pieces
        ``(all_buffer_ptrs[i][j], all_sizes[i][j])``; one code per key."""
        store = self._store
        if store is None:
            return [UNAVAILABLE_IN_CURRENT_STATUS] * len(keys)
        return _native._put_from(store, keys, all_buffer_ptrs, all_sizes, True)

    # -- reading --------------------------------------------------------------------------

    def get(self, key: str) -> bytes:
        """The value of ``key``; ``b""`` on a miss or an error."""
        store = self._store
        if store is None:
            return b""
        try:
            return store.get(key) or b""
        except _native.MooncakeKVError as error:
            log.warning("get %r: %s", key, error)
            return b""

    def get_buffer(self, key: str) -> Optional[bytearray]:
        """The value of ``key`` as a buffer (a ``bytearray``), ``None`` on a miss."""
        return self.batch_get_buffer([key])[0]

    def batch_get_buffer(self, keys: List[str]) -> List[Optional[bytearray]]:
        """Each value as a buffer (a ``bytearray``: ``memoryview``, ``len`` and
        ``torch.frombuffer`` take it), ``None`` for a miss or an error."""
        store = self._store
        if store is None:
            return [None] * len(keys)
        try:
            return store._get_bytearrays(keys)
        except _native.MooncakeKVError as error:
            log.warning("batch_get_buffer: %s", error)
            return [None] * len(keys)

    def get_batch(self, keys: List[str]) -> List[bytes]:
        """Each value; ``b""`` for a miss or an error."""
        return [bytes(b) if b is not None else b"" for b in self.batch_get_buffer(keys)]

    def get_into(self, key: str, buffer_ptr: int, size: int) -> int:
        """Reads the value of ``key`` into ``size`` bytes at ``buffer_ptr`` (inside a
        registered buffer): its length, or a negative code."""
        return self.batch_get_into([key], [buffer_ptr], [size])[0]

    def batch_get_into(
        self, keys: List[str], buffer_ptrs: List[int], sizes: List[int]
    ) -> List[int]:
        """Reads each value into its buffer: its length (> 0 for a non-empty value), or a
        negative code (-704 for a miss, -10 for a buffer smaller than the value)."""
        return self.batch_get_into_multi_buffers(
            keys, [[p] for p in buffer_ptrs], [[s] for s in sizes]
        )

    def batch_get_into_multi_buffers(
        self,
        keys: List[str],
        all_buffer_ptrs: List[List[int]],
        all_sizes: List[List[int]],
        prefer_alloc_in_same_node: bool = False,
    ) -> List[int]:
        """Scatters each value over its pieces, in order: its length, or a negative code."""
        store = self._store
        if store is None:
            return [UNAVAILABLE_IN_CURRENT_STATUS] * len(keys)
        return _native._get_into(store, keys, all_buffer_ptrs, all_sizes)

    def get_size(self, key: str) -> int:
        """The value's length, or a negative code (this reads the value)."""
        store = self._store
        if store is None:
            return UNAVAILABLE_IN_CURRENT_STATUS
        try:
            value = store.get(key)
        except _native.MooncakeKVError as error:
            return _code_of(error)
        return OBJECT_NOT_FOUND if value is None else len(value)

    def is_exist(self, key: str) -> int:
        """1 if ``key`` has a value, 0 if not, -1 on an error."""
        return self.batch_is_exist([key])[0]

    def batch_is_exist(self, keys: List[str]) -> List[int]:
        """1, 0 or -1 per key."""
        store = self._store
        if store is None:
            return [-1] * len(keys)
        return _native._exists(store, keys)

    # -- removing -------------------------------------------------------------------------

    def remove(self, key: str, force: bool = False) -> int:
        """0 if ``key`` was removed, -704 if it had no value, or a negative code."""
        return self.batch_remove([key], force)[0]

    def batch_remove(self, keys: List[str], force: bool = False) -> List[int]:
        store = self._store
        if store is None:
            return [UNAVAILABLE_IN_CURRENT_STATUS] * len(keys)
        try:
            return [OK if r else OBJECT_NOT_FOUND for r in store.remove_batch(keys)]
        except _native.MooncakeKVError as error:
            return [_code_of(error)] * len(keys)

    def remove_all(self, force: bool = False) -> int:
        """Removes every value; how many, or -1."""
        store = self._store
        if store is None:
            return -1
        try:
            return store.remove_all()
        except _native.MooncakeKVError as error:
            log.warning("remove_all: %s", error)
            return -1

    # -- registered memory ----------------------------------------------------------------

    def register_buffer(self, buffer_ptr: int, size: int) -> int:
        """Records ``[buffer_ptr, buffer_ptr + size)`` as memory the caller owns and keeps
        mapped until ``unregister_buffer``: pointers given to this store must lie inside
        such a range. Nothing is touched."""
        store = self._store
        if store is None:
            return UNAVAILABLE_IN_CURRENT_STATUS
        return _native._register(store, buffer_ptr, size)

    def unregister_buffer(self, buffer_ptr: int) -> int:
        """Forgets the range registered at ``buffer_ptr``, once no call in flight uses it."""
        store = self._store
        if store is None:
            return UNAVAILABLE_IN_CURRENT_STATUS
        return _native._unregister(store, buffer_ptr)

    # -- the rest -------------------------------------------------------------------------

    def get_hostname(self) -> str:
        """This client's name (the ``local_hostname`` given to ``setup``)."""
        return self._hostname

    def health_check(self) -> int:
        """0 if the store answers, 1 if it is not set up or closed, 2 if it cannot be
        reached."""
        store = self._store
        if store is None:
            return 1
        try:
            store.stats()
        except _native.ClosedError:
            return 1
        except _native.MooncakeKVError:
            return 2
        return 0

    def close(self) -> int:
        """Closes the store; safe to call again, or before ``setup``."""
        with self._lock:
            store, self._store = self._store, None
        if store is not None:
            try:
                store.close()
            except _native.MooncakeKVError as error:
                log.error("close: %s", error)
                return _code_of(error)
        return OK


def _address(text: str) -> Tuple[str, Optional[str]]:
    """The address and the token of ``[mooncake-kv://][token@]address``."""
    text = text.strip()
    if text.startswith("mooncake-kv://"):
        text = text[len("mooncake-kv://") :]
    token = None
    if "@" in text and not text.startswith("etcd://"):
        token, text = text.rsplit("@", 1)
    return text.rstrip("/"), token


def _open(settings: Dict[str, Any]) -> _native.Store:
    """The store that ``setup``'s settings name."""
    target, token = _address(str(settings.get("master_server_addr") or ""))
    if not target:
        raise ValueError("master_server_addr names no store (a node, a cluster or embedded)")
    token = token or os.environ.get("MOONCAKE_KV_TOKEN") or None
    protocol = str(settings.get("protocol") or "tcp").lower()
    transport = os.environ.get("MOONCAKE_KV_TRANSPORT") or (
        protocol if protocol in ("shm", "tcp-only") else "auto"
    )
    transport = "tcp" if transport == "tcp-only" else transport
    if target == "embedded":
        dram = _size(settings.get("global_segment_size") or 0, "global_segment_size")
        data_dir = None
        if _flag(settings.get("enable_ssd_offload", False)):
            data_dir = str(settings.get("ssd_offload_path") or "") or None
            if data_dir is None:
                raise ValueError("enable_ssd_offload needs ssd_offload_path")
        # Whole 4 KiB pages, at least 1 MiB; 0 (Mooncake's "client only") takes 1 GiB.
        dram = max(dram - dram % 4096, 1 << 20) if dram else 1 << 30
        return _native.EmbeddedStore(dram, data_dir=data_dir)
    if target.startswith("etcd://"):
        rest = target[len("etcd://") :]
        hosts, _, prefix = rest.partition("/")
        endpoints = [f"http://{h}" for h in hosts.split(",") if h]
        return _native.Cluster(
            etcd=endpoints,
            etcd_prefix=f"/{prefix.strip('/')}/" if prefix.strip("/") else "/mooncake/members/",
            token=token,
            transport=transport,
        )
    peers = [p.strip() for p in target.split(",") if p.strip()]
    if len(peers) > 1:
        replicas = min(2, len(peers))
        return _native.Cluster(peers, replicas=replicas, token=token, transport=transport)
    return _native.Client(peers[0], token=token, transport=transport)
