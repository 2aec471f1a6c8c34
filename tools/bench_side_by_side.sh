#!/bin/sh
# tools/bench_side_by_side.sh -- ds4 against antirez/ds4 on one machine and one model file:
# decode tok/s at context 0, 2k, 8k, 32k and prefill tok/s of 2k, 8k, 32k prompts, the two
# engines run alternately (ours, theirs, ours, theirs), the median of each case and the ratio.
#
#   tools/bench_side_by_side.sh                    (on the H200 machine, repo root)
#   PHASE=prepare tools/bench_side_by_side.sh      model + both builds only (a warm box keeps them)
#   PHASE=bench   tools/bench_side_by_side.sh      the runs and the table only
#
# On the H200 machine (10 minutes a command), .antirez carried: first PHASE=prepare (writing
# the 43-layer model is ~300 CPU seconds of the converter, overlapped with both builds), then
# PHASE=bench (two loads of 81 GiB per case and round); CASES splits the runs over more calls,
# and the table of the last call includes the cases of the earlier ones.
#
# The model is the synthetic full-width q2 file (ds4-convert --synthetic full --layers LAYERS
# --type q2 --vocab vectors/ds4-vocab.gguf): the published tensor names, types and shapes with
# random weights. At 43 layers it is 86.7 GB (80.8 GiB), more than the default /dev/shm (half
# the RAM), so it goes to a tmpfs mounted for it. antirez/ds4 is built from .antirez/ (its
# sources, extracted by `git archive`, ignored by git) in WORK, with its compile-time layer
# count DS4_N_LAYER set to LAYERS by sed in that copy only (it is also checked against the
# file's block_count; nothing else of its code is changed).
#
# One run = one process: load the model, prefill a prompt of N tokens from an empty session,
# then decode DECODE_N greedy tokens at context N. Ours: ./ds4 --bench --bench-prefill N
# --bench-decode DECODE_N (random tokens; the process is stopped once it printed its decode
# figures, before the snapshot part of --bench). Theirs: ds4-bench --ctx-start N --ctx-max N
# --gen-tokens DECODE_N on a generated text of at least N tokens (its first frontier is a
# prefill from empty). N = 1 gives decode at context 0; its prefill figure is not reported.
# Every run is bounded by the time left; a case whose estimated cost (from the runs before
# it) does not fit is skipped, or run for fewer rounds, and the table says so.
#
# Environment (defaults in brackets):
#   LAYERS [43]   BUDGET_S [540] seconds for the whole script   ROUNDS [2]   DECODE_N [64]
#   CASES ["1 2048 8192 32768"] prompt lengths, run shortest first
#   PHASE [all]   prepare | bench | all
#   BACKEND [cuda]  cuda, or cpu to test the script on a machine without a GPU
#   WORK          scratch dir for the model, theirs' build and the results [a tmpfs: /dev/shm/ds4ab
#                 when it has room, else /mnt/ds4ab mounted here with mount -t tmpfs]
#   MODEL         model file [$WORK/syn-q2-L$LAYERS.gguf]; written only when missing
#   THEIRS_ENV ["DS4_CUDA_COPY_MODEL=1"]  env for theirs: copy the weights to device memory
#                 as ours does (its default maps host memory for the GPU, which suits unified
#                 memory machines)
#   OURS_FLAGS, THEIRS_FLAGS  extra flags; THREADS: -t for both (CPU backend) [engine default]
#   FRESH=1       forget earlier results (they are kept in WORK across calls, and merged)
#   OUT [./bench-out]  bench.md (the table), run.log, logs/ (every run's stdout and stderr)
set -u
cd "$(dirname "$0")/.." || exit 1
T0=$(date +%s)
LAYERS=${LAYERS:-43}
BUDGET=${BUDGET_S:-540}
ROUNDS=${ROUNDS:-2}
DECODE_N=${DECODE_N:-64}
CASES=${CASES:-"1 2048 8192 32768"}
PHASE=${PHASE:-all}
BACKEND=${BACKEND:-cuda}
THEIRS_ENV=${THEIRS_ENV-DS4_CUDA_COPY_MODEL=1}
OURS_FLAGS=${OURS_FLAGS:-}
THEIRS_FLAGS=${THEIRS_FLAGS:-}
THREADS=${THREADS:-}
OUT=${OUT:-bench-out}
# Below 3 layers the converter writes hash_layer_count = LAYERS (the published file says 3, and
# antirez/ds4 insists on 3), and antirez/ds4's layers 0-1 have no compressor at all.
[ "$LAYERS" -ge 3 ] 2>/dev/null || { echo "LAYERS must be a number >= 3 (got $LAYERS)"; exit 2; }
mkdir -p "$OUT/logs" || exit 1
LOG=$OUT/run.log
: > "$LOG"
NOTES=$OUT/notes.txt
: > "$NOTES"

