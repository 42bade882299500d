"""Running SGLang's, LMCache's and vLLM's own Mooncake backends on this store, unpatched.

Each of them imports ``MooncakeDistributedStore`` from ``mooncake.store`` inside its
backend's constructor. :func:`install_mooncake_shim` makes that module this package's
compatible class, so their code runs as it is:

- SGLang: ``mooncake_kv.integrations.sglang.MooncakeKVStore``, a ``dynamic`` HiCache
  storage backend (SGLang's ``MooncakeStore``, with the shim installed first);
- LMCache: ``mooncake_kv.integrations.lmcache.MooncakeKVConnector``, a remote storage
  plugin (LMCache's ``MooncakestoreConnector``, likewise);
- vLLM: its ``MooncakeStoreConnector`` has no plugin hook of its own; call
  ``install_mooncake_shim()`` before the engine starts (for example in a
  ``sitecustomize`` module), or install the ``mooncake`` shim package.
"""

from __future__ import annotations

import sys
import types

__all__ = ["install_mooncake_shim"]


def install_mooncake_shim(force: bool = False) -> bool:
    """Makes ``import mooncake.store`` give this package's compatible class. Leaves a real
    Mooncake installation alone unless ``force``; says whether the shim is in place."""
    from .. import mooncake as compat

    current = sys.modules.get("mooncake.store")
    if current is compat:
        return True
    if not force:
        try:
            import mooncake.store  # noqa: F401  (a real Mooncake is installed: keep it)

            return sys.modules.get("mooncake.store") is compat
        except ImportError:
            pass
    package = sys.modules.get("mooncake")
    if package is None or force:
        package = types.ModuleType("mooncake")
        package.__path__ = []  # a package, with nothing to find on disk
        package.__doc__ = "mooncake_kv's stand-in for the mooncake package"
        sys.modules["mooncake"] = package
    package.store = compat  # type: ignore[attr-defined]
    sys.modules["mooncake.store"] = compat
    return True
