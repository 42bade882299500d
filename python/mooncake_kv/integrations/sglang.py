"""SGLang HiCache on this store: SGLang's own Mooncake backend, unchanged, as a ``dynamic``
storage backend::

    --hicache-storage-backend dynamic
    --hicache-storage-backend-extra-config '{"backend_name": "mooncake_kv",
        "module_path": "mooncake_kv.integrations.sglang", "class_name": "MooncakeKVStore",
        "interface_v1": 1, "master_server_address": "127.0.0.1:7700",
        "protocol": "tcp", "global_segment_size": 0}'

``master_server_address`` is the ``mooncake-kvd`` (or ``"embedded"``, or a cluster: see
``mooncake_kv.mooncake``).
"""

from __future__ import annotations

from typing import Any

from . import install_mooncake_shim

install_mooncake_shim(force=True)

from sglang.srt.mem_cache.storage.mooncake_store.mooncake_store import (  # noqa: E402
    MooncakeStore,
)

__all__ = ["MooncakeKVStore"]


class MooncakeKVStore(MooncakeStore):
    """SGLang's ``MooncakeStore`` with ``mooncake.store`` resolving to this package."""

    def __init__(self, storage_config: Any = None, mem_pool: Any = None, *args: Any) -> None:
        install_mooncake_shim(force=True)
        # The dynamic factory passes its keyword arguments as a dict, not a host pool.
        if isinstance(mem_pool, dict):
            mem_pool = mem_pool.get("mem_pool_host")
        super().__init__(storage_config, mem_pool)
