"""The HBM tier of an embedded store and reads straight into GPU memory (`get_into_device`).

Where there is no GPU (CI), the checks are that asking for either says why it cannot, and
that the arguments are refused before anything is read. On a machine with an NVIDIA GPU,
torch built for CUDA and a wheel built with the `cuda` feature, the last test puts values
into the HBM tier and reads them into a CUDA tensor, byte for byte (it skips elsewhere). The
same reads run everywhere on the engine's host test device (host memory posing as a GPU,
bounds-checked), which the package's test builds include.
"""

from __future__ import annotations

import os
import re

import pytest

import mooncake_kv
from conftest import pattern, unique


def test_an_hbm_tier_opens_or_says_why() -> None:
    try:
        store = mooncake_kv.EmbeddedStore(4 << 20, hbm_bytes=4 << 20)
    except mooncake_kv.InvalidArgumentError as error:
        # No `cuda` feature in this wheel, no driver, or no such device: a setting this
        # machine cannot meet, said as such (not an internal error, not a crash).
        assert re.search("GPU|CUDA", str(error)), error
    else:
        with store:
            assert store.stats()["tiers"][0]["name"] == "hbm"


def test_device_reads_need_an_hbm_tier() -> None:
    with mooncake_kv.EmbeddedStore(4 << 20) as store:
        store.put("k", b"x" * 100)
        # An address no GPU has: refused for want of the tier before it could be used.
        with pytest.raises(mooncake_kv.InvalidArgumentError, match="HBM tier"):
            store.get_into_device("k", 1 << 40, 100)


def test_device_arguments_are_checked_before_anything_is_read() -> None:
    with mooncake_kv.EmbeddedStore(4 << 20) as store:
        with pytest.raises(mooncake_kv.InvalidArgumentError, match="cannot be 0"):
            store.get_into_device("k", 0, 10)
        with pytest.raises(mooncake_kv.InvalidArgumentError, match="overlap"):
            store.get_into_device_batch(["a", "b"], [1 << 40, (1 << 40) + 8], [16, 16])
        with pytest.raises(mooncake_kv.InvalidArgumentError, match="wraps around"):
            store.get_into_device("a", (1 << 64) - 8, 16)
        with pytest.raises(mooncake_kv.InvalidArgumentError, match="2 keys but 1 pointers"):
            store.get_into_device_batch(["a", "b"], [1 << 40], [16, 16])
        with pytest.raises(mooncake_kv.InvalidArgumentError, match="2 keys but 1 sizes"):
            store.get_into_device_batch(["a", "b"], [1 << 40, 1 << 41], [16])
        with pytest.raises(mooncake_kv.InvalidArgumentError, match="empty"):
            store.get_into_device("", 1 << 40, 10)
        with pytest.raises(OverflowError):
            store.get_into_device("k", -1, 10)


def test_values_read_into_gpu_memory() -> None:
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    try:
        store = mooncake_kv.EmbeddedStore(64 << 20, hbm_bytes=64 << 20)
    except mooncake_kv.MooncakeKVError as error:
        pytest.skip(f"this wheel cannot open an HBM tier: {error}")
    with store:
        keys = [unique("gpu") for _ in range(4)]
        values = [pattern(key, size) for key, size in zip(keys, [1, 4096, 65536 + 7, 2 << 20])]
        for key, value in zip(keys, values):
            store.put(key, value)
        target = torch.full((sum(len(v) for v in values) + 64,), 0xAB, dtype=torch.uint8,
                            device="cuda")
        offsets = [sum(len(v) for v in values[:i]) + 16 * i for i in range(len(values))]
        ptrs = [target.data_ptr() + offset for offset in offsets]
        lengths = store.get_into_device_batch(keys, ptrs, [len(v) for v in values])
        assert lengths == [len(v) for v in values]
        host = target.cpu().numpy().tobytes()
        for offset, value in zip(offsets, values):
            assert host[offset : offset + len(value)] == value
        # A miss, and a range smaller than the value.
        assert store.get_into_device(unique("absent"), target.data_ptr(), 16) is None
        with pytest.raises(mooncake_kv.BufferTooSmallError):
            store.get_into_device(keys[3], target.data_ptr(), 16)


def host_test_device(capacity: int):
    """The engine's host memory posing as a GPU (`_HostTestDevice`; the package's test builds
    have it, `scripts/test` requires it), or a skip where the build lacks it."""
    device_class = getattr(mooncake_kv._native, "_HostTestDevice", None)
    if device_class is None:
        if os.environ.get("MOONCAKE_KV_REQUIRE_TEST_DEVICE") == "1":
            pytest.fail("this build has no _HostTestDevice (the `host-test-device` feature)")
        pytest.skip("built without the host-test-device feature")
    return device_class(capacity)


def test_device_reads_on_the_host_test_device() -> None:
    """The binding's whole path with no GPU: values put into an HBM tier (and, once it fills,
    demoted to DRAM) read into "device memory" at the addresses given, byte for byte; a miss,
    a range too small, and an address outside the device's memory."""
    device = host_test_device(64 << 20)
    with device.embedded_store(64 << 20, 4 << 20) as store:
        keys = [unique("dev") for _ in range(8)]
        sizes = [1, 4096, 65536 + 7, 1 << 20, 1 << 20, 1 << 20, 1 << 20, 1 << 20]
        values = [pattern(key, size) for key, size in zip(keys, sizes)]
        for key, value in zip(keys, values):
            store.put(key, value)
        tiers = {tier["name"]: tier["blocks"] for tier in store.stats()["tiers"]}
        assert tiers["hbm"] > 0 and tiers["dram"] > 0, tiers  # both copies' paths are read

        target = device.allocate(sum(sizes) + 16 * len(sizes))
        offsets = [sum(sizes[:i]) + 16 * i for i in range(len(sizes))]
        lengths = store.get_into_device_batch(keys, [target + o for o in offsets], sizes)
        assert lengths == sizes
        for offset, value in zip(offsets, values):
            assert device.read(target + offset, len(value)) == value
        assert device.read(target + offsets[1] - 1, 1) == b"\0"  # nothing written past a value

        assert store.get_into_device(unique("absent"), target, 16) is None
        with pytest.raises(mooncake_kv.BufferTooSmallError):
            store.get_into_device(keys[3], target, 16)
        outside = device.allocate(16) + (1 << 30)  # no allocation there
        with pytest.raises(mooncake_kv.MooncakeKVError, match="not inside one allocation"):
            store.get_into_device(keys[2], outside, sizes[2])
