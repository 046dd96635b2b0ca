#!/usr/bin/env bash
# One call of a lent GPU machine: train a built-in model candidate ($CONFIG, default gpu_model.yaml) for $MINUTES
# on the Opus pack of the offline corpus, resuming from $STATE (default recipes/offline_speech/state/gpu_last.pt)
# when it exists. Results under $OUT: the files named in $RETURN (default last.pt = resumable state, best.pt = best
# validation, train.log, config.yaml) and gpu.txt, also when training fails (its console tail then goes to stderr).
# Two candidates can share one call and GPU, each with its own OUT, EXP and STATE (see the recipe README).
#
#   python recipes/offline_speech/prepare.py --out /work/corpus                        # here, once (545 MB of wav)
#   python recipes/offline_speech/pack_corpus.py --corpus /work/corpus --out .corpus_pack   # ~44 MiB: travels
#   device run: MINUTES=8 bash recipes/offline_speech/gpu_session.sh     with carry [".whl", ".corpus_pack"]
#   then here: cp <files_at>/last.pt recipes/offline_speech/state/gpu_last.pt; the next call resumes from it
#   (or, where the full state would not travel, save the weights as gpu_model.yaml's trainer.init_from file,
#   state/gpu_model_weights.pt; gpu_small.yaml's state lives in state/gpu_small_last.pt: see the recipe README).
#
# Extra arguments are config overrides (key=value), e.g. trainer.device=cpu for a dry run.
set -eu
source scripts/device_env.sh
MINUTES=${MINUTES:-8}
CONFIG=${CONFIG:-recipes/offline_speech/gpu_model.yaml}
RETURN=${RETURN:-last.pt best.pt train.log config.yaml}
PACK=${PACK:-.corpus_pack}
STATE=${STATE:-recipes/offline_speech/state/gpu_last.pt}
EXP=${EXP:-/tmp/mossformer2_gpu_exp}
if [ ! -d "$PACK/train" ] || [ ! -d "$PACK/valid" ]; then
    echo "error: no packed corpus at $PACK (build it with recipes/offline_speech/pack_corpus.py and carry it)" >&2
    exit 1
fi
mkdir -p "$EXP"
if [ -f "$STATE" ] && [ ! -f "$EXP/last.pt" ]; then
    cp "$STATE" "$EXP/last.pt"
fi
(nvidia-smi --query-gpu=name,memory.total --format=csv 2>/dev/null || echo "no GPU") >"$OUT/gpu.txt"
status=0
"$PYTHON" -m mossformer2 train --config "$CONFIG" --exp-dir "$EXP" \
    trainer.max_minutes="$MINUTES" data.dynamic_mixing.train_utterances="$PACK/train" \
    data.dynamic_mixing.valid_utterances="$PACK/valid" "$@" >"$EXP/console.log" 2>&1 || status=$?
for name in $RETURN; do
    if [ -f "$EXP/$name" ]; then
        cp "$EXP/$name" "$OUT/"
    fi
done
if [ "$status" -ne 0 ]; then
    echo "error: training ($CONFIG) exited with status $status; the end of its console output:" >&2
    tail -n 40 "$EXP/console.log" >&2
fi
exit "$status"
