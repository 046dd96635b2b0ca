#!/usr/bin/env bash
# One call of a lent GPU machine: the separation checks (gpu_checks.py) and the speed / memory benchmark
# (benchmark.py), each under its own time limit (seconds; 0 skips the step), results under $OUT (JSON + logs +
# a kernel profile).
#
#   bash benchmarks/device_session.sh            # on the GPU machine, from the repository root
#   CHECKS_LIMIT=0 BENCH_LIMIT=0 SHIFTED_LIMIT=240 bash benchmarks/device_session.sh
#       # only latency: every variant with the default convs, then the compiled ones with shifted sums (~8 min)
#
# Missing pure-Python / manylinux dependencies travel as wheels in .whl/ (scripts/device_env.sh).
set -u
source scripts/device_env.sh
CHECKS_LIMIT=${CHECKS_LIMIT:-200} BENCH_LIMIT=${BENCH_LIMIT:-120} LATENCY_LIMIT=${LATENCY_LIMIT:-240}
SHIFTED_LIMIT=${SHIFTED_LIMIT:-0}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
"$PYTHON" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" | tee -a "$OUT/gpu.txt"

# Issue 3: padded batch == alone, bf16 / fp16 vs fp32, CUDA graphs == eager, a 1-hour file (full model).
[ "$CHECKS_LIMIT" -gt 0 ] && timeout "$CHECKS_LIMIT" "$PYTHON" benchmarks/gpu_checks.py --device cuda --minutes "${MINUTES:-60}" \
    --long-dtype bfloat16 --long-batch-size 8 --long-cuda-graphs \
    --json "$OUT/gpu_checks.json" 2>&1 | tee "$OUT/gpu_checks.log"

# Issue 6: batch-16 throughput, 5-minute file through the Separator, training steps (batch 1 and 8).
[ "$BENCH_LIMIT" -gt 0 ] && timeout "$BENCH_LIMIT" "$PYTHON" benchmarks/benchmark.py --device cuda --sections throughput,separator,training \
    --variants bf16,graph-bf16 --train-batches 1,8 --json "$OUT/bench_throughput_training.json" \
    2>&1 | tee "$OUT/bench_throughput_training.log"

# Issue 6: batch-1 latency of every variant (compiled ones last: they take longest), plus a kernel profile.
[ "$LATENCY_LIMIT" -gt 0 ] && timeout "$LATENCY_LIMIT" "$PYTHON" benchmarks/benchmark.py --device cuda --sections latency --repeats 20 \
    --warmup 3 --variants tf32,bf16,fp16,graph,graph-bf16,graph-fp16,regional-compile-graph-bf16,compile-cudagraphs \
    --time-budget $((LATENCY_LIMIT - 60)) --profile "$OUT/profile.txt" --json "$OUT/bench_latency.json" \
    2>&1 | tee "$OUT/bench_latency.log"

# Issue 6: the compiled variants with depth-wise convs as shifted sums (models.convolution.depthwise_shifted_sum),
# which torch.compile fuses on the [B, T, C] layout: no conv kernel, no layout copies. Batch 1 and 16.
[ "$SHIFTED_LIMIT" -gt 0 ] && timeout "$SHIFTED_LIMIT" "$PYTHON" benchmarks/benchmark.py --device cuda \
    --cuda-depthwise shifted_sum --sections latency,throughput --repeats 20 --warmup 3 \
    --variants compile-cudagraphs,regional-compile-graph-bf16 --time-budget $((SHIFTED_LIMIT - 30)) \
    --json "$OUT/bench_shifted.json" 2>&1 | tee "$OUT/bench_shifted.log"
exit 0
