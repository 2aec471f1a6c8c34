#!/bin/sh
# tools/fullwidth_check.sh -- issue 14 in one command: ds4 against DeepSeek's model.py at the
# real V4 Flash shape, in the released FP8/FP4 formats.
#
#   DS4_OFFICIAL=DIR tools/fullwidth_check.sh            (on the H200 machine, repo root)
#
# Stages, in order (each logs its seconds; a stage that would start after FW_BUDGET_S is
# skipped and says so, so the command ends inside the 10-minute limit with what it has):
#   build   make ds4 ds4-convert
#   make    tools/fullwidth_oracle.py make: random weights, FW_LAYERS layers + MTP, release
#           formats (FP8 e4m3 + ue8m0 128x128, FP4 e2m1 per-32 experts, bf16/f32 elsewhere)
#   oracle  vectors from DIR/model.py on the GPU: (a) --mode f32, weights dequantized exactly
#           (ds4's semantics), then (b) --mode fp8, DeepSeek's FP8 activations (reported only)
#   f16 q8_0 q2   ds4-convert at that type, ds4 --check-vectors (CPU; and --backend cuda when
#           ./ds4 has one); f16 against (a) on every case (the bar) and against (b); q8_0 and
#           q2 against (a) (their quantisation error); each GGUF is deleted after its check.
#           The report-only checks run the decode-schedule case of each length up to
#           FW_REPORT_MAXLEN (default 2500) and the greedy case, to fit the budget
#
# If the budget skips stages, run the rest on the still-warm machine (the checkpoint and the
# vectors stay in FW_WORK):  FW_STAGES="q8_0 q2 summary" tools/fullwidth_check.sh
#   summary the table, into $OUT/summary.txt
#
# Environment:
#   DS4_OFFICIAL  directory holding DeepSeek's inference/model.py (needed; without it the
#                 oracle falls back to tools/v4_torch.py and the summary says so)
#   FW_WIDTH      full (default) or small (the CPU proof's reduced width)
#   FW_LAYERS     main layers, >= 4 (default 4: ratios 0 0 4 128, layers 0-2 hash-routed, MTP 0)
#   FW_TYPES      GGUF types to check (default "f16 q8_0 q2")
#   FW_WORK       scratch directory for the checkpoint and the vectors (default ./fw-work)
#   FW_GGUF_DIR   where the GGUFs go (default: /dev/shm when it has room, else FW_WORK)
#   FW_BUDGET_S   seconds after which no new stage starts (default 540)
#   FW_LENGTHS    prompt lengths (default 64,2500,4100); FW_STAGES: stages to run
#   FW_BACKENDS   the ds4 backends that check the vectors (default cpu, and cuda when built in)
#   FW_KEEP       1: keep each GGUF after its check and reuse it in the next call (warm machine)
#   FW_CASES      a Python regex: check only the cases whose name matches (e.g. 'len64|greedy')
#   OUT           results (default ./fw-out): summary.txt, run.log, vectors per length (.gz)
#
# Sizes at full width, 4 layers + MTP (256 experts of 3 x 2048 x 4096 per block):
#   checkpoint 20 GB (experts FP4: 3.2 GB per block); f16 GGUF 52 GB + MTP 13 GB (experts in
#   f16: 12.9 GB per block); q8_0 27 + 7 GB; q2 ~9 + 4 GB. The box has 64 GB of disk and
#   128 GB of RAM, so the f16 main file goes to /dev/shm (tmpfs, mapped by ds4 in place) and
#   its MTP file to disk; the script checks free space before each conversion and skips a type
#   that cannot fit, saying how much it needed.
set -u
cd "$(dirname "$0")/.." || exit 1
T0=$(date +%s)
PY=${PYTHON:-python3}
WIDTH=${FW_WIDTH:-full}
LAYERS=${FW_LAYERS:-4}
TYPES=${FW_TYPES:-"f16 q8_0 q2"}
WORK=${FW_WORK:-fw-work}
BUDGET=${FW_BUDGET_S:-540}
LENGTHS=${FW_LENGTHS:-64,2500,4100}
STAGES=${FW_STAGES:-"build make oracle $TYPES summary"}
OUT=${OUT:-fw-out}
CKPT=$WORK/ckpt-$WIDTH-$LAYERS
mkdir -p "$WORK" "$OUT"
LOG=$OUT/run.log
RESULTS=$WORK/results.txt     # kept across calls on a warm machine; a new checkpoint resets it
touch "$RESULTS"

say() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }
note() { echo "$*" >> "$RESULTS"; say "$*"; }
over_budget() { [ $(( $(date +%s) - T0 )) -ge "$BUDGET" ]; }
has_stage() { case " $STAGES " in *" $1 "*) return 0 ;; esac; return 1; }
free_gb() { df -Pk "$1" 2>/dev/null | awk 'NR == 2 { printf "%d", $4 / 1048576 }'; }

