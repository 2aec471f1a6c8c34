#!/bin/sh
# tests/kvdisk.sh -- the disk KV cache across processes.
#
#   sh tests/kvdisk.sh [KVDISK_BINARY]     (default tests/bin/kvdisk)
#
#   1. save in one process, load in another, continue: logits bit-exact
#      (tiny, tiny+MTP);
#   2. kill -9 at random moments of a save loop, 50 times: after each, the
#      next open repairs the directory, every entry that loads equals a fresh
#      computation, and the three older entries are all still there;
#   3. two processes saving into one directory at once: --kv-check finds
#      every entry good and the index matches the files.
# Last line: "N passed, N failed".
K=${1:-tests/bin/kvdisk}
M=vectors/tiny.gguf
MTP=vectors/tiny-mtp.gguf
D=$(mktemp -d /tmp/kvdisk_sh.XXXXXX)
passed=0
failed=0
ok() { echo "ok   $*"; passed=$((passed + 1)); }
bad() { echo "FAIL $*"; failed=$((failed + 1)); }

# 1. restart
for mtp in "" "--mtp $MTP"; do
    $K save -m $M $mtp --dir $D/restart --n 300 >/dev/null 2>&1
    out=$($K continue -m $M $mtp --dir $D/restart --n 300 --extra 30 2>/dev/null)
    if [ $? -eq 0 ]; then ok "new process loads and continues ${mtp:+(MTP) }: $(echo "$out" | tail -n 1)"
    else bad "restart ${mtp}: $out"; fi
done

# 2. kill -9 during saves
$K save -m $M --dir $D/kill --n 200 --seed 5 >/dev/null 2>&1
$K save -m $M --dir $D/kill --n 250 --seed 5 >/dev/null 2>&1
$K save -m $M --dir $D/kill --n 300 --seed 5 >/dev/null 2>&1
olds=$(sqlite3 $D/kill/index.sqlite "SELECT sha1 FROM snapshots" 2>/dev/null | sort | tr '\n' ' ')
[ -n "$olds" ] || olds=$(ls $D/kill/*.kv | sed 's#.*/##; s/\.kv$//' | sort | tr '\n' ' ')
lost=0; wrong=0; rounds=0; damaged=0
t0=$(date +%s)
i=0
while [ $i -lt 50 ]; do
    $K save-loop -m $M --dir $D/kill --n 200 --seed 5 --tag k$i --space-mb 2048 >$D/loop.out 2>&1 &
    pid=$!
    while ! grep -q ready $D/loop.out 2>/dev/null; do sleep 0.01; done
    sleep 0.0$(( $(od -An -N1 -tu1 /dev/urandom) % 10 ))$(( $(od -An -N1 -tu1 /dev/urandom) % 10 ))
    kill -9 $pid 2>/dev/null
    wait $pid 2>/dev/null
    v=$($K verify -m $M --dir $D/kill --n 200 --seed 5 2>/dev/null | tail -n 1)
    echo "$v" | grep -q "0 loaded but WRONG" || wrong=$((wrong + 1))
    dmg=$(echo "$v" | sed -n 's/.*WRONG, \([0-9]*\) detected.*/\1/p')
    damaged=$((damaged + ${dmg:-0}))
    for s in $olds; do [ -f $D/kill/$s.kv ] || lost=$((lost + 1)); done
    rounds=$((rounds + 1))
    i=$((i + 1))
done
entries=$(ls $D/kill/*.kv | wc -l)
tmps=$(ls $D/kill | grep -c '^tmp\.' )
msg="kill -9 during saves, $rounds rounds in $(( $(date +%s) - t0 )) s: $wrong rounds with a wrong load, $lost older entries lost, $damaged damaged entries detected+removed, $entries entries now, $tmps tmp files left"
[ $wrong -eq 0 ] && [ $lost -eq 0 ] && [ $rounds -eq 50 ] && ok "$msg" || bad "$msg"

# 3. two processes, one directory
$K save-loop -m $M --dir $D/two --n 300 --tag a --extra 40 --space-mb 3 >/dev/null 2>&1 &
p1=$!
$K save-loop -m $M --dir $D/two --n 300 --tag b --extra 40 --space-mb 3 >/dev/null 2>&1 &
p2=$!
for j in 1 2 3 4 5; do $K continue -m $M --dir $D/two --n 300 --extra 1 >/dev/null 2>&1; done
wait $p1; r1=$?
wait $p2; r2=$?
chk=$($K --kv-check $D/two 2>&1 | tail -n 1)
files=$(ls $D/two/*.kv | wc -l)
rows=$($K --kv-list $D/two | tail -n 1 | sed 's/ snapshots.*//')
msg="two processes x 40 saves (3 MiB budget) + 5 lookups on one directory: exit $r1/$r2, --kv-check: $chk; $files files, $rows rows"
echo "$chk" | grep -q ", 0 bad" && [ "$files" = "$rows" ] && [ $r1 -eq 0 ] && [ $r2 -eq 0 ] && ok "$msg" || bad "$msg"

rm -rf $D
echo "$passed passed, $failed failed"
[ $failed -eq 0 ]
