#!/usr/bin/env python3
"""Reads through the Python binding against `kvctl bench` on the same node, side by side.

For each value size and data path (tcp, shared memory) the script puts a working set on one
`mooncake-kvd`, then reads it back, one thread, a batch at a time, three ways in one run:

- `kvctl bench` (Rust, no Python): the reference the binding is held to (its bytes per
  second spent in reads, without the check of every byte it makes after each);
- `Store.get_into_batch` into rows of a numpy array (the Pythonic API);
- `MooncakeDistributedStore.batch_get_into` into a registered numpy buffer (the pointer API
  SGLang and LMCache use);

and prints GB/s and the binding's cost against kvctl. Every read is checked (kvctl counts
wrong values; here each value's first and last 8 bytes are compared).

    python python/bench/bench_get.py --kvd target/release/mooncake-kvd \\
        --kvctl target/release/kvctl [--sizes 65536,524288,2097152,8388608] [--seconds 5]

Build the package in release mode for figures (`maturin develop --release`): the tests'
build is the dev profile.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import numpy as np

import mooncake_kv
from mooncake_kv import MooncakeDistributedStore


def start_kvd(binary: str, dram_mib: int) -> tuple[subprocess.Popen, str]:
    process = subprocess.Popen(
        [binary, "--memory-only", "--dram-mib", str(dram_mib), "--listen", "127.0.0.1:0",
         "--data-listen", "127.0.0.1:0", "--metrics-listen", "off"],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )
    line = process.stdout.readline()  # type: ignore[union-attr]
    fields = dict(w.split("=", 1) for w in line.split() if "=" in w)
    return process, fields["control"]


def kvctl_gbps(kvctl: str, address: str, size: int, keys: int, batch: int,
               transport: str, seconds: float) -> float:
    out = subprocess.run(
        [kvctl, "bench", "--json", "--addr", address, "--value-size", str(size),
         "--keys", str(keys), "--batch", str(batch), "--concurrency", "1",
         "--read-percent", "100", "--transport", transport, "--duration", str(seconds),
         "--warm-up", "1", "--key-prefix", f"kvctl/{size}/"],
        check=True, capture_output=True, text=True,
    ).stdout
    report = json.loads(out)
    if report.get("wrong_values", 0):
        raise SystemExit(f"kvctl bench read {report['wrong_values']} wrong values")
    # Bytes per second spent in the reads themselves: kvctl then checks every byte of each
    # value, which the Python loops below do not (they check a few).
    return float(report["read_mib_per_busy_second"]) * (1 << 20) / 1e9


def run_python(read_batch, size: int, keys: int, batch: int, seconds: float,
               check: np.ndarray) -> float:
    """GB/s of `read_batch(first_key_index)` (which reads `batch` values), median of 5
    slices of `seconds / 5`, after a second unmeasured."""
    rng = np.random.default_rng(1)
    warm_up = time.perf_counter()  # unmeasured, as kvctl's --warm-up
    while time.perf_counter() - warm_up < 1:
        read_batch(int(rng.integers(0, keys - batch + 1)))
    rates = []
    for _ in range(5):
        done, start = 0, time.perf_counter()
        while True:
            first = int(rng.integers(0, keys - batch + 1))
            read_batch(first)
            done += batch
            elapsed = time.perf_counter() - start
            if elapsed >= seconds / 5:
                break
        rates.append(done * size / elapsed / 1e9)
    if not check.all():
        raise SystemExit("a read missed or came back wrong")
    return statistics.median(rates)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kvd", required=True)
    parser.add_argument("--kvctl", required=True)
    parser.add_argument("--sizes", default="65536,524288,2097152,8388608")
    parser.add_argument("--working-set-mib", type=int, default=256)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()
    process, address = start_kvd(args.kvd, 3 * args.working_set_mib + 256)
    rows = []
    try:
        for size in [int(s) for s in args.sizes.split(",")]:
            keys = max(args.batch * 2, (args.working_set_mib << 20) // size)
            names = [f"py/{size}/{i}" for i in range(keys)]
            values = np.random.default_rng(size).integers(0, 255, (keys, size), dtype=np.uint8)
            for transport in ("tcp", "shm"):
                store = mooncake_kv.Client(address, transport=transport)
                if transport == "tcp":
                    for i in range(0, keys, 16):
                        store.put_batch(names[i : i + 16], list(values[i : i + 16]))
                reference = kvctl_gbps(args.kvctl, address, size, keys, args.batch,
                                       transport, args.seconds)
                into = np.zeros((args.batch, size), dtype=np.uint8)
                rows_into = list(into)
                ok = np.ones(1, dtype=bool)

                def pythonic(first: int) -> None:
                    n = store.get_into_batch(names[first : first + args.batch], rows_into)
                    ok[0] &= n == [size] * args.batch and bool(
                        (into[-1, -8:] == values[first + args.batch - 1, -8:]).all())

                native = run_python(pythonic, size, keys, args.batch, args.seconds, ok)
                store.close()

                mds = MooncakeDistributedStore()
                os.environ["MOONCAKE_KV_TRANSPORT"] = transport  # as a deployment would
                assert mds.setup("localhost", "P2PHANDSHAKE", 0, 0, "tcp", "", address) == 0
                assert mds.register_buffer(into.ctypes.data, into.nbytes) == 0
                ptrs = [into.ctypes.data + i * size for i in range(args.batch)]
                sizes = [size] * args.batch

                def pointers(first: int) -> None:
                    n = mds.batch_get_into(names[first : first + args.batch], ptrs, sizes)
                    ok[0] &= n == sizes and bool(
                        (into[0, :8] == values[first, :8]).all())

                compat = run_python(pointers, size, keys, args.batch, args.seconds, ok)
                mds.close()
                if transport == "shm":  # the next size starts from an empty node
                    with mooncake_kv.Client(address) as cleaner:
                        cleaner.remove_all()
                rows.append((size, transport, reference, native, compat))
                print(f"{size:>9} {transport:>4}  kvctl {reference:6.2f} GB/s  "
                      f"get_into_batch {native:6.2f} ({native / reference:5.2f}x)  "
                      f"batch_get_into {compat:6.2f} ({compat / reference:5.2f}x)",
                      flush=True)
    finally:
        process.terminate()
        process.wait()
    print("\n| value | path | kvctl bench GB/s | get_into_batch GB/s (ratio) "
          "| batch_get_into GB/s (ratio) |")
    print("|---:|---|---:|---:|---:|")
    for size, transport, reference, native, compat in rows:
        print(f"| {size >> 10} KiB | {transport} | {reference:.2f} | "
              f"{native:.2f} ({native / reference:.2f}) | {compat:.2f} ({compat / reference:.2f}) |")


if __name__ == "__main__":
    sys.exit(main())
