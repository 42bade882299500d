"""mooncake_kv: the mooncake KVCache store from Python.

Three ways to hold a store, one API:

- ``Client("127.0.0.1:7700")``: one ``mooncake-kvd`` node (reads over shared memory when it
  is on this host, else tcp);
- ``Cluster(peers=[...], replicas=2)`` or ``Cluster(etcd=[...])``: many nodes, each block on
  several;
- ``EmbeddedStore(dram_bytes=..., data_dir=None)``: the engine in this process, no server.

Each has ``put``/``get``/``get_into`` and their batch forms, ``exists``, ``prefix_match``,
``put_chain``, ``end_chain``, ``remove``, ``remove_all``, ``stats`` and ``close``. A miss is
``None``; failures raise subclasses of :class:`MooncakeKVError`. Values are read from, and
written into, any buffer-protocol object where it lies (no intermediate copy), with the GIL
released; one store is safe to share between threads.

:func:`chain_keys` turns token ids into prefix-chained block keys.
:class:`MooncakeDistributedStore` is Mooncake Store's Python class, for SGLang, LMCache and
vLLM (``mooncake_kv.mooncake``).
"""

from ._native import (
    EMBEDDED,
    ETCD,
    MAX_KEY_BYTES,
    MAX_VALUE_BYTES,
    BufferTooSmallError,
    ClosedError,
    Client,
    Cluster,
    CorruptError,
    EmbeddedStore,
    InternalError,
    InvalidArgumentError,
    MooncakeKVError,
    NoSpaceError,
    Store,
    TooLargeError,
    UnauthorizedError,
    UnavailableError,
)
from .keys import block_hashes, chain_keys
from .mooncake import MooncakeDistributedStore, ReplicateConfig

__all__ = [
    "EMBEDDED",
    "ETCD",
    "MAX_KEY_BYTES",
    "MAX_VALUE_BYTES",
    "BufferTooSmallError",
    "ClosedError",
    "Client",
    "Cluster",
    "CorruptError",
    "EmbeddedStore",
    "InternalError",
    "InvalidArgumentError",
    "MooncakeDistributedStore",
    "MooncakeKVError",
    "NoSpaceError",
    "ReplicateConfig",
    "Store",
    "TooLargeError",
    "UnauthorizedError",
    "UnavailableError",
    "block_hashes",
    "chain_keys",
]
