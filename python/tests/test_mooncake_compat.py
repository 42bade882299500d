"""MooncakeDistributedStore: Mooncake Store's Python surface and codes, against a real
mooncake-kvd and an embedded store, and the call sequences SGLang and LMCache make."""

from __future__ import annotations

import threading
import warnings

import numpy as np
import pytest

from conftest import Kvd, pattern, unique
from mooncake_kv import MooncakeDistributedStore, ReplicateConfig
from mooncake_kv.mooncake import (
    BUFFER_OVERFLOW,
    INVALID_PARAMS,
    OBJECT_NOT_FOUND,
    UNAVAILABLE_IN_CURRENT_STATUS,
)


def set_up(target: str) -> MooncakeDistributedStore:
    store = MooncakeDistributedStore()
    assert store.setup("localhost", "P2PHANDSHAKE", 64 << 20, 16 << 20, "tcp", "", target) == 0
    return store


@pytest.fixture(params=["node", "embedded"])
def mds(request: pytest.FixtureRequest, kvd: Kvd):
    store = set_up(kvd.address if request.param == "node" else "embedded")
    yield store
    store.close()


def addr(a: np.ndarray, offset: int = 0) -> int:
    return a.ctypes.data + offset


class TestSetup:
    def test_positional_keyword_and_dict_forms(self, kvd: Kvd) -> None:
        s = MooncakeDistributedStore()
        assert s.setup(
            "localhost", "P2PHANDSHAKE", 0, 16 << 20, "rdma", "", kvd.address, None,
            enable_ssd_offload=False, tenant_id="default",
        ) == 0
        assert s.put("f1", b"v") == 0 and s.get("f1") == b"v"
        s.close()
        s = MooncakeDistributedStore()
        assert s.setup(
            local_hostname="h", metadata_server="P2PHANDSHAKE", global_segment_size=0,
            local_buffer_size=0, protocol="tcp", rdma_devices="",
            master_server_addr=kvd.address,
        ) == 0
        assert s.get_hostname() == "h"
        s.close()
        # LMCache: every value a str, its legacy key spellings, a client-only segment "0".
        s = MooncakeDistributedStore()
        assert s.setup({
            "local_hostname": "localhost", "metadata_server": "P2PHANDSHAKE",
            "global_segment_size": "0", "local_buffer_size": "16777216",
            "protocol": "tcp", "device_name": "", "master_server_address": kvd.address,
        }) == 0
        assert s.get("f1") == b"v"
        s.close()
        s = MooncakeDistributedStore()
        assert s.setup({"master_server_addr": "embedded", "global_segment_size": "64mb"}) == 0
        s.close()

    def test_an_unknown_keyword_raises_a_type_error_naming_it(self, kvd: Kvd) -> None:
        s = MooncakeDistributedStore()
        args = ("localhost", "P2PHANDSHAKE", 0, 0, "tcp", "", kvd.address)
        with pytest.raises(TypeError, match="client_ttl_ms"):
            s.setup(*args, client_ttl_ms=5)
        with pytest.raises(TypeError):
            s.setup(*args, None, "one too many")

    def test_a_transfer_engine_is_ignored_with_a_warning(self, kvd: Kvd) -> None:
        s = MooncakeDistributedStore()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            assert s.setup("h", "P", 0, 0, "tcp", "", kvd.address, object()) == 0
        assert any("transfer engine" in str(w.message) for w in caught)
        s.close()

    def test_failures_are_codes(self) -> None:
        s = MooncakeDistributedStore()
        assert s.setup("h", "P", 0, 0, "tcp", "", "127.0.0.1:1") < 0
        assert s.setup("h", "P", 0, 0, "tcp", "", "") == INVALID_PARAMS
        assert s.setup({"master_server_addr": "embedded", "global_segment_size": "lots"}) == (
            INVALID_PARAMS
        )

    def test_calls_before_setup_and_after_close(self) -> None:
        s = MooncakeDistributedStore()
        assert s.close() == 0
        assert s.get("k") == b""
        assert s.is_exist("k") == -1
        assert s.put("k", b"v") == UNAVAILABLE_IN_CURRENT_STATUS
        assert s.batch_get_into(["k"], [1], [1]) == [UNAVAILABLE_IN_CURRENT_STATUS]
        assert s.health_check() == 1


def test_put_is_insert_if_absent(mds: MooncakeDistributedStore) -> None:
    key = unique("once")
    assert mds.put(key, b"first") == 0
    assert mds.put(key, b"second, ignored") == 0
    assert mds.get(key) == b"first"
    assert mds.put_parts(key, b"third") == 0
    assert mds.get(key) == b"first"
    assert mds.is_exist(key) == 1 and mds.is_exist(unique("no")) == 0
    assert mds.get(unique("no")) == b""


