"""SGLang's own Mooncake backend, from its pip package, against a mooncake-kvd.

1. SGLang's acceptance test for its Mooncake store, unchanged
   (sglang/srt/mem_cache/storage/mooncake_store/test_mooncake_store.py, run as __main__):
   set / exists / get of one page, then batch_set_v1 / batch_exists / batch_get_v1 over a
   host pool for MHA and MLA at tp 1, 4 and 8, configured from MOONCAKE_MASTER.
2. The same backend reached through SGLang's `dynamic` storage backend factory with
   mooncake_kv's adapter (the configuration the docs give), then its v1 batch calls.
"""

from __future__ import annotations

import os
import runpy
import sys

from mooncake_kv.integrations import install_mooncake_shim

install_mooncake_shim(force=True)

import torch  # noqa: E402

from sglang.srt.mem_cache.storage.backend_factory import StorageBackendFactory  # noqa: E402
from sglang.srt.mem_cache.storage.mooncake_store import test_mooncake_store as t  # noqa: E402

address = os.environ["MOONCAKE_MASTER"]
print(f"== SGLang's test_mooncake_store.py against {address}", flush=True)
runpy.run_module(t.__name__, run_name="__main__")

print("== the dynamic backend (mooncake_kv.integrations.sglang.MooncakeKVStore)", flush=True)
config = t.make_hicache_storage_config(is_mla_model=False, tp_rank=0, tp_size=1)
config.extra_config = {
    "backend_name": "mooncake_kv",
    "module_path": "mooncake_kv.integrations.sglang",
    "class_name": "MooncakeKVStore",
    "interface_v1": 1,
    "master_server_address": address,
    "protocol": "tcp",
    "global_segment_size": 0,
}
backend = StorageBackendFactory.create_backend("dynamic", config, None)
print("backend:", type(backend).__module__, type(backend).__name__)
pool, buffer = t.create_mock_host_kv_cache(1 << 20, entries_per_page=2, page_elements=1024)
backend.register_mem_pool_host(pool)
keys = t.generate_batch_query_keys(64)
indices = torch.arange(0, 64)
assert all(backend.batch_set_v1(keys, indices)), "batch_set_v1"
assert backend.batch_exists(keys) == 64, "batch_exists"
saved = buffer[: 64 * 2 * 1024].clone()
buffer[: 64 * 2 * 1024] = 0
assert all(backend.batch_get_v1(keys, indices)), "batch_get_v1"
assert torch.equal(buffer[: 64 * 2 * 1024], saved), "bytes read back differ"
print("dynamic backend: batch_set_v1 / batch_exists / batch_get_v1 of 64 pages: OK")
sys.exit(0)
