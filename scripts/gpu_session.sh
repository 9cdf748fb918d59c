#!/usr/bin/env bash
# One lent-GPU session, run by the device tool from the repo root (its system python3 has
# torch): tries the demo training config on CUDA (capped at 300 s; on 2026-11-26 it reached
# step 2,000 at 8-9 it/s, bound by the synthetic data loader, so the committed demo was
# trained on the CPU), then records GPU training and inference speed.
# Everything lands in $OUT/results.tar, split into <16 MiB parts.
set -uo pipefail
export PYTHONUNBUFFERED=1
R=$OUT/results; mkdir -p "$R"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$R/gpu.txt"
python3 -c "import torch; print('torch', torch.__version__)" | tee -a "$R/gpu.txt"

# 1. The demo checkpoint: exactly the committed command, on CUDA.
start=$(date +%s)
timeout 300 python3 -m training.train --config training/configs/demo-tiny.yaml device=cuda 2>&1 \
  | tr '\r' '\n' | grep -v '^train: ' > "$R/train.log"
echo "train_seconds $(( $(date +%s) - start ))" | tee -a "$R/gpu.txt"
tail -3 "$R/train.log"
cp runs/demo-tiny/metrics.jsonl runs/demo-tiny/config.yaml "$R/"
ls runs/demo-tiny/samples | tail -1 | xargs -I{} cp runs/demo-tiny/samples/{} "$R/last_sample.png"
python3 -m model.release runs/demo-tiny/last.safetensors "$R/demo-tiny-64.safetensors"

# 2. Training speed per preset, fp32 and AMP.
for amp in off bf16 fp16; do
  timeout 50 python3 -m benchmarks.train_speed --device cuda --amp $amp \
    --presets tiny-64,small-128,official-256 --batch-sizes 8 --iters 10 \
    --out "$R/train_speed_cuda_$amp.json" 2>&1 | tail -4
done

# 3. Inference speed of official-256, fp32 and fp16, single frame and batched.
timeout 80 python3 -m benchmarks.model_speed --device cuda --presets official-256 \
  --dtypes float32,float16 --batch-sizes 1,8,64 --out "$R/model_speed_cuda.json" 2>&1 | tail -12

tar -cf "$OUT/results.tar" -C "$OUT" results && rm -rf "$R"
split -b 15m "$OUT/results.tar" "$OUT/results.tar.part-" && rm "$OUT/results.tar"
ls -la "$OUT"