def test_pointer_round_trips_of_every_size(mds: MooncakeDistributedStore) -> None:
    sizes = [1, 4096, 65536, 1 << 20, 8 << 20]
    total = sum(sizes)
    src = np.empty(total, dtype=np.uint8)
    dst = np.zeros(total, dtype=np.uint8)
    assert mds.register_buffer(addr(src), total) == 0
    assert mds.register_buffer(addr(dst), total) == 0
    keys = [unique(f"p{s}") for s in sizes]
    offsets = np.cumsum([0] + sizes[:-1]).tolist()
    for k, o, s in zip(keys, offsets, sizes):
        src[o : o + s] = np.frombuffer(pattern(k, s), dtype=np.uint8)
    ptrs = [addr(src, o) for o in offsets]
    assert mds.batch_is_exist(keys) == [0] * 5
    assert mds.batch_put_from(keys, ptrs, sizes) == [0] * 5
    assert mds.batch_is_exist(keys) == [1] * 5
    assert mds.batch_get_into(keys, [addr(dst, o) for o in offsets], sizes) == sizes
    assert np.array_equal(src, dst)
    # One at a time, and as several pieces.
    dst[:] = 0
    assert mds.get_into(keys[2], addr(dst), sizes[2]) == sizes[2]
    assert dst[: sizes[2]].tobytes() == pattern(keys[2], sizes[2])
    pieces_key = unique("pieces")
    halves = [[addr(src, 0), addr(src, 1 << 20)]]
    assert mds.batch_put_from_multi_buffers([pieces_key], halves, [[4096, 1000]]) == [0]
    dst[:] = 0
    got = mds.batch_get_into_multi_buffers([pieces_key], [[addr(dst, 9000), addr(dst, 0)]],
                                           [[96, 5000]])
    assert got == [5096]
    want = src[:4096].tobytes() + src[1 << 20 : (1 << 20) + 1000].tobytes()
    assert dst[9000:9096].tobytes() + dst[:5000].tobytes() == want
    assert mds.unregister_buffer(addr(src)) == 0
    assert mds.unregister_buffer(addr(dst)) == 0
    assert mds.unregister_buffer(addr(dst)) == INVALID_PARAMS


def test_bad_pointers_are_codes_not_crashes(mds: MooncakeDistributedStore) -> None:
    buf = np.zeros(1 << 16, dtype=np.uint8)
    key = unique("bp")
    assert mds.put(key, b"z" * 1000) == 0
    # Nothing registered yet: every pointer is refused, even a real one.
    assert mds.batch_get_into([key], [addr(buf)], [len(buf)]) == [INVALID_PARAMS]
    assert mds.batch_put_from([unique("x")], [addr(buf)], [10]) == [INVALID_PARAMS]
    assert mds.register_buffer(addr(buf), len(buf)) == 0
    assert mds.register_buffer(0, 10) == INVALID_PARAMS
    results = mds.batch_get_into(
        [key, key, key, key, unique("miss"), ""],
        [addr(buf), 8, addr(buf, len(buf) - 10), 2**64 - 16, addr(buf, 5000), addr(buf, 9000)],
        [1000, 1000, 1000, 100, 10, 10],
    )
    assert results == [1000, INVALID_PARAMS, INVALID_PARAMS, INVALID_PARAMS,
                       OBJECT_NOT_FOUND, INVALID_PARAMS]
    assert buf[:1000].tobytes() == b"z" * 1000
    # A buffer smaller than the value: an error, and nothing written into it.
    buf[:] = 7
    assert mds.get_into(key, addr(buf), 999) == BUFFER_OVERFLOW
    assert set(buf[:1000].tolist()) == {7}
    assert mds.put_from("k" * 2000, addr(buf), 10) == INVALID_PARAMS
    assert mds.put_from(unique("toolarge"), addr(buf), (64 << 20) + 1) == INVALID_PARAMS
    # Two targets on the same bytes.
    assert mds.batch_get_into([key, key], [addr(buf), addr(buf, 500)], [1000, 1000]) == [
        INVALID_PARAMS, INVALID_PARAMS]
    with pytest.raises(ValueError):
        mds.batch_get_into([key], [addr(buf), addr(buf)], [1])
    assert mds.unregister_buffer(addr(buf)) == 0
    assert mds.get_into(key, addr(buf), 1000) == INVALID_PARAMS


def test_buffers_removes_and_the_rest(mds: MooncakeDistributedStore) -> None:
    key = unique("parts")
    meta, kv = b"M" * 56, bytearray(pattern(key, 100_000))
    assert mds.put_parts(key, meta, kv) == 0
    got = mds.batch_get_buffer([key, unique("miss")])
    assert isinstance(got[0], bytearray) and got[1] is None
    assert bytes(memoryview(got[0])) == meta + kv and len(got[0]) == 100_056
    assert mds.get_size(key) == 100_056
    assert mds.remove(key) == 0 and mds.remove(key) == OBJECT_NOT_FOUND
    assert mds.health_check() == 0
    assert isinstance(ReplicateConfig().replica_num, int)
    assert not hasattr(ReplicateConfig(), "session_ids")


