#!/usr/bin/env bash
# The accelerator record of issue 13, item 6, as one prepared script (well under
# 10 minutes on an H100/H200). Run from the repository root on a machine with a GPU
# and jax[cuda] installed; it writes into experiments/results/bench/gpu_<name>_*
# (the GPU's name from nvidia-smi, spaces as underscores) and prints each file.
#
#   bash experiments/gpu_record.sh [PYTHON]
#
# Nothing in the project needs a GPU; this only records numbers where one exists.
set -euo pipefail
PY="${1:-python}"
NAME="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '_')"
OUT="experiments/results/bench/gpu_${NAME}"
mkdir -p "$(dirname "$OUT")"
export FEDJAX_KD_CACHE_DIR="$(mktemp -d)"

# 1. vmap round vs per-client loop vs centralized, K = 10 ... 10,000 (both algorithms).
timeout 300 "$PY" -m fedjax_kd bench --clients 10,100,1000,10000 --reps 5 \
  --max-loop-seconds 20 --json "${OUT}_bench.json" | tee "${OUT}_bench.txt"

# 2. 8 seeds as one parallel sweep vs sequential (one repetition each).
timeout 240 "$PY" experiments/parallel_sweep.py --reps 1 --json "${OUT}_parallel_sweep.json" \
  > /dev/null

# 3. Compile times, cold and warm cache.
timeout 120 "$PY" experiments/compile_cache.py --reps 1 > "${OUT}_compile_cache.json"

# 4. Peak device memory of the default run and of a 10,000-client FedAvg round.
timeout 120 "$PY" - > "${OUT}_memory.json" <<'EOF'
import json

import jax

from fedjax_kd import experiment

rows = {}
for name, overrides in {
    "default": [],
    "synthetic_20000_users_10000_clients": [
        ("data.name", "synthetic"), ("data.num_clients", "20000"),
        ("clients_per_round", "10000"), ("rounds", "2"), ("eval_every", "2"),
    ],
}.items():
    summary = experiment.run(experiment.resolve(overrides=overrides), progress=False).summary
    stats = jax.devices()[0].memory_stats() or {}
    rows[name] = {"summary": summary, "peak_bytes_in_use": stats.get("peak_bytes_in_use")}
print(json.dumps({"device": jax.devices()[0].device_kind, "runs": rows}, indent=1))
EOF
ls -l "${OUT}"_*