say() { echo "[$(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }
note() { say "NOTE: $*"; echo "$*" >> "$NOTES"; }
die() { say "ERROR: $*"; exit 1; }
left() { echo $(( BUDGET - ($(date +%s) - T0) )); }
lim() { l=$(left); [ "$l" -gt 1 ] && echo "$l" || echo 1; }     # a timeout of what is left
gib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1073741824 }'; }
avail_kb() { df -Pk "$1" 2>/dev/null | awk 'NR == 2 { print $4 }'; }
mem_kb() { awk -v k="$1:" '$1 == k { print $2 }' /proc/meminfo; }

# The file's size, from the converter's layout (2026-12, measured on 2- and 4-layer files):
# header + tokenizer ~5.25 MB (it grows ~1.8 kB a layer: the size is right to within 1 MiB);
# embedding, head and output 1,621,835,840 B; layers 0-1
# (no compressor, hash-routed) 1,959,129,600 B each; layer 2 (ratio 4, hash) 1,997,415,424 B;
# then ratio-4 layers 1,994,313,728 B and ratio-128 layers 1,964,549,632 B, alternating.
model_bytes() {
    awk -v L="$1" 'BEGIN {
        s = 5251680 + 1621835840
        for (l = 0; l < L; l++)
            s += l < 2 ? 1959129600 : l == 2 ? 1997415424 : l % 2 == 0 ? 1994313728 : 1964549632
        printf "%.0f", s }'
}

# ---------------------------------------------------------------- (a) room for the model
pick_work() {
    need_kb=$(( $(model_bytes "$LAYERS") / 1024 + 2 * 1048576 ))
    if [ -n "${WORK:-}" ]; then mkdir -p "$WORK" || die "cannot create WORK=$WORK"; return; fi
    for d in /mnt/ds4ab /dev/shm/ds4ab; do           # an earlier call's dir on a warm box
        if [ -f "$d/syn-q2-L$LAYERS.gguf" ]; then WORK=$d; return; fi
    done
    shm=$(avail_kb /dev/shm)
    if [ -n "$shm" ] && [ "$shm" -ge "$need_kb" ]; then WORK=/dev/shm/ds4ab; mkdir -p "$WORK"; return; fi
    WORK=/mnt/ds4ab
    mkdir -p "$WORK" || die "cannot create $WORK"
    if [ "$(avail_kb "$WORK")" -ge "$need_kb" ] 2>/dev/null && \
       [ "$(df -P "$WORK" | awk 'NR == 2 { print $6 }')" = "$WORK" ]; then return; fi
    size_g=$(( need_kb / 1048576 + 2 ))
    total_kb=$(mem_kb MemAvailable)
    [ $(( total_kb - size_g * 1048576 )) -ge $(( 16 * 1048576 )) ] || \
        die "a ${size_g} GiB tmpfs leaves under 16 GiB of RAM (MemAvailable $(( total_kb / 1048576 )) GiB); free memory (other tmpfs files?) or lower LAYERS"
    say "mount -t tmpfs -o size=${size_g}g,huge=within_size tmpfs $WORK (/dev/shm has $(( ${shm:-0} / 1048576 )) GiB free)"
    mount -t tmpfs -o "size=${size_g}g,huge=within_size" tmpfs "$WORK" 2>>"$LOG" || \
        mount -t tmpfs -o "size=${size_g}g" tmpfs "$WORK" || die "mount of a ${size_g} GiB tmpfs failed"
}

