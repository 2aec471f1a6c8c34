#!/bin/sh
# tools/train_tiny.sh -- the trained tiny DeepSeek V4, from nothing to GGUFs and figures.
#
#   sh tools/train_tiny.sh data             # here (CPU, ~5 min): build/train-data/ from this machine's files
#   sh tools/train_tiny.sh gpu              # on the H200 (device tool, one command): train, export
#   sh tools/train_tiny.sh finish [CKPT]    # here: convert, perplexity, tool calls, vectors check
#   sh tools/train_tiny.sh smoke            # here, CPU only: data + a bounded smoke training + finish
#
# The GPU step needs only python3 with torch (no ds4 build, no network): the data is made
# here, where ds4 renders and tokenizes it, and travels with the working tree (carry
# build/train-data). With the device tool:
#
#   run(command="sh tools/train_tiny.sh gpu", carry=["build/train-data"], timeout_s=600)
#
# then copy the returned trained/ folder to build/trained and run `finish` here. One command
# may run 10 minutes: the gpu step ends within BUDGET_S (540) seconds of its start, whatever
# MINUTES says (training stops early enough to evaluate and export; OFFICIAL takes OFFICIAL_S,
# 120, of it); the checkpoint is also exported every 2 minutes and on SIGTERM, in shards under
# 12 MiB (the device tool brings back files under 16 MiB).
# Environment: MINUTES (training budget, default 8 on the GPU, 20 for smoke), SEED (1),
# OFFICIAL (a directory holding DeepSeek's inference/model.py: the gpu step then also writes
# oracle vectors for the trained checkpoint with vectors/gen_vectors.py, or `finish` does on
# the CPU when the gpu step brought none; DeepSeek's code is never committed here), PORT
# (18181, for the server during `finish`), PYTHON (the python3 that has torch; `finish` skips
# the training-model vectors check without one).
set -eu
stage=${1:-}
DATA=${DATA:-build/train-data}
SEED=${SEED:-1}
PY=${PYTHON:-python3}

data() {
    make ds4 >/dev/null
    $PY tools/make_train_data.py --out $DATA --seed "$SEED" --text-mb "${TEXT_MB:-4}" \
        --convs "${CONVS:-10000}" --eval-convs 200 --eval-requests 120 --val-requests 96
}

gpu() {
    start=$(date +%s)
    out=${OUT:-build}/trained
    end=$((start + ${BUDGET_S:-540}))
    [ -z "${OFFICIAL:-}" ] || end=$((end - ${OFFICIAL_S:-120}))
    export PYTHONUNBUFFERED=1
    $PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available())'
    $PY tools/train_tiny.py --check
    $PY tools/train_tiny.py --data $DATA --out "$out" --preset "${PRESET:-gpu}" --device cuda \
        --minutes "${MINUTES:-8}" --deadline "$end" --save-every 2 --seed "$SEED" \
        --log-every 50 --eval-every 250 --eval-batches 8
    if [ -n "${OFFICIAL:-}" ]; then
        $PY vectors/gen_vectors.py --official "$OFFICIAL" --checkpoint "$out" \
            --like vectors/vectors.json --out "$out/vectors.json" --device cuda \
            --name "trained tiny" --digits 7
    fi
    ls -la "$out"
}

finish() {
    ck=${1:-build/trained}
    make ds4 ds4-convert >/dev/null
    ./ds4-convert "$ck" build/trained.gguf --mtp build/trained-mtp.gguf --type f16 \
        --vocab vectors/train-vocab.gguf
    ls -la build/trained.gguf build/trained-mtp.gguf
    head -c 60000 $DATA/heldout_text.txt >build/heldout_text.txt
    head -c 60000 $DATA/heldout_chat.txt >build/heldout_chat.txt
    for f in build/heldout_text.txt build/heldout_chat.txt; do
        ./ds4 -m build/trained.gguf --mtp build/trained-mtp.gguf --perplexity $f --ppl-window 512
    done
    grep unigram $DATA/stats.json
    ./ds4 -m build/trained.gguf -p "Write a Python function that reverses a string" -n 64
    # The engine against the training model on the trained weights (all schedules).
    if $PY -c 'import torch' 2>/dev/null; then
        $PY tools/train_tiny.py --vectors-out build/trained-vectors.json --checkpoint "$ck"
        ./ds4 --check-vectors build/trained-vectors.json -m build/trained.gguf \
            --mtp build/trained-mtp.gguf || echo "train_tiny.sh: ds4 != training model (see above)"
    fi
    oracle=$ck/vectors.json   # the official oracle, from the gpu step with OFFICIAL
    if [ ! -f "$oracle" ] && [ -n "${OFFICIAL:-}" ]; then   # or made here, on the CPU (~2 min)
        oracle=build/trained-oracle.json
        OMP_NUM_THREADS=1 $PY vectors/gen_vectors.py --official "$OFFICIAL" --checkpoint "$ck" \
            --like vectors/vectors.json --out $oracle --device cpu --name "trained tiny" --digits 7
    fi
    if [ -f "$oracle" ]; then
        ./ds4 --check-vectors "$oracle" -m build/trained.gguf --mtp build/trained-mtp.gguf \
            || echo "train_tiny.sh: ds4 != DeepSeek's model.py on the trained checkpoint (see above)"
    fi
    $PY tools/eval_tiny.py --model build/trained.gguf --mtp build/trained-mtp.gguf --data $DATA \
        --port "${PORT:-18181}" --requests 50 --out build/trained-figures.json
    ./ds4 --bench -m build/trained.gguf --mtp build/trained-mtp.gguf --bench-prefill 256 --bench-decode 64
}

case "$stage" in
    data) data ;;
    gpu) gpu ;;
    finish) shift; finish "$@" ;;
    smoke)
        [ -f $DATA/train.bin ] || data
        OPENBLAS_NUM_THREADS=1 nice -n 19 $PY tools/train_tiny.py --data $DATA --out build/trained \
            --preset smoke --device cpu --threads 1 --minutes "${MINUTES:-20}" --seed "$SEED" \
            --log-every 10 --eval-every 100 --eval-batches 2 --save-every 5
        finish build/trained ;;
    *) sed -n '2,20p' "$0"; exit 2 ;;
esac