def test_threads_share_one_object(mds: MooncakeDistributedStore) -> None:
    pool = np.zeros(8 * (1 << 20), dtype=np.uint8)
    assert mds.register_buffer(addr(pool), pool.nbytes) == 0
    wrong: list = []

    def worker(t: int) -> None:
        base = t << 20
        for i in range(30):
            key = f"thr-{t}-{i % 6}"
            value = pattern(key, 200_000)
            pool[base : base + len(value)] = np.frombuffer(value, dtype=np.uint8)
            if mds.batch_put_from([key], [addr(pool, base)], [len(value)]) != [0]:
                wrong.append(("put", key))
            pool[base : base + len(value)] = 0
            if mds.batch_get_into([key], [addr(pool, base)], [1 << 20]) != [len(value)]:
                wrong.append(("get", key))
            elif pool[base : base + len(value)].tobytes() != value:
                wrong.append(("bytes", key))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert wrong == []
    assert mds.unregister_buffer(addr(pool)) == 0


def test_sglang_call_sequence(kvd: Kvd) -> None:
    """The calls SGLang 0.5.23's MooncakeStore makes on CPU memory, in order
    (sglang/srt/mem_cache/storage/mooncake_store/mooncake_store.py): setup with 7
    positional arguments plus the transfer engine (MooncakeStore.__init__), warmup put /
    is_exist / get (warmup), register_buffer of the host pool (register_mem_pool_host),
    then batch_is_exist, batch_put_from of the missing pages and batch_get_into
    (batch_exists, batch_set_v1, batch_get_v1; two keys per page, `_k` and `_v`)."""
    store = MooncakeDistributedStore()
    assert not store.setup("localhost", "P2PHANDSHAKE", 4 << 30, 16 << 20, "tcp", "",
                           kvd.address, None)
    warm = "sglang_mooncake_store_warmup_key" + unique("")
    value = bytes(4096)
    assert store.put(warm, value) == 0
    assert store.is_exist(warm) == 1
    assert store.get(warm) == value
    page_bytes = 64 * 8 * 128 * 2  # tokens x heads x head_dim x bf16, one layer
    pool = np.random.default_rng(0).integers(0, 255, 32 * page_bytes, dtype=np.uint8)
    assert store.register_buffer(addr(pool), pool.nbytes) == 0
    pages = [unique("page") for _ in range(8)]
    keys = [f"{p}_0_{kv}" for p in pages for kv in ("k", "v")]
    ptrs = [addr(pool, i * page_bytes) for i in range(len(keys))]
    sizes = [page_bytes] * len(keys)
    exist = store.batch_is_exist(keys)
    missing = [i for i, e in enumerate(exist) if e != 1]
    assert store.batch_put_from([keys[i] for i in missing], [ptrs[i] for i in missing],
                                [sizes[i] for i in missing]) == [0] * len(missing)
    back = [addr(pool, (16 + i) * page_bytes) for i in range(len(keys))]
    assert all(r > 0 for r in store.batch_get_into(keys, back, sizes))
    assert pool[16 * page_bytes :].tobytes() == pool[: 16 * page_bytes].tobytes()
    assert store.remove_all() >= len(keys)


def test_lmcache_call_sequence(kvd: Kvd) -> None:
    """The calls LMCache 0.5.6's MooncakestoreConnector makes in its default mode
    (lmcache/v1/storage_backend/connector/mooncakestore_connector.py): setup(dict) with
    every value a str and its legacy keys (setup_mooncake_store), ReplicateConfig with
    replica_num, register_buffer of the pinned pool, is_exist per key until the first miss
    (batched_async_contains), put_parts(key, metadata, kv) per chunk (batched_put), and
    batch_get_buffer read through memoryview (batched_get)."""
    store = MooncakeDistributedStore()
    store.setup({
        "local_hostname": "localhost", "metadata_server": "P2PHANDSHAKE",
        "global_segment_size": "3355443200", "local_buffer_size": "1073741824",
        "protocol": "tcp", "device_name": "", "master_server_address": kvd.address,
    })
    config = ReplicateConfig()
    config.replica_num = 1
    config.preferred_segment = store.get_hostname()
    pinned = np.zeros(4 << 20, dtype=np.uint8)
    assert store.register_buffer(addr(pinned), pinned.nbytes) == 0
    keys = [f"model@1@0@{unique('chunk')}@bfloat16" for _ in range(3)]
    assert [store.is_exist(k) for k in keys] == [0, 0, 0]
    chunks = [pattern(k, 1 << 20) for k in keys]
    for k, c in zip(keys, chunks):
        assert store.put_parts(k, b"\x01" * 28, c) == 0
    assert all(store.is_exist(k) for k in keys)
    for k, c, buf in zip(keys, chunks, store.batch_get_buffer(keys)):
        view = memoryview(buf)
        assert len(view) == 28 + len(c) and bytes(view[28:]) == c
    assert store.unregister_buffer(addr(pinned)) == 0
    assert store.close() == 0