pick_work
MODEL=${MODEL:-$WORK/syn-q2-L$LAYERS.gguf}
RESULTS=$WORK/results-$BACKEND-L$LAYERS.tsv
THEIRS_DIR=$WORK/antirez-$BACKEND-L$LAYERS
PROMPT=$WORK/prompt.txt
[ "${FRESH:-0}" = 1 ] && rm -f "$RESULTS"
touch "$RESULTS"
say "LAYERS=$LAYERS BACKEND=$BACKEND PHASE=$PHASE BUDGET_S=$BUDGET ROUNDS=$ROUNDS DECODE_N=$DECODE_N CASES=\"$CASES\""
say "WORK=$WORK MODEL=$MODEL expected $(model_bytes "$LAYERS") B ($(gib "$(model_bytes "$LAYERS")") GiB)"
say "RAM: MemTotal $(( $(mem_kb MemTotal) / 1048576 )) GiB, MemAvailable $(( $(mem_kb MemAvailable) / 1048576 )) GiB;" \
    "WORK free $(( $(avail_kb "$WORK") / 1048576 )) GiB; repo disk free $(( $(avail_kb .) / 1048576 )) GiB"
command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,memory.used,driver_version \
    --format=csv,noheader 2>&1 | sed 's/^/GPU: /' | tee -a "$LOG"

# ---------------------------------------------------------------- (b) (c) (d) prepare
write_model() {
    if [ -f "$MODEL" ]; then say "model exists: $(stat -c %s "$MODEL") B"; return 0; fi
    rm -f "$MODEL".tmp-* "$RESULTS"; touch "$RESULTS"
    have=$(avail_kb "$(dirname "$MODEL")")
    need=$(( $(model_bytes "$LAYERS") / 1024 + 1048576 ))
    [ "$have" -ge "$need" ] || { say "model: $(( have / 1048576 )) GiB free, need $(( need / 1048576 ))"; return 1; }
    t=$(date +%s)
    timeout -k 5 "$(lim)" ./ds4-convert --synthetic full --layers "$LAYERS" "$MODEL" --type q2 \
        --vocab vectors/ds4-vocab.gguf > "$OUT/logs/convert.log" 2>&1 || \
        { say "model: ds4-convert failed or ran out of time"; tail -3 "$OUT/logs/convert.log"; return 1; }
    got=$(stat -c %s "$MODEL")
    say "model written in $(( $(date +%s) - t )) s: $got B ($(gib "$got") GiB)"
    d=$(( got - $(model_bytes "$LAYERS") )); [ "$d" -lt 0 ] && d=$(( -d ))
    [ "$d" -lt 1048576 ] || note "model is $got B, the layout table in this script says $(model_bytes "$LAYERS") B"
}

