#!/usr/bin/env bash
# One call of a lent GPU machine: the separation checks (gpu_checks.py) and the speed / memory benchmark
# (benchmark.py), each under its own time limit (seconds; 0 skips the step), results under $OUT (JSON + logs +
# a kernel profile).
#
#   bash benchmarks/device_session.sh            # on the GPU machine, from the repository root (~9 min)
#   CHECKS_LIMIT=0 BENCH_LIMIT=0 LATENCY_VARIANTS=graph-bf16,regional-compile-graph-bf16,graph-bf16-weights,\
#       regional-compile-graph-bf16-weights LATENCY_SECTIONS=latency,throughput bash benchmarks/device_session.sh
#       # the best variants only (~4 min)
#
# Missing pure-Python / manylinux dependencies travel as wheels in .whl/ (scripts/device_env.sh).
# A failing step does not stop the later ones, but the script exits 1 at the end and names the failed steps.
set -u -o pipefail  # pipefail: a step's status is its command's, not tee's
source scripts/device_env.sh
CHECKS_LIMIT=${CHECKS_LIMIT:-300} BENCH_LIMIT=${BENCH_LIMIT:-120} LATENCY_LIMIT=${LATENCY_LIMIT:-240}
PROFILE_LIMIT=${PROFILE_LIMIT:-0}
# The test suite's CUDA-only tests (conv layouts, a CUDA training run in fp32 / bf16 / fp16 resumed on the CPU):
# CI has no GPU, so this is the only place they run. Needs pytest in .whl/ (scripts/device_env.sh).
PYTEST_LIMIT=${PYTEST_LIMIT:-150}
# Extra benchmark.py flags for the latency and compiled-profile steps, e.g. "--compile-layout shifted_sum" (the
# compiled convs' fused form instead of the default stored inputs) or "--compile-mode max-autotune-no-cudagraphs"
# (the compiled regions' matrix multiplies tuned at compile time).
BENCH_FLAGS=${BENCH_FLAGS:-}
CHECKS=${CHECKS:-padded_batch,dtypes,cuda_graphs,compiled}
# LONG_COMPILE=1: the long file through Separator(compile_layers=True) (timed on a second pass, after compiling).
LONG_COMPILE=${LONG_COMPILE:-}
LATENCY_SECTIONS=${LATENCY_SECTIONS:-latency}
# Compiled variants last: they take longest. regional-compile-graph-bf16 runs MossFormer2.compile_layers (shifted-sum
# depth-wise convs over stored inputs by default); compiling the whole model with them did not finish in 240 s on an H200.
LATENCY_VARIANTS=${LATENCY_VARIANTS:-tf32,bf16,fp16,graph,graph-bf16,graph-fp16,regional-compile-graph-bf16,graph-bf16-weights,regional-compile-graph-bf16-weights}
FAILED=()
note() {  # note STEP STATUS: remember a failed step (124: its time limit ran out)
    [ "$2" -eq 0 ] || FAILED+=("$1 (exit $2)")
}

nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/gpu.txt"
note nvidia-smi $?
"$PYTHON" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name())" 2>&1 | tee -a "$OUT/gpu.txt"
note torch-cuda $?

if [ "$PYTEST_LIMIT" -gt 0 ]; then
    timeout "$PYTEST_LIMIT" "$PYTHON" -m pytest -q -p no:cacheprovider -k cuda tests/models/test_model.py \
        tests/training/test_trainer.py 2>&1 | tee "$OUT/pytest_cuda.log"
    note pytest_cuda $?
fi

# Issue 3: padded batch == alone, bf16 / fp16 vs fp32, CUDA graphs == eager, compiled layers == eager, a long file.
if [ "$CHECKS_LIMIT" -gt 0 ]; then
    timeout "$CHECKS_LIMIT" "$PYTHON" benchmarks/gpu_checks.py --device cuda --checks "$CHECKS" \
        --minutes "${MINUTES:-60}" --long-dtype bfloat16 --long-batch-size 8 --long-cuda-graphs ${LONG_COMPILE:+--long-compile} \
        --json "$OUT/gpu_checks.json" 2>&1 | tee "$OUT/gpu_checks.log"
    note gpu_checks $?
fi

# Issue 6: batch-16 throughput, 5-minute file through the Separator, training steps (batch 1 and 8).
if [ "$BENCH_LIMIT" -gt 0 ]; then
    timeout "$BENCH_LIMIT" "$PYTHON" benchmarks/benchmark.py --device cuda --sections throughput,separator,training \
        --variants bf16,graph-bf16 --train-batches 1,8 --json "$OUT/bench_throughput_training.json" \
        2>&1 | tee "$OUT/bench_throughput_training.log"
    note bench_throughput_training $?
fi

# Issue 6: batch-1 latency of every variant, plus a kernel profile.
if [ "$LATENCY_LIMIT" -gt 0 ]; then
    timeout "$LATENCY_LIMIT" "$PYTHON" benchmarks/benchmark.py --device cuda --sections "$LATENCY_SECTIONS" \
        --repeats 20 --warmup 3 --variants "$LATENCY_VARIANTS" \
        --time-budget $((LATENCY_LIMIT - 60)) --profile "$OUT/profile.txt" --json "$OUT/bench_latency.json" \
        $BENCH_FLAGS 2>&1 | tee "$OUT/bench_latency.log"
    note bench_latency $?
fi

# Issue 6: where the best variant's time goes: kernel tables of the compiled-layers model (bf16, no CUDA graph so
# that each generated kernel shows) at batch 1 and 16. Off by default (PROFILE_LIMIT=240 turns it on, ~3 min).
if [ "$PROFILE_LIMIT" -gt 0 ]; then
    timeout "$PROFILE_LIMIT" "$PYTHON" benchmarks/benchmark.py --device cuda --sections "" \
        --profile-compiled "$OUT/profile_compiled.txt" $BENCH_FLAGS 2>&1 | tee "$OUT/profile_compiled.log"
    note profile_compiled $?
fi

if [ ${#FAILED[@]} -gt 0 ]; then
    printf -v list '%s; ' "${FAILED[@]}"
    echo "device_session: failed steps: ${list%; }" | tee "$OUT/failed_steps.txt" >&2
    exit 1
fi
echo "device_session: all steps passed"