# Estimated GB of the main and MTP GGUF at type $1 (from the plan in ds4_convert.c's table).
gguf_gb() {
    case "$WIDTH:$1" in
    full:f16) echo "$(( LAYERS * 13 + 3 )) 14" ;;
    full:q8_0) echo "$(( LAYERS * 7 + 2 )) 8" ;;
    full:*) echo "$(( LAYERS * 3 + 2 )) 5" ;;
    *) echo "1 1" ;;
    esac
}

run_stage() {   # name command...
    name=$1; shift
    if over_budget; then note "$name: skipped, the ${BUDGET}s budget is spent"; return 1; fi
    s=$(date +%s)
    say "== $name"
    "$@" >> "$LOG" 2>&1
    rc=$?
    say "$name: rc $rc in $(( $(date +%s) - s ))s"
    return $rc
}

stage_build() { make ds4 ds4-convert; }

stage_make() {
    [ -f "$CKPT/config.json" ] && { echo "checkpoint $CKPT exists"; return 0; }
    need=$([ "$WIDTH" = full ] && echo $(( LAYERS * 4 + 5 )) || echo 1)
    [ "$(free_gb "$WORK")" -ge "$need" ] || { echo "need ${need} GB free in $WORK"; return 1; }
    : > "$RESULTS"
    rm -f "$WORK"/vectors-*.json "$WORK"/oracle-*.log
    PYTHONUNBUFFERED=1 $PY tools/fullwidth_oracle.py make --out "$CKPT" --width "$WIDTH" \
        --layers "$LAYERS" --device cuda
}

ORACLE_KIND=official
{ [ -n "${DS4_OFFICIAL:-}" ] && [ -f "$DS4_OFFICIAL/model.py" ]; } || ORACLE_KIND=v4
stage_oracle() {   # f32 | fp8
    mode=$1
    [ -f "$WORK/vectors-$mode.json" ] && { echo "$WORK/vectors-$mode.json exists"; return 0; }
    rows=$([ "$WIDTH" = full ] && echo 3 || echo 0)
    if [ -n "${DS4_OFFICIAL:-}" ] && [ -f "$DS4_OFFICIAL/model.py" ]; then
        set -- --oracle official --official "$DS4_OFFICIAL" --mode "$mode"
    else
        [ "$mode" = fp8 ] && { echo "no DS4_OFFICIAL: mode fp8 needs model.py"; return 1; }
        set -- --oracle v4 --mode f32
    fi
    PYTHONUNBUFFERED=1 $PY tools/fullwidth_oracle.py vectors --checkpoint "$CKPT" \
        --out "$WORK/vectors-$mode.json" --lengths "$LENGTHS" --max-rows "$rows" --device cuda \
        "$@" 2>&1 | tee "$WORK/oracle-$mode.log"
    [ -f "$WORK/vectors-$mode.json" ]
}

# ds4 --check-vectors of $1 (vectors) on model $2 (+ MTP $3); one summary line per case.
check_one() {
    label=$1 vec=$2 model=$3 mtp=$4
    if [ -n "${FW_CASES:-}" ]; then
        $PY - "$vec" "$WORK/cases-$label.json" "$FW_CASES" <<'EOF' || return 1
import json, re, sys
src, dst, pattern = sys.argv[1:]
d = json.load(open(src))
keep = [c for c in d["cases"] if re.search(pattern, c.get("name", ""))]
json.dump(dict(d, cases=keep), open(dst, "w"))
print("FW_CASES=%s: %d of %d cases" % (pattern, len(keep), len(d["cases"])))
EOF
        vec=$WORK/cases-$label.json
    fi
    # cuda too when ./ds4 was built with it (make cuda); FW_BACKENDS overrides.
    cuda=$(./ds4 --backend cuda --help 2>&1 | grep -q 'not built' || echo cuda)
    for backend in ${FW_BACKENDS:-cpu $cuda}; do
        extra=$([ "$backend" = cpu ] || echo "--backend $backend")
        out=$WORK/check-$label-$backend.txt
        # shellcheck disable=SC2086
        ./ds4 --check-vectors "$vec" -m "$model" ${mtp:+--mtp "$mtp"} $extra > "$out" 2>&1
        echo "rc $? $label $backend" >> "$out"
        cat "$out"
        sed -n "s/^  \(len[^ ]*\|greedy[^ ]*\) *\(own\|chunk7\) */$label $backend \1 \2 /p" "$out" \
            >> "$RESULTS"
        tail -2 "$out" | head -1 | sed "s/^/$label $backend: /" >> "$RESULTS"
    done
}

