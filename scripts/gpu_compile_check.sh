#!/usr/bin/env bash
# Lent-GPU check: does torch.compile with CUDA graphs bring single-frame official-256
# latency under 5 ms? Eager runs in the same call for a like-for-like ratio.
set -uo pipefail
export PYTHONUNBUFFERED=1
timeout 150 python3 -m benchmarks.model_speed --device cuda --presets official-256 --dtypes float16 \
  --batch-sizes 1,8 --compile reduce-overhead --warmup 3 --out "$OUT/model_speed_h200_compiled.json" 2>&1 | grep -v "^ " | tail -8
timeout 60 python3 -m benchmarks.model_speed --device cuda --presets official-256 --dtypes float16 \
  --batch-sizes 1,8 --out "$OUT/model_speed_h200_eager.json" 2>&1 | grep -v "^ " | tail -8
