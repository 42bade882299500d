"""Time to first token with a prompt's prefix KV fetched from the store, against recomputing it.

One run, side by side, on a Llama-architecture model with seeded random weights
(:class:`mooncake_kv.examples.prefix_cache.ModelSpec`; nothing is downloaded):

- for prompts of each length and each cached fraction (50%, 90%, all but the last block):
  the full recompute; the floor (the same model prefilling only the uncached tokens, the
  cached KV already in its memory); and the serving loop fetching the cached blocks from an
  embedded store, a `mooncake-kvd` over shared memory and over tcp. Medians of
  ``--repeats`` runs, the paths interleaved within each repeat. Every fetched prefix is
  checked against the recompute (first-token logits and KV, at most 1e-4 apart).
- the fetch's GB/s against `kvctl bench` reading values of the same size from the same node;
- the production trace's first requests replayed through the model, with a store holding a
  few percent of their distinct blocks and with none: prefill tokens saved, TTFT p50 / p90.

Prints markdown tables, and writes them as JSON (``--json``) and a plot (``--plot``). The
model runs on the CPU, or with ``--device cuda`` on a GPU, where the store's bytes pass
through a pinned host arena (the example's docstring, "On a GPU").

    python python/bench/bench_prefix.py --kvd target/release/mooncake-kvd \\
        --kvctl target/release/kvctl --plot docs/img/prefix-ttft.png

``python/scripts/prefix_bench.sh`` sets up the environment (torch, transformers,
matplotlib, the package in release mode) and runs this.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import pathlib
import statistics
import sys
import time
from typing import Dict, List

# OpenMP's threads sleep as soon as a parallel region ends instead of spinning for the next
# one. On a machine with few cores, torch's spinning threads took the core that the node's
# sender (tcp) needs for the fetch that follows every prefill: the same 63 MiB tcp fetch ran
# at 2.7 GB/s right after a matmul with the default policy, 3.6 GB/s with this one. Every path
# (the floor and the recompute included) runs under the same setting. Set before torch loads
# OpenMP; an OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402

import mooncake_kv  # noqa: E402
from mooncake_kv.examples.prefix_cache import ModelSpec, PrefixCachingLM, kv_difference  # noqa: E402

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_get import kvctl_gbps, start_kvd  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[2]
PATHS = ["embedded", "shm", "tcp", "hbm"]
"""Every path a run may have; ``hbm`` (``--hbm-mib``, on a GPU) only where asked for."""


def median(values: List[float]) -> float:
    return statistics.median(values)


def prompt_ttft(args, model, spec: ModelSpec, stores: Dict[str, mooncake_kv.Store],
                address: str) -> dict:
    block = args.block_tokens
    max_tokens = max(args.lengths)
    floor = PrefixCachingLM(model, None, block_tokens=block, namespace=spec.namespace,
                            max_tokens=max_tokens)
    loops = {name: PrefixCachingLM(model, store, block_tokens=block, namespace=spec.namespace,
                                   max_tokens=max_tokens, device_reads=name == "hbm")
             for name, store in stores.items()}
    block_bytes = block * floor.token_bytes
    reference_gbps = {}
    for transport in ("shm", "tcp"):
        reference_gbps[transport] = kvctl_gbps(
            args.kvctl, address, block_bytes, keys=max(16, (256 << 20) // block_bytes),
            batch=16, transport=transport, seconds=args.kvctl_seconds)
        print(f"kvctl bench, {block_bytes >> 10} KiB values over {transport}: "
              f"{reference_gbps[transport]:.2f} GB/s", flush=True)
    for store in stores.values():
        store.remove_all()

    rows = []
    generator = torch.Generator().manual_seed(args.seed)
    for length in args.lengths:
        tokens = torch.randint(0, spec.vocab, (length,), generator=generator).tolist()
        repeats = args.repeats if length <= args.long_from else args.long_repeats
        recompute = []
        for _ in range(repeats):
            started = time.perf_counter()
            logits, cache = floor.prefill_after(tokens, 0)
            floor.synchronize()
            recompute.append(time.perf_counter() - started)
        reference_kv = [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]
        floor.copy_to_arena(cache, 0, length)  # what the floor starts from
        del cache
        keys = floor.block_keys(tokens)
        buffers = [floor.block_buffer(i, length) for i in range(len(keys))]
        print(f"{length} tokens: recompute {median(recompute):.3f} s", flush=True)
        for label, cached_blocks in fractions(len(keys), args.fractions):
            cached = cached_blocks * block
            # The same transfer from kvctl, right before the row: as many values of the
            # block's size per batch as the row fetches (the run-wide reference above reads
            # 16 per batch, which stay in the last-level cache where a prefix of 32 MiB or
            # more does not), so the ratio compares the serving loop with the store's own
            # client at the same batch, measured minutes, not an hour, apart.
            same_batch = {
                transport: kvctl_gbps(
                    args.kvctl, address, block_bytes,
                    keys=max(2 * cached_blocks, (256 << 20) // block_bytes),
                    batch=cached_blocks, transport=transport, seconds=args.kvctl_seconds)
                for transport in ("shm", "tcp")
            }
            for store in stores.values():
                store.remove_all()
                store.put_chain(keys[:cached_blocks], buffers[:cached_blocks])
            times: Dict[str, List[float]] = {"floor": [], **{p: [] for p in stores}}
            fetch: Dict[str, List[float]] = {p: [] for p in stores}
            own: Dict[str, List[float]] = {p: [] for p in stores}
            for loop in loops.values():  # as kvctl's --warm-up: connections, mappings
                loop.fetch_blocks(keys[:cached_blocks], length)
            worst = 0.0
            for _ in range(repeats):
                started = time.perf_counter()
                floor_logits, floor_cache = floor.prefill_after(tokens, cached)
                floor.synchronize()
                times["floor"].append(time.perf_counter() - started)
                del floor_cache
                for name, loop in loops.items():
                    loop.arena.zero_()  # nothing but the fetch puts the prefix there
                    result = loop.prefill(tokens, put=False)
                    if result.cached_tokens != cached:
                        raise SystemExit(f"{name}: {result.cached_tokens} tokens cached, "
                                         f"expected {cached}")
                    times[name].append(result.ttft_s)
                    fetch[name].append(result.fetch_s)
                    own[name].append(result.lookup_s + result.fetch_s)
                    worst = max(worst, (result.logits - logits).abs().max().item(),
                                kv_difference(result.cache, reference_kv))
                    del result
            if worst > 1e-4:
                raise SystemExit(f"{length} tokens, {label}: the cached prefix differs from "
                                 f"the recompute by {worst:.2e}")
            row = {
                "tokens": length, "cached": label, "cached_tokens": cached,
                "repeats": repeats, "recompute_s": median(recompute),
                "floor_s": median(times["floor"]), "max_abs_diff": worst,
                "fetched_bytes": cached * floor.token_bytes,
                **{f"kvctl_{t}_same_batch_gbps": gbps for t, gbps in same_batch.items()},
            }
            for name in stores:
                row[f"{name}_s"] = median(times[name])
                row[f"{name}_fetch_s"] = median(fetch[name])
                row[f"{name}_fetch_gbps"] = row["fetched_bytes"] / median(fetch[name]) / 1e9
                # The store's own part of the TTFT (lookup and fetch), free of the prefill's
                # run-to-run spread, which on a busy 2-core machine is larger than the fetch.
                row[f"{name}_store_s"] = median(own[name])
            rows.append(row)
            print(format_row(row), flush=True)
    return {"block_tokens": block, "block_bytes": block_bytes,
            "kvctl_gbps": reference_gbps, "rows": rows}


def fractions(blocks: int, wanted: List[str]) -> List[tuple]:
    out = []
    for label in wanted:
        if label == "last":
            out.append(("all but the last block", blocks - 1))
        else:
            out.append((f"{label}%", blocks * int(label) // 100))
    return out


def format_row(row: dict) -> str:
    over = "  ".join(f"{p} {row[f'{p}_s']:.3f} s ({100 * (row[f'{p}_s'] / row['floor_s'] - 1):+.1f}%)"
                     for p in PATHS if f"{p}_s" in row)
    return (f"  {row['cached']:>24}: recompute {row['recompute_s']:.3f} s  "
            f"floor {row['floor_s']:.3f} s  {over}")


def trace_tokens(hash_ids: List[int], tokens: int, block: int, vocab: int,
                 memo: Dict[int, List[int]]) -> List[int]:
    """A request's prompt: each of the trace's blocks becomes ``block`` token ids that
    depend on its hash id alone, so requests that share a prefix share its tokens."""
    out: List[int] = []
    for hash_id in hash_ids[: math.ceil(tokens / block)]:
        if hash_id not in memo:
            memo[hash_id] = np.random.default_rng(hash_id).integers(0, vocab, block).tolist()
        out.extend(memo[hash_id])
    return out[:tokens]


def replay_trace(args, model, spec: ModelSpec) -> dict:
    requests = []
    with open(args.trace) as lines:
        for line in lines:
            if len(requests) == args.trace_requests:
                break
            requests.append(json.loads(line))
    block = args.trace_block_tokens
    memo: Dict[int, List[int]] = {}
    prompts = []
    for request in requests:
        tokens = max(1, math.ceil(request["input_length"] * block / args.trace_block_size))
        prompt = trace_tokens(request["hash_ids"], tokens, block, spec.vocab, memo)
        if prompt:
            prompts.append(prompt[: args.trace_max_tokens])
    distinct = len({h for r in requests for h in r["hash_ids"]})
    token_bytes = PrefixCachingLM(model, None, block_tokens=block, namespace="probe",
                                  max_tokens=1).token_bytes
    capacity_blocks = max(1, distinct * args.trace_capacity_percent // 100)
    # The DRAM tier in whole MiB (the engine's unit), a little over the blocks' bytes.
    dram = max(1 << 20, math.ceil(capacity_blocks * block * token_bytes / (1 << 20)) << 20)
    store = mooncake_kv.EmbeddedStore(dram)
    with_store = PrefixCachingLM(model, store, block_tokens=block, namespace=spec.namespace,
                                 max_tokens=args.trace_max_tokens)
    without = PrefixCachingLM(model, None, block_tokens=block, namespace=spec.namespace,
                              max_tokens=args.trace_max_tokens)
    ttft_with, ttft_without, cached, total, put_errors = [], [], 0, 0, 0
    for index, prompt in enumerate(prompts):
        # The order alternates: the first forward over a new shape pays for setting it up.
        if index % 2:
            baseline = without.prefill(prompt)
            result = with_store.prefill(prompt)
        else:
            result = with_store.prefill(prompt)
            baseline = without.prefill(prompt)
        ttft_with.append(result.ttft_s)
        ttft_without.append(baseline.ttft_s)
        cached += result.cached_tokens
        total += len(prompt)
        put_errors += result.put_error is not None
        if (result.logits - baseline.logits).abs().max().item() > 1e-4:
            raise SystemExit(f"trace request {index}: logits differ from the recompute")
        if index % 50 == 49:
            print(f"  trace: {index + 1} requests replayed", flush=True)
    store.close()
    quantile = lambda xs, q: float(np.quantile(np.array(xs), q))  # noqa: E731
    return {
        "requests": len(prompts), "block_tokens": block, "distinct_blocks": distinct,
        "capacity_blocks": capacity_blocks, "capacity_percent": args.trace_capacity_percent,
        "prompt_tokens": total, "cached_tokens": cached, "put_errors": put_errors,
        "ttft_with": ttft_with, "ttft_without": ttft_without,
        "p50_with": quantile(ttft_with, 0.5), "p90_with": quantile(ttft_with, 0.9),
        "p50_without": quantile(ttft_without, 0.5), "p90_without": quantile(ttft_without, 0.9),
        "total_with_s": sum(ttft_with), "total_without_s": sum(ttft_without),
    }


def print_tables(report: dict) -> None:
    if "ttft" in report:
        print_ttft(report["ttft"])
    print_trace(report.get("trace"))


def measured_paths(rows: List[dict]) -> List[str]:
    """The paths the run measured, in table order."""
    return [p for p in PATHS if rows and f"{p}_s" in rows[0]]


def print_ttft(ttft: dict) -> None:
    paths = measured_paths(ttft["rows"])
    print(f"\n### Time to first token ({ttft['block_tokens']}-token blocks of "
          f"{ttft['block_bytes'] >> 10} KiB; medians)\n")
    print("| prompt | cached | recompute | floor | " + " | ".join(paths) + " | speed-up (tcp) |")
    print("|---|---|---|---|" + "---|" * len(paths) + "---|")
    for row in ttft["rows"]:
        cells = [f"{row[f'{p}_s']:.3f} s ({100 * (row[f'{p}_s'] / row['floor_s'] - 1):+.1f}%)"
                 for p in paths]
        print(f"| {row['tokens']} | {row['cached']} | {row['recompute_s']:.2f} s | "
              f"{row['floor_s']:.3f} s | " + " | ".join(cells) +
              f" | {row['recompute_s'] / row['tcp_s']:.1f}x |")
    print("\n### The store's own time (lookup + fetch; medians) against the floor\n")
    print("| prompt | cached | floor | " + " | ".join(paths) + " |")
    print("|---|---|---|" + "---|" * len(paths))
    for row in ttft["rows"]:
        cells = [f"{1e3 * row[f'{p}_store_s']:.1f} ms ({100 * row[f'{p}_store_s'] / row['floor_s']:.1f}%)"
                 for p in paths]
        print(f"| {row['tokens']} | {row['cached']} | {row['floor_s']:.3f} s | " + " | ".join(cells) + " |")
    print(f"\n### The fetch against `kvctl bench` ({ttft['block_bytes'] >> 10} KiB values, "
          "same node)\n")
    hbm = "hbm" in paths
    print("| prompt | cached | MiB | embedded GB/s | shm GB/s (x kvctl, x same batch) "
          "| tcp GB/s (x kvctl, x same batch) |" + (" hbm GB/s |" if hbm else ""))
    print("|---|---|---|---|---|---|" + ("---|" if hbm else ""))
    ref = ttft["kvctl_gbps"]

    def cell(row: dict, transport: str) -> str:
        gbps = row[f"{transport}_fetch_gbps"]
        same = row.get(f"kvctl_{transport}_same_batch_gbps")
        against_same = f", {gbps / same:.2f}" if same else ""
        return f"{gbps:.2f} ({gbps / ref[transport]:.2f}{against_same})"

    for row in ttft["rows"]:
        print(f"| {row['tokens']} | {row['cached']} | {row['fetched_bytes'] >> 20} | "
              f"{row['embedded_fetch_gbps']:.2f} | {cell(row, 'shm')} | {cell(row, 'tcp')} |"
              + (f" {row['hbm_fetch_gbps']:.2f} |" if hbm else ""))
    print(f"\nkvctl bench, 16 values per batch: shm {ref['shm']:.2f} GB/s, "
          f"tcp {ref['tcp']:.2f} GB/s; at each row's batch (kvctl, shm / tcp): "
          + "; ".join(f"{row['tokens']} {row['cached']}: "
                      f"{row.get('kvctl_shm_same_batch_gbps', 0):.2f} / "
                      f"{row.get('kvctl_tcp_same_batch_gbps', 0):.2f}"
                      for row in ttft["rows"]))


def print_trace(trace: "dict | None") -> None:
    if trace:
        saved = trace["cached_tokens"] / trace["prompt_tokens"]
        print(f"\n### Production trace: first {trace['requests']} requests, "
              f"{trace['block_tokens']}-token blocks, store of {trace['capacity_blocks']} "
              f"blocks ({trace['capacity_percent']}% of {trace['distinct_blocks']} distinct)\n")
        print("| | prefill tokens | TTFT p50 | TTFT p90 | total |")
        print("|---|---|---|---|---|")
        print(f"| no store | {trace['prompt_tokens']} | {trace['p50_without']:.3f} s | "
              f"{trace['p90_without']:.3f} s | {trace['total_without_s']:.1f} s |")
        print(f"| with the store | {trace['prompt_tokens'] - trace['cached_tokens']} "
              f"({100 * saved:.1f}% saved) | {trace['p50_with']:.3f} s | "
              f"{trace['p90_with']:.3f} s | {trace['total_with_s']:.1f} s |")


def plot(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["ttft"]["rows"]
    trace = report.get("trace")
    figure, axes = plt.subplots(1, 2 if trace else 1, figsize=(13 if trace else 8, 4.6),
                                squeeze=False)
    ax = axes[0][0]
    series = [("recompute", "recompute_s", "#999999"), ("floor (KV in memory)", "floor_s", "#222222"),
              ("embedded", "embedded_s", "#1f77b4"), ("shm", "shm_s", "#2ca02c"),
              ("tcp", "tcp_s", "#d62728"), ("hbm", "hbm_s", "#9467bd")]
    series = [entry for entry in series if entry[1] in rows[0]]
    width = 0.8 / len(series)
    for i, (name, field, color) in enumerate(series):
        offset = (i - (len(series) - 1) / 2) * width
        ax.bar([x + offset for x in range(len(rows))], [r[field] for r in rows],
               width, label=name, color=color)
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels([f"{r['tokens'] // 1024}k\n{r['cached'].replace('all but the last block', 'all but last')}"
                        for r in rows], fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("time to first token (s, log)")
    ax.set_title("Prefix KV fetched from the store vs recomputed")
    ax.legend(fontsize=8)
    if trace:
        ax = axes[0][1]
        for name, field, color in [("no store", "ttft_without", "#999999"),
                                   ("with the store", "ttft_with", "#d62728")]:
            xs = sorted(trace[field])
            ax.plot(xs, [(i + 1) / len(xs) for i in range(len(xs))], label=name, color=color)
        ax.set_xscale("log")
        ax.set_xlabel("time to first token (s, log)")
        ax.set_ylabel("fraction of requests")
        ax.set_title(f"Production trace, first {trace['requests']} requests")
        ax.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--kvd", required=True, help="the mooncake-kvd binary (release)")
    parser.add_argument("--kvctl", required=True, help="the kvctl binary (release)")
    parser.add_argument("--lengths", default="1024,4096,16384",
                        help="prompt lengths in tokens, comma-separated; 'none' for the trace alone")
    parser.add_argument("--fractions", default="50,90,last",
                        help="cached fractions: percentages, and 'last' for all but the last block")
    parser.add_argument("--block-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--long-from", type=int, default=8192,
                        help="prompts longer than this run --long-repeats times")
    parser.add_argument("--long-repeats", type=int, default=1)
    parser.add_argument("--kvctl-seconds", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--trace", default=str(REPO.parent / "shared/traces/conversation_trace.jsonl"),
                        help="a JSON-lines request trace; 'none' skips the replay")
    parser.add_argument("--trace-requests", type=int, default=200)
    parser.add_argument("--trace-block-tokens", type=int, default=16,
                        help="model tokens per trace block (the trace's blocks are scaled down to this)")
    parser.add_argument("--trace-block-size", type=int, default=512,
                        help="tokens per block in the trace")
    parser.add_argument("--trace-capacity-percent", type=int, default=5)
    parser.add_argument("--trace-max-tokens", type=int, default=8192)
    parser.add_argument("--device", default="cpu",
                        help="where the model runs: cpu, or cuda[:N] (the store's bytes then "
                             "pass through pinned host memory)")
    parser.add_argument("--hbm-mib", type=int, default=0,
                        help="with --device cuda: one more path, an embedded store with an HBM "
                             "tier of this many MiB read straight into the model's arena")
    parser.add_argument("--json", help="write the figures here")
    parser.add_argument("--plot", help="write a PNG plot here")
    args = parser.parse_args()
    args.lengths = [] if args.lengths == "none" else [int(x) for x in args.lengths.split(",")]
    args.fractions = args.fractions.split(",")
    torch.manual_seed(args.seed)

    spec = ModelSpec()
    device = torch.device(args.device)
    if args.hbm_mib and device.type != "cuda":
        parser.error("--hbm-mib reads into GPU memory: it needs --device cuda")
    model = spec.build().to(device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"model: {spec} on {where}; torch {torch.__version__}, {torch.get_num_threads()} "
          f"threads, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}", flush=True)
    report: dict = {"model": spec.__dict__, "device": where, "torch": torch.__version__,
                    "threads": torch.get_num_threads(),
                    "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    if args.lengths:
        kv_mib = max(args.lengths) * 16 // 1024 * 2 + 512
        process, address = start_kvd(args.kvd, kv_mib)
        stores: Dict[str, mooncake_kv.Store] = {}
        try:
            stores["embedded"] = mooncake_kv.EmbeddedStore(kv_mib << 20)
            stores["shm"] = mooncake_kv.Client(address, transport="shm")
            stores["tcp"] = mooncake_kv.Client(address, transport="tcp")
            if args.hbm_mib:
                stores["hbm"] = mooncake_kv.EmbeddedStore(
                    kv_mib << 20, hbm_bytes=args.hbm_mib << 20, hbm_device=device.index or 0)
            report["ttft"] = prompt_ttft(args, model, spec, stores, address)
        finally:
            for store in stores.values():
                store.close()
            process.terminate()
            process.wait()
    if args.trace != "none":
        report["trace"] = replay_trace(args, model, spec)
    print_tables(report)
    if args.json:
        pathlib.Path(args.json).write_text(json.dumps(report, indent=1))
    if args.plot and "ttft" in report:
        plot(report, args.plot)
        print(f"\nplot written to {args.plot}")


if __name__ == "__main__":
    main()