stage_type() {   # f16 | q8_0 | q2
    type=$1
    # shellcheck disable=SC2046
    set -- $(gguf_gb "$type")
    main_gb=$1 mtp_gb=$2
    dir=${FW_GGUF_DIR:-}
    if [ -z "$dir" ]; then
        if [ "$(free_gb /dev/shm)" -gt "$(( main_gb + 1 ))" ]; then dir=/dev/shm/ds4-fw
        else dir=$WORK; fi
    fi
    mkdir -p "$dir"
    mtpdir=$WORK
    [ "$(free_gb "$dir")" -gt "$main_gb" ] ||
        { echo "$type: need ${main_gb} GB in $dir, have $(free_gb "$dir")"; return 1; }
    [ "$dir" != "$mtpdir" ] || mtp_gb=$(( mtp_gb + main_gb ))
    if [ "$(free_gb "$mtpdir")" -le "$mtp_gb" ]; then
        echo "$type: no room for the MTP file ($mtp_gb GB) in $mtpdir: main model only"
        mtp=""
    else
        mtp=$mtpdir/fw-$type-mtp.gguf
    fi
    model=$dir/fw-$type.gguf
    vocab=$([ "$WIDTH" = full ] && echo vectors/ds4-vocab.gguf || echo vectors/tiny-vocab.gguf)
    if [ "${FW_KEEP:-0}" = 1 ] && [ -f "$model" ]; then
        echo "$type: reusing $model (FW_KEEP=1)"
        [ -n "$mtp" ] && [ ! -f "$mtp" ] && mtp=""
    else
        ./ds4-convert "$CKPT" "$model" ${mtp:+--mtp "$mtp"} --type "$type" --vocab "$vocab" ||
            return 1
    fi
    # The bar: f16 against (a), every case. Reported only (and so on fewer tokens, to stay in
    # the budget): f16 against (b), and q8_0 / q2 against (a), on the decode-schedule case of
    # each length up to FW_REPORT_MAXLEN plus the greedy case.
    if [ "$type" = f16 ]; then
        [ -f "$WORK/vectors-f32.json" ] && check_one f16-vs-f32 "$WORK/vectors-f32.json" "$model" "$mtp"
        subset_vectors fp8 && check_one f16-vs-fp8 "$WORK/report-fp8.json" "$model" "$mtp"
    else
        subset_vectors f32 && check_one "$type-vs-f32" "$WORK/report-f32.json" "$model" "$mtp"
    fi
    [ "${FW_KEEP:-0}" = 1 ] || rm -f "$model" ${mtp:+"$mtp"}
}

# $WORK/report-$1.json: the cases of vectors-$1.json that the report-only checks run.
subset_vectors() {
    [ -f "$WORK/vectors-$1.json" ] || return 1
    $PY - "$WORK/vectors-$1.json" "$WORK/report-$1.json" "${FW_REPORT_MAXLEN:-2500}" <<'EOF'
import json, sys
src, dst, maxlen = sys.argv[1], sys.argv[2], int(sys.argv[3])
d = json.load(open(src))
keep = [c for c in d["cases"] if "greedy" in c or
        (len(c["tokens"]) <= maxlen and c["prefill"] < len(c["tokens"]))]
json.dump(dict(d, cases=keep), open(dst, "w"))
EOF
}

# Vectors back in $OUT: one gzip per prompt length and mode (a full-width row is 1.3 MB of
# JSON; $OUT takes 8 files of at most 16 MiB).
split_vectors() {
    for mode in f32 fp8; do
        f=$WORK/vectors-$mode.json
        [ -f "$f" ] || continue
        $PY - "$f" "$OUT" "$mode" <<'EOF'
import gzip, json, sys
src, out, mode = sys.argv[1:]
d = json.load(open(src))
by = {}
for c in d["cases"]:
    by.setdefault(64 if "greedy" in c else len(c["tokens"]), []).append(c)
for L, cs in sorted(by.items()):
    e = dict(d, cases=cs)
    with gzip.open("%s/vectors-%s-len%d.json.gz" % (out, mode, L), "wt") as g:
        json.dump(e, g)
EOF
    done
}

stage_summary() {
    {
        echo "fullwidth check: width $WIDTH, $LAYERS layers + MTP, lengths $LENGTHS, oracle $ORACLE_KIND"
        [ "$ORACLE_KIND" = v4 ] && echo "NOTE: DS4_OFFICIAL unset: oracle is tools/v4_torch.py, not model.py"
        nvidia-smi --query-gpu=name,memory.used --format=csv,noheader 2>/dev/null
        echo "wall $(( $(date +%s) - T0 ))s"
        for f in "$WORK"/oracle-*.log; do
            [ -f "$f" ] && grep -h "oracle prefill vs decode\|greedy .* tokens\|^model.py" "$f" |
                sed "s/^/$(basename "$f" .log): /"
        done
        cat "$RESULTS"
    } > "$OUT/summary.txt"
    split_vectors
    cat "$OUT/summary.txt"
}

for st in $STAGES; do
    case $st in
    build) run_stage build stage_build || exit 1 ;;
    make) run_stage make stage_make || { stage_summary; exit 1; } ;;
    oracle)
        run_stage oracle-f32 stage_oracle f32 || { stage_summary; exit 1; }
        run_stage oracle-fp8 stage_oracle fp8 ;;
    f16|q8_0|q2|q4) run_stage "$st" stage_type "$st" ;;
    summary) stage_summary ;;
    *) echo "unknown stage $st" >&2; exit 2 ;;
    esac
done