# theirs: a copy of .antirez with DS4_N_LAYER = LAYERS, built there.
build_theirs() {
    [ -f .antirez/ds4_bench.c ] || { say "theirs: .antirez/ is missing (carry it)"; return 1; }
    stamp="$(cat .antirez/COMMIT 2>/dev/null) $BACKEND $LAYERS"
    if [ -x "$THEIRS_DIR/ds4-bench" ] && [ "$(cat "$THEIRS_DIR/STAMP" 2>/dev/null)" = "$stamp" ]; then
        say "theirs: build exists"; return 0
    fi
    rm -rf "$THEIRS_DIR" && mkdir -p "$THEIRS_DIR" && cp .antirez/* "$THEIRS_DIR"/ || return 1
    sed -i "s/^\( *DS4_N_LAYER *= *\)43,/\1$LAYERS,/" "$THEIRS_DIR/ds4.c"
    [ "$(grep -c "^ *DS4_N_LAYER *= *$LAYERS," "$THEIRS_DIR/ds4.c")" = 1 ] || \
        { say "theirs: could not set DS4_N_LAYER in its ds4.c"; return 1; }
    t=$(date +%s)
    if [ "$BACKEND" = cuda ]; then
        nvcc_path=$(command -v nvcc) || { say "theirs: nvcc not found"; return 1; }
        (cd "$THEIRS_DIR" && timeout -k 5 "$(lim)" make -j4 ds4-bench CUDA_ARCH=sm_90 \
            NVCC="$nvcc_path" CUDA_HOME="$(dirname "$(dirname "$nvcc_path")")")
    else
        (cd "$THEIRS_DIR" && make -j2 ds4_cpu.o ds4_bench_cpu.o &&
            ${CC:-cc} -O2 -o ds4-bench ds4_bench_cpu.o ds4_cpu.o -lm -pthread)
    fi > "$OUT/logs/build-theirs.log" 2>&1 || { say "theirs: build failed"; tail -5 "$OUT/logs/build-theirs.log"; return 1; }
    echo "$stamp" > "$THEIRS_DIR/STAMP"
    say "theirs: built in $(( $(date +%s) - t )) s (DS4_N_LAYER=$LAYERS, $(cat .antirez/COMMIT 2>/dev/null | cut -c1-12))"
}

build_ours() {
    t=$(date +%s)
    if [ "$BACKEND" = cuda ]; then timeout -k 5 "$(lim)" make cuda; else make ds4; fi \
        > "$OUT/logs/build-ours.log" 2>&1 || { say "ours: build failed"; tail -5 "$OUT/logs/build-ours.log"; return 1; }
    say "ours: built in $(( $(date +%s) - t )) s"
}

# A text of at least `lines` lines (about 17 tokens each) for theirs' --prompt-file.
write_prompt() {
    max=1; for n in $CASES; do [ "$n" -gt "$max" ] && max=$n; done
    awk -v n=$(( max / 12 + 200 )) 'BEGIN { for (i = 1; i <= n; i++)
        printf "Line %d: the quick brown fox %d jumps over the lazy dog.\n", i, i * 7 }' > "$PROMPT"
}

if [ "$PHASE" != bench ]; then
    make ds4-convert > "$OUT/logs/build-convert.log" 2>&1 || die "make ds4-convert failed"
    build_theirs & p_theirs=$!
    write_model & p_model=$!
    build_ours; ok_ours=$?
    wait $p_theirs; ok_theirs=$?
    wait $p_model; ok_model=$?
    [ $ok_model = 0 ] || die "no model"
    [ $ok_ours = 0 ] || [ $ok_theirs = 0 ] || die "neither engine built"
fi
[ "$PHASE" = prepare ] && { say "prepared"; exit 0; }
[ -f "$MODEL" ] || die "no model at $MODEL (run PHASE=prepare first)"
write_prompt

# ---------------------------------------------------------------- (e) the runs
# run_one ENGINE N ROUND TIMEOUT: one process; appends a line to RESULTS:
#   engine N round prefill_tps decode_tps gbps wall_s status
run_one() {
    eng=$1 n=$2 r=$3 lim=$4
    base=$OUT/logs/$eng-N$n-r$r
    if [ "$eng" = ours ]; then
        set -- ./ds4 --backend "$BACKEND" -m "$MODEL" --bench --bench-prefill "$n" \
            --bench-decode "$DECODE_N" ${THREADS:+-t "$THREADS"} $OURS_FLAGS
        envs=
    else
        set -- "$THEIRS_DIR/ds4-bench" --backend "$BACKEND" -m "$MODEL" --prompt-file "$PROMPT" \
            --ctx-start "$n" --ctx-max "$n" --gen-tokens "$DECODE_N" ${THREADS:+-t "$THREADS"} $THEIRS_FLAGS
        envs=$THEIRS_ENV
    fi
    echo "$envs $*" > "$base.cmd"
    t=$(date +%s.%N)
    # shellcheck disable=SC2086
    timeout -k 5 "$lim" env $envs stdbuf -oL "$@" > "$base.out" 2> "$base.err" &
    pid=$!
    while kill -0 $pid 2>/dev/null; do      # ours: stop after its decode figures
        if [ "$eng" = ours ] && grep -qs '^decode weight traffic' "$base.out"; then
            kill -TERM $pid 2>/dev/null; break
        fi
        sleep 0.5
    done
    wait $pid; rc=$?
    wall=$(awk -v a="$t" -v b="$(date +%s.%N)" 'BEGIN { printf "%.1f", b - a }')
    if [ "$eng" = ours ]; then
        pf=$(sed -n 's/^prefill: .* = \([0-9.]*\) tokens\/s.*/\1/p' "$base.out")
        dc=$(sed -n 's/^decode:  *[0-9]* tokens in .* = \([0-9.]*\) tokens\/s.*/\1/p' "$base.out")
        bw=$(sed -n 's/^decode weight traffic: .* = \([0-9.]*\) GB\/s.*/\1/p' "$base.out")
        mb=$(sed -n 's/^decode weight traffic: \([0-9.]*\) MB per token.*/\1/p' "$base.out")
        [ -n "$mb" ] && echo "$mb" > "$WORK/mb-per-token-$BACKEND-L$LAYERS"
    else
        row=$(grep "^$n," "$base.out" | tail -n 1)
        pf=$(echo "$row" | cut -d, -f3); dc=$(echo "$row" | cut -d, -f5); bw=
    fi
    st=ok
    [ -n "$dc" ] || { st="failed(rc=$rc)"; [ "$rc" = 124 ] || [ "$rc" = 137 ] && st=timeout; }
    echo "$eng $n $r ${pf:--} ${dc:--} ${bw:--} $wall $st" >> "$RESULTS"
    say "$eng N=$n round $r: prefill ${pf:--} tok/s, decode ${dc:--} tok/s, wall $wall s, $st"
    [ "$st" = ok ] || tail -n 3 "$base.err" | sed 's/^/    /' | tee -a "$LOG"
}

