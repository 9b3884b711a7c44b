#!/usr/bin/env bash
# The issue-8 figures on one accelerator machine, in one go: train step (fp32/bf16, several
# batches, memory), full pipeline vs on-device data, host feed, inference. Logs go to
# ${1:-bench_logs}/.
#
#   bash benchmarks/gpu_suite.sh [LOG_DIR]
#
# Needs the package's dependencies (pip install -e ".[onnx]" + jax2onnx --no-deps, or the same
# as wheels on a machine without network) and JAX with the accelerator's plugin.
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-bench_logs}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/gpu.txt" 2>&1 || true
python -c "import jax; print(jax.__version__, jax.devices())" | tee "$out/jax.txt"
python benchmarks/train_step.py --batch_sizes 32,64,128,256 --dtypes float32,bfloat16 \
    2>&1 | tee "$out/train_step.txt"
python benchmarks/end_to_end.py --batch 128 --dtype bfloat16 --num_images 1024 --steps 100 \
    2>&1 | tee "$out/end_to_end.txt"
# The host feed with the workers training would use (all cores but two): the main process's
# images/s per core, now with a real host-to-device copy.
workers="$(python -c 'from bpnet_jax.data import input_pipeline as ip
print(ip.auto_num_workers("gpu"))')"
python benchmarks/input_pipeline.py --batch 128 --num_images 512 --batches 40 \
    --workers "$workers" 2>&1 | tee "$out/input_pipeline.txt"
python benchmarks/inference.py --repeats 50 2>&1 | tee "$out/inference.txt"
