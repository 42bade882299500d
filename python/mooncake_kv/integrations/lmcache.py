"""LMCache on this store: LMCache's own Mooncake connector, unchanged, as a remote storage
plugin::

    remote_storage_plugins: ["mooncake_kv"]
    extra_config:
      remote_storage_plugin.mooncake_kv.module_path: mooncake_kv.integrations.lmcache
      remote_storage_plugin.mooncake_kv.class_name: MooncakeKVConnector
      mooncake_master_server_addr: "127.0.0.1:7700"
      mooncake_protocol: tcp
"""

from __future__ import annotations

from typing import Any, Optional

from . import install_mooncake_shim

install_mooncake_shim(force=True)

from lmcache.v1.storage_backend.connector.mooncakestore_connector import (  # noqa: E402
    MooncakestoreConnector,
)

__all__ = ["MooncakeKVConnector"]


class MooncakeKVConnector(MooncakestoreConnector):
    """LMCache's ``MooncakestoreConnector`` with ``mooncake.store`` resolving to this
    package. LMCache's plugin loader builds it as ``cls(loop=, local_cpu_backend=,
    config=)``."""

    def __init__(
        self,
        loop: Any,
        local_cpu_backend: Any,
        config: Any = None,
        plugin_name: Optional[str] = None,
    ) -> None:
        install_mooncake_shim(force=True)
        super().__init__(loop, local_cpu_backend, config, plugin_name)