# Seconds one run of case N is expected to take, from the slowest run of the longest case
# done so far: its load time plus its prefill time scaled by N/N' (x1.5: attention grows
# with the context). Empty when nothing is known yet.
estimate() {
    awk -v n="$1" -v g="$DECODE_N" '
        $8 == "ok" && $2 + 0 >= best { if ($2 + 0 > best) { best = $2 + 0; w = 0 }
            pf = ($4 == "-" || $2 < 2) ? 0 : $2 / $4; dc = g / $5; if ($7 > w) { w = $7; p = pf; d = dc } }
        END { if (best == 0) exit
              load = w - p - d; if (load < 0) load = 0
              scale = best >= 2 ? n / best * 1.5 : 0
              est = load + d * 1.2 + (best >= 2 ? p * scale : n * d / g / 8)
              printf "%.0f", est + 5 }' "$RESULTS"
}

done_rounds() { awk -v n="$1" -v e="$2" '$1 == e && $2 == n && $8 == "ok"' "$RESULTS" | wc -l; }

RESERVE=10
for n in $CASES; do
    have=$(done_rounds "$n" ours); have_t=$(done_rounds "$n" theirs)
    [ "$have_t" -lt "$have" ] && have=$have_t
    want=$(( ROUNDS - have ))
    [ "$want" -le 0 ] && { say "N=$n: $ROUNDS rounds already in $RESULTS"; continue; }
    est=$(estimate "$n")
    room=$(( $(left) - RESERVE ))
    if [ -n "$est" ]; then
        fit=$(( room / (2 * est) ))
        if [ "$fit" -lt 1 ]; then
            note "N=$n skipped: one pair of runs needs ~$(( 2 * est )) s, $room s left"; continue
        fi
        [ "$fit" -lt "$want" ] && { note "N=$n: time for $fit of $want rounds (~$est s a run)"; want=$fit; }
    fi
    r=$(( have + 1 )); last=$(( have + want ))
    while [ "$r" -le "$last" ]; do
        for eng in ours theirs; do
            room=$(( $(left) - RESERVE ))
            [ "$room" -ge 5 ] || { note "N=$n round $r $eng: out of time"; break 2; }
            run_one "$eng" "$n" "$r" "$room"
        done
        r=$(( r + 1 ))
    done
