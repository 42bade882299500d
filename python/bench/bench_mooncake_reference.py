#!/usr/bin/env python3
"""Mooncake Store's own Python client under the workload of bench_get.py, for the ratio.

Run it with the `mooncake-transfer-engine-non-cuda` wheel installed (it ships
`mooncake_master`; its libraries need libibverbs1 and libnuma1 even without RDMA). One
master on loopback; one process contributes the memory (a store server, as a
`mooncake-kvd` is); the measuring process is a client-only `MooncakeDistributedStore`
(global segment 0) over the tcp protocol, reading a batch at a time with `batch_get_into`
into a registered numpy buffer, one thread, checking each value's first bytes.

    MC_TCP_BIND_ADDRESS=127.0.0.1 python bench_mooncake_reference.py \\
        [--sizes 65536,524288,2097152,8388608] [--seconds 5]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np

MASTER = "127.0.0.1:50151"
METADATA = "http://127.0.0.1:18080/metadata"


def setup(store, segment: int) -> None:
    code = store.setup("127.0.0.1", METADATA, segment, 256 << 20, "tcp", "", MASTER)
    if code != 0:
        raise SystemExit(f"setup failed: {code}")


def server(segment: int, ready, stop) -> None:
    from mooncake.store import MooncakeDistributedStore

    store = MooncakeDistributedStore()
    setup(store, segment)
    ready.set()
    stop.wait()
    store.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", default="65536,524288,2097152,8388608")
    parser.add_argument("--working-set-mib", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    os.environ.setdefault("MC_TCP_BIND_ADDRESS", "127.0.0.1")
    master_bin = shutil.which("mooncake_master") or os.path.join(
        os.path.dirname(sys.executable), "mooncake_master")
    master = subprocess.Popen(
        [master_bin, "-rpc_port", MASTER.split(":")[1], "-enable_http_metadata_server=true",
         "-http_metadata_server_host", "127.0.0.1", "-http_metadata_server_port", "18080",
         "-metrics_port", "19003"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    time.sleep(2)
    ready, stop = multiprocessing.Event(), multiprocessing.Event()
    holder = multiprocessing.Process(
        target=server, args=((3 * args.working_set_mib + 256) << 20, ready, stop))
    holder.start()
    try:
        if not ready.wait(60):
            raise SystemExit("the store server did not set up")
        from mooncake.store import MooncakeDistributedStore

        client = MooncakeDistributedStore()
        setup(client, 0)
        print("| value | Mooncake batch_get_into GB/s |")
        print("|---:|---:|")
        for size in [int(s) for s in args.sizes.split(",")]:
            keys = max(args.batch * 2, (args.working_set_mib << 20) // size)
            names = [f"mc/{size}/{i}" for i in range(keys)]
            values = np.random.default_rng(size).integers(0, 255, (keys, size), dtype=np.uint8)
            assert client.register_buffer(values.ctypes.data, values.nbytes) == 0
            for i in range(0, keys, 16):
                n = min(16, keys - i)
                codes = client.batch_put_from(
                    names[i : i + n], [values[j].ctypes.data for j in range(i, i + n)],
                    [size] * n)
                assert all(c == 0 for c in codes), codes
            into = np.zeros((args.batch, size), dtype=np.uint8)
            assert client.register_buffer(into.ctypes.data, into.nbytes) == 0
            ptrs = [into[i].ctypes.data for i in range(args.batch)]
            rng, rates = np.random.default_rng(1), []
            for _ in range(5):
                done, start = 0, time.perf_counter()
                while time.perf_counter() - start < args.seconds / 5:
                    first = int(rng.integers(0, keys - args.batch + 1))
                    got = client.batch_get_into(
                        names[first : first + args.batch], ptrs, [size] * args.batch)
                    assert got == [size] * args.batch, got
                    assert (into[0, :8] == values[first, :8]).all()
                    done += args.batch
                rates.append(done * size / (time.perf_counter() - start) / 1e9)
            print(f"| {size >> 10} KiB | {statistics.median(rates):.2f} |", flush=True)
            client.unregister_buffer(into.ctypes.data)
            client.unregister_buffer(values.ctypes.data)
            client.remove_all()
        client.close()
    finally:
        stop.set()
        holder.join(30)
        master.terminate()
        master.wait()


if __name__ == "__main__":
    main()
