#!/usr/bin/env bash
# One call of a lent GPU machine: the separation checks (gpu_checks.py) and the speed / memory benchmark
# (benchmark.py), each under its own time limit, results under $OUT (JSON + logs + a kernel profile).
#
#   bash benchmarks/device_session.sh            # on the GPU machine, from the repository root
#
# Missing pure-Python / manylinux dependencies travel as wheels in .whl/ (scripts/device_env.sh).
set -u
source scripts/device_env.sh
CHECKS_LIMIT=${CHECKS_LIMIT:-200} BENCH_LIMIT=${BENCH_LIMIT:-120} LATENCY_LIMIT=${LATENCY_LIMIT:-240}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
"$PYTHON" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"

# Issue 3: padded batch == alone, bf16 / fp16 vs fp32, CUDA graphs == eager, a 1-hour file (full model).
timeout "$CHECKS_LIMIT" "$PYTHON" benchmarks/gpu_checks.py --device cuda --minutes "${MINUTES:-60}" \
    --long-dtype bfloat16 --long-batch-size 8 --long-cuda-graphs \
    --json "$OUT/gpu_checks.json" 2>&1 | tee "$OUT/gpu_checks.log"

# Issue 6: batch-16 throughput, 5-minute file through the Separator, training steps (batch 1 and 8).
timeout "$BENCH_LIMIT" "$PYTHON" benchmarks/benchmark.py --device cuda --sections throughput,separator,training \
    --variants bf16,graph-bf16 --train-batches 1,8 --json "$OUT/bench_throughput_training.json" \
    2>&1 | tee "$OUT/bench_throughput_training.log"

# Issue 6: batch-1 latency of every variant (compiled ones last: they take longest), plus a kernel profile.
timeout "$LATENCY_LIMIT" "$PYTHON" benchmarks/benchmark.py --device cuda --sections latency --repeats 20 \
    --warmup 3 --variants tf32,bf16,fp16,graph,graph-bf16,graph-fp16,regional-compile-graph-bf16,compile-cudagraphs \
    --time-budget $((LATENCY_LIMIT - 60)) --profile "$OUT/profile.txt" --json "$OUT/bench_latency.json" \
    2>&1 | tee "$OUT/bench_latency.log"