done

# ---------------------------------------------------------------- (f) the table
median() { sort -g | awk '{ v[NR] = $1 } END { if (NR == 0) print "-";
    else if (NR % 2) print v[(NR + 1) / 2]; else printf "%.2f\n", (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }
# values COLUMN ENGINE N: the ok figures of one case, one a line
values() { awk -v c="$1" -v e="$2" -v n="$3" '$1 == e && $2 == n && $8 == "ok" && $c != "-" { print $c }' "$RESULTS"; }
cell() { v=$(values "$1" "$2" "$3" | median); k=$(values "$1" "$2" "$3" | wc -l); echo "$v|$k"; }
row() {   # label column N
    o=$(cell "$2" ours "$3"); t=$(cell "$2" theirs "$3")
    ov=${o%|*} tv=${t%|*}
    ratio=$(awk -v a="$ov" -v b="$tv" 'BEGIN { if (a == "-" || b == "-" || b == 0) print "-";
        else printf "%.2fx", a / b }')
    extra=
    if [ "$2" = 5 ]; then
        ob=$(values 6 ours "$3" | median)
        mb=$(cat "$WORK/mb-per-token-$BACKEND-L$LAYERS" 2>/dev/null)
        tb=$(awk -v m="${mb:-}" -v d="$tv" 'BEGIN { if (m == "" || d == "-") print "-"; else printf "%.1f", m * d / 1000 }')
        extra=" $ob | $tb |"
    else extra=" | |"; fi
    echo "| $1 | $ov (${o#*|}) | $tv (${t#*|}) | $ratio |$extra"
}
# the cases of this call and of earlier calls on this model (RESULTS), shortest first
ALL_CASES=$( { for n in $CASES; do echo "$n"; done; awk '{ print $2 }' "$RESULTS"; } | sort -n | uniq)
label() { case $1 in 1) echo "ctx 0";; *) awk -v n="$1" 'BEGIN { if (n % 1024 == 0) printf "%dk", n / 1024; else print n }';; esac; }
{
    echo "## ds4 vs antirez/ds4, side by side ($(date -u +%Y-%m-%d), $BACKEND)"
    echo
    echo "- machine: $(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | head -n 1)" \
         "$(nproc) cores, $(( $(mem_kb MemTotal) / 1048576 )) GiB RAM"
    echo "- model: synthetic full-width q2, $LAYERS layers, $(stat -c %s "$MODEL" 2>/dev/null) B" \
         "(ds4-convert --synthetic full --layers $LAYERS --type q2), batch 1, greedy, $DECODE_N decode tokens a run"
    echo "- ours: ds4 $(git rev-parse --short HEAD 2>/dev/null) --backend $BACKEND $OURS_FLAGS;" \
         "theirs: antirez/ds4 $(cut -c1-12 .antirez/COMMIT 2>/dev/null) ds4-bench, DS4_N_LAYER=$LAYERS, env: ${THEIRS_ENV:-none} $THEIRS_FLAGS"
    echo "- median of n runs (n in brackets), runs alternating ours/theirs; GB/s = weight bytes per decode token" \
         "(ours' count, the same file) x tok/s; H200 HBM ~4800 GB/s"
    echo
    echo "| case | ours tok/s (n) | antirez/ds4 tok/s (n) | ours/theirs | ours GB/s | theirs GB/s |"
    echo "|---|---|---|---|---|---|"
    for n in $ALL_CASES; do row "decode at $(label "$n")" 5 "$n"; done
    for n in $ALL_CASES; do [ "$n" -ge 2 ] && row "prefill $(label "$n") prompt" 4 "$n"; done
    if [ -s "$NOTES" ]; then echo; sed 's/^/- /' "$NOTES"; fi
} > "$OUT/bench.md"
echo; cat "$OUT/bench.md" | tee -a "$LOG"
say "done; raw results in $RESULTS, logs in $OUT/logs"
