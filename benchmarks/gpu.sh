#!/usr/bin/env bash
# The round's GPU checks in one go, for a machine with CUDA and the project's packages
# installed: the CUDA tests, then the round and scaling benchmarks on the GPU, with their
# ratio tables. Results land in $RESULTS (default gpu-results/).
set -euo pipefail
cd "$(dirname "$0")/.."
out="${RESULTS:-gpu-results}"
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -m pytest tests/test_fast_path.py -p no:cacheprovider -q -rs -k "cuda or triton" \
    | tee "$out/tests.txt"
bench=(--device cuda --benchmark-enable -p no:cacheprovider -q)
python3 -m pytest benchmarks/test_round.py "${bench[@]}" --benchmark-json="$out/round.json" \
    -k "k2 or (k4 and layer and (resnet50 or resnet18))"
python3 -m pytest benchmarks/test_scaling.py "${bench[@]}" --benchmark-json="$out/scaling.json"
python3 benchmarks/ratios.py "$out/round.json" | tee "$out/round.md"
python3 benchmarks/ratios.py "$out/scaling.json" | tee "$out/scaling.md"
