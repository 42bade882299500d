"""The native API against an embedded store and a real mooncake-kvd (shared memory, tcp)."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import mooncake_kv
from conftest import Kvd, pattern, unique

SIZES = [0, 1, 4095, 4096, 65536 + 7, 1 << 20, 8 << 20]


@pytest.mark.parametrize("size", SIZES)
def test_every_method_round_trips_the_exact_bytes(store: mooncake_kv.Store, size: int) -> None:
    key = unique(f"rt{size}")
    value = pattern(key, size)
    store.put(key, value)
    assert store.get(key) == value
    assert store.exists(key)

    into = bytearray(size + 3)
    into[-3:] = b"xyz"
    assert store.get_into(key, into) == size
    assert into[:size] == value and into[-3:] == b"xyz"

    array = np.full(size + 1, 0xAB, dtype=np.uint8)
    assert store.get_into(key, array) == size
    assert array[:size].tobytes() == value and array[-1] == 0xAB

    backing = bytearray(size + 20)
    view = memoryview(backing)[10 : 10 + size]
    assert store.get_into(key, view) == size
    assert bytes(backing[10 : 10 + size]) == value
    assert backing[:10] == bytes(10) and backing[10 + size :] == bytes(10)

    keys = [unique("b") for _ in range(3)]
    values = [pattern(k, size, salt=i) for i, k in enumerate(keys)]
    store.put_batch(keys, [np.frombuffer(v, dtype=np.uint8) for v in values])
    assert store.get_batch(keys + ["absent-" + key]) == values + [None]
    buffers = [np.zeros(size, dtype=np.uint8) for _ in keys]
    assert store.get_into_batch(keys, buffers) == [size] * 3
    assert [b.tobytes() for b in buffers] == values
    assert store.remove(key)
    assert store.get(key) is None


def test_a_miss_is_none_everywhere(store: mooncake_kv.Store) -> None:
    key = unique("missing")
    assert store.get(key) is None
    assert store.get_into(key, bytearray(8)) is None
    assert store.get_into_batch([key], [bytearray(8)]) == [None]
    assert store.exists(key) is False
    assert store.remove(key) is False


def test_chains_prefix_match_and_keys_from_tokens(store: mooncake_kv.Store) -> None:
    tokens = list(range(1000, 1000 + 16 * 5 + 3))
    keys = mooncake_kv.chain_keys(tokens, 16, prefix=unique("m") + "/", partial=True)
    assert len(keys) == 6
    values = [pattern(k, 4096) for k in keys]
    store.put_chain(keys[:3], values[:3])
    assert store.prefix_match(keys) == 3
    store.put_chain(keys[3:], values[3:], parent=keys[2], partial=True)
    assert store.prefix_match(keys) == 6
    assert store.get_batch(keys) == values
    assert store.end_chain(keys)
    assert store.remove_batch(keys[:2] + [keys[0]]) == [True, True, False]
    assert store.prefix_match(keys) == 0


def test_stats_and_remove_all(kvd: Kvd) -> None:
    with mooncake_kv.Client(kvd.address) as store:
        store.put(unique("s"), b"x" * 100)
        stats = store.stats()
        assert stats["backend"] == "node" and stats["tiers"][0]["name"] == "dram"
        assert stats["tiers"][0]["blocks"] >= 1
        assert stats["put_requests"] >= 1
    embedded = mooncake_kv.EmbeddedStore(8 << 20)
    for i in range(5):
        embedded.put(f"k{i}", b"v")
    assert embedded.remove_all() == 5
    assert embedded.stats()["tiers"][0]["blocks"] == 0
    embedded.close()
    assert embedded.closed
    embedded.close()
    with pytest.raises(mooncake_kv.ClosedError):
        embedded.get("k0")


def test_remove_all_on_a_node(kvd: Kvd) -> None:
    # Its own node: remove_all removes everything the node holds.
    node = Kvd()
    try:
        store = mooncake_kv.Client(node.address)
        for i in range(7):
            store.put(f"r{i}", bytes(10))
        assert store.remove_all() == 7
        assert store.get("r0") is None
    finally:
        node.stop()


def test_eight_threads_sharing_one_store_read_no_wrong_byte(store: mooncake_kv.Store) -> None:
    base = unique("mt")
    wrong: list = []
    errors: list = []

    def worker(t: int) -> None:
        try:
            buf = np.zeros(256 << 10, dtype=np.uint8)
            for i in range(60):
                key = f"{base}-{(t * 7 + i) % 40}"
                size = 1000 + ((t * 7 + i) % 40) * 3000
                if i % 3 == 0:
                    store.put(key, pattern(key, size))
                n = store.get_into(key, buf)
                if n is not None and (n != size or buf[:n].tobytes() != pattern(key, size)):
                    wrong.append(key)
        except Exception as error:  # noqa: BLE001 (reported below)
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and wrong == []


class TestBadInput:
    def test_keys(self, store: mooncake_kv.Store) -> None:
        with pytest.raises(mooncake_kv.InvalidArgumentError):
            store.put("", b"x")
        with pytest.raises(mooncake_kv.TooLargeError):
            store.put("k" * (mooncake_kv.MAX_KEY_BYTES + 1), b"x")
        with pytest.raises(TypeError):
            store.put(42, b"x")  # type: ignore[arg-type]
        store.put(b"\xff bytes key", b"ok")
        assert store.get(b"\xff bytes key") == b"ok"

    def test_buffers(self, store: mooncake_kv.Store) -> None:
        key = unique("bad")
        store.put(key, b"0123456789")
        small = bytearray(b"untouched")
        with pytest.raises(mooncake_kv.BufferTooSmallError):
            store.get_into(key, small)
        assert small == b"untouched"  # nothing truncated into it
        with pytest.raises((TypeError, BufferError)):
            store.get_into(key, b"read-only bytes" * 2)
        with pytest.raises(BufferError):
            store.get_into(key, memoryview(bytearray(40))[::2])
        with pytest.raises(TypeError):
            store.put(key, "a str is not bytes")
        shared = bytearray(64)
        with pytest.raises(mooncake_kv.InvalidArgumentError):
            store.get_into_batch([key, key], [shared, memoryview(shared)[8:]])
        with pytest.raises(mooncake_kv.InvalidArgumentError):
            store.get_into_batch([key], [])
        with pytest.raises(mooncake_kv.TooLargeError):
            store.put(key, bytearray(mooncake_kv.MAX_VALUE_BYTES + 1))
        assert store.get(key) == b"0123456789"

    def test_settings(self, kvd: Kvd) -> None:
        with pytest.raises(mooncake_kv.InvalidArgumentError):
            mooncake_kv.Client(kvd.address, transport="carrier-pigeon")
        with pytest.raises(mooncake_kv.InvalidArgumentError):
            mooncake_kv.Client(kvd.address, timeout=-1)
        with pytest.raises(mooncake_kv.InvalidArgumentError, match="batch_lanes"):
            mooncake_kv.Client(kvd.address, batch_lanes=0)
        with pytest.raises(mooncake_kv.UnavailableError):
            mooncake_kv.Client("127.0.0.1:1", timeout=1)
        with pytest.raises(mooncake_kv.InvalidArgumentError):
            mooncake_kv.EmbeddedStore(12345)


def test_a_wrong_token_is_refused(token_kvd: Kvd) -> None:
    with pytest.raises(mooncake_kv.UnauthorizedError):
        mooncake_kv.Client(token_kvd.address, token="wrong")
    with pytest.raises(mooncake_kv.UnauthorizedError):
        mooncake_kv.Client(token_kvd.address)
    store = mooncake_kv.Client(token_kvd.address, token="s3cret")
    store.put("t", b"secret value")
    assert store.get("t") == b"secret value"


@pytest.mark.parametrize("transport", ["shm", "tcp"])
def test_a_node_stopped_mid_run_raises_and_the_interpreter_lives(transport: str) -> None:
    node = Kvd()
    store = mooncake_kv.Client(node.address, transport=transport, timeout=2)
    store.put("k", pattern("k", 1 << 20))
    buf = np.zeros(1 << 20, dtype=np.uint8)
    assert store.get_into("k", buf) == 1 << 20
    node.kill()
    with pytest.raises(mooncake_kv.UnavailableError):
        for _ in range(3):  # a descriptor cached from before may serve one read
            store.get_into("k", buf)
            store.put("k2", b"x")
    with pytest.raises(mooncake_kv.UnavailableError):
        store.exists("k")


def test_an_embedded_store_with_a_data_directory_survives_reopening(tmp_path) -> None:
    store = mooncake_kv.EmbeddedStore(4 << 20, data_dir=str(tmp_path), nvme_bytes=64 << 20)
    values = {f"p{i}": pattern(f"p{i}", 1 << 20) for i in range(12)}  # 12 MiB > 4 MiB DRAM
    store.put_batch(list(values), list(values.values()))
    store.close()
    again = mooncake_kv.EmbeddedStore(4 << 20, data_dir=str(tmp_path), nvme_bytes=64 << 20)
    assert {k: again.get(k) for k in values} == values  # those only in DRAM too
    again.close()


def test_a_cluster_of_two_nodes_keeps_two_replicas_and_fails_over() -> None:
    nodes = [Kvd(), Kvd()]
    try:
        cluster = mooncake_kv.Cluster([n.address for n in nodes], replicas=2, timeout=2)
        assert cluster.kind == "cluster"
        key, value = unique("c"), pattern("c", 300_000)
        for _ in range(100):  # until the membership has seen both nodes alive
            try:
                cluster.put(key, value)
                break
            except mooncake_kv.UnavailableError:
                threading.Event().wait(0.1)
        else:
            pytest.fail("the cluster never took a put")
        for node in nodes:  # each node holds a replica
            assert mooncake_kv.Client(node.address).get(key) == value
        buf = bytearray(len(value))
        assert cluster.get_into(key, buf) == len(value) and buf == value
        assert cluster.exists_batch([key, unique("none")]) == [True, False]
        others = [unique("c") for _ in range(6)]
        cluster.put_batch(others, [pattern(k, 200_000) for k in others])
        bufs = [bytearray(200_000) for _ in others]
        assert cluster.get_into_batch(others, bufs) == [200_000] * 6
        assert all(b == pattern(k, 200_000) for k, b in zip(others, bufs))
        with pytest.raises(mooncake_kv.BufferTooSmallError):
            cluster.get_into(key, bytearray(10))
        nodes[0].kill()
        assert cluster.get(key) == value  # the other replica answers
        bufs = [bytearray(200_000) for _ in others]
        assert cluster.get_into_batch(others, bufs) == [200_000] * 6
        assert all(b == pattern(k, 200_000) for k, b in zip(others, bufs))
        assert cluster.remove(key)
        assert cluster.get(key) is None
    finally:
        for node in nodes:
            node.stop()
