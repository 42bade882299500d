"""LMCache's own Mooncake connector, from its pip package, against a mooncake-kvd.

LMCache 0.5.6's MooncakestoreConnector (lmcache/v1/storage_backend/connector/
mooncakestore_connector.py), reached as the remote storage plugin the docs configure
(mooncake_kv.integrations.lmcache.MooncakeKVConnector, built the way LMCache's plugin loader
builds it: cls(loop=, local_cpu_backend=, config=)), puts a KV chunk allocated by LMCache's
own LocalCPUBackend and gets it back, in its default mode (put_parts with metadata,
batch_get_buffer) and its zero-copy mode (batch_put_from, batch_get_into).
"""

from __future__ import annotations

import asyncio
import os
import sys

from mooncake_kv.integrations import install_mooncake_shim

install_mooncake_shim(force=True)

import torch  # noqa: E402

from lmcache.utils import CacheEngineKey  # noqa: E402
from lmcache.v1.config import LMCacheEngineConfig  # noqa: E402
from lmcache.v1.metadata import LMCacheMetadata  # noqa: E402
from lmcache.v1.storage_backend.local_cpu_backend import LocalCPUBackend  # noqa: E402

from mooncake_kv.integrations.lmcache import MooncakeKVConnector  # noqa: E402

address = os.environ["MOONCAKE_KV_ADDRESS"]
KV_SHAPE = (4, 2, 256, 8, 128)  # layers, K/V, tokens, KV heads, head dim


def run(save_chunk_meta: bool) -> None:
    extra = {
        "remote_storage_plugin.mooncake_kv.module_path": "mooncake_kv.integrations.lmcache",
        "remote_storage_plugin.mooncake_kv.class_name": "MooncakeKVConnector",
        "mooncake_master_server_addr": address,
        "mooncake_protocol": "tcp",
        "mooncake_global_segment_size": "0",
        "save_chunk_meta": save_chunk_meta,
    }
    config = LMCacheEngineConfig.from_defaults(
        chunk_size=256, local_cpu=True, max_local_cpu_size=0.25,
        remote_storage_plugins=["mooncake_kv"], extra_config=extra,
    )
    metadata = LMCacheMetadata(
        model_name="peer-test", world_size=1, local_world_size=1, worker_id=0,
        local_worker_id=0, kv_dtype=torch.bfloat16, kv_shape=KV_SHAPE,
    )
    backend = LocalCPUBackend(config, metadata, dst_device="cpu")
    loop = asyncio.new_event_loop()
    connector = MooncakeKVConnector(loop=loop, local_cpu_backend=backend, config=config)
    # A full chunk in LMCache's own layout, as its cache engine allocates one.
    obj = backend.allocate(connector.meta_shapes, connector.meta_dtypes, connector.meta_fmt)
    assert obj is not None, "LocalCPUBackend could not allocate a chunk"
    obj.tensor.copy_(torch.randn(obj.tensor.shape).to(obj.tensor.dtype))
    expected = obj.tensor.clone()
    key = CacheEngineKey("peer-test", 1, 0, hash(("chunk", save_chunk_meta)), torch.bfloat16)
    assert not connector.exists_sync(key)
    loop.run_until_complete(connector.put(key, obj))
    assert connector.exists_sync(key), "the chunk is not in the store after put"
    [got] = loop.run_until_complete(connector.batched_get([key]))
    assert got is not None, "batched_get found nothing"
    assert torch.equal(got.tensor.view(expected.shape), expected), "the chunk came back changed"
    got.ref_count_down()
    obj.ref_count_down()
    loop.run_until_complete(connector.close())
    mode = "default (put_parts, batch_get_buffer)" if save_chunk_meta else (
        "zero copy (batch_put_from, batch_get_into)")
    print(f"LMCache MooncakestoreConnector, {mode}: put and get of a "
          f"{expected.numel() * 2 >> 10} KiB chunk: OK", flush=True)


print(f"== LMCache's Mooncake connector against {address}", flush=True)
failed = False
for meta in (True, False):
    try:
        run(meta)
    except Exception as error:  # noqa: BLE001 (reported: what fails on this machine)
        failed = True
        print(f"LMCache, save_chunk_meta={meta}: FAILED: {type(error).__name__}: {error}",
              flush=True)
sys.exit(1 if failed else 0)
