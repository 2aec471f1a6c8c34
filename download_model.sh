#!/bin/sh
# download_model.sh -- fetch the published DeepSeek V4 Flash GGUFs for ds4.
#
#   ./download_model.sh [q2|q4|mtp|all] [--dry-run]
#
#   q2   IQ2_XXS/Q2_K routed experts, 81 GiB: fits a 128 GB Mac (default)
#   q4   Q4_K routed experts, 153 GiB: for 192 GB+ machines
#   mtp  the separate MTP block (speculative decoding), 3.5 GB
#
# Files land in ./gguf/ and ds4flash.gguf is linked to the main model, which
# is where ./ds4 looks when no -m is given. Downloads resume where they
# stopped (curl -C -). The repository can be changed with DS4_HF_REPO.
# --dry-run prints what would be fetched and where, and touches nothing.
set -eu

repo=${DS4_HF_REPO:-antirez/deepseek-v4-gguf}
base="https://huggingface.co/$repo/resolve/main"
q2=DeepSeek-V4-Flash-IQ2XXS-w2Q2K-AProjQ8-SExpQ8-OutQ8-chat-v2-imatrix.gguf
q4=DeepSeek-V4-Flash-Q4KExperts-F16HC-F16Compressor-F16Indexer-Q8Attn-Q8Shared-Q8Out-chat-v2-imatrix.gguf
mtp=DeepSeek-V4-Flash-MTP-Q4K-Q8_0-F32.gguf

which=q2
dry=0
for arg in "$@"; do
    case "$arg" in
        q2|q4|mtp|all) which=$arg ;;
        --dry-run) dry=1 ;;
        -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
        *) echo "download_model.sh: unknown argument '$arg' (try --help)" >&2; exit 2 ;;
    esac
done

case "$which" in
    q2) files="$q2" ;;
    q4) files="$q4" ;;
    mtp) files="$mtp" ;;
    all) files="$q2 $q4 $mtp" ;;
esac

fetch() {
    file=$1
    if [ "$dry" -eq 1 ]; then
        echo "would fetch $base/$file -> gguf/$file"
        return
    fi
    mkdir -p gguf
    command -v curl >/dev/null || { echo "download_model.sh: curl is required" >&2; exit 1; }
    curl -L --fail -C - -o "gguf/$file.part" "$base/$file"
    mv "gguf/$file.part" "gguf/$file"
}

for f in $files; do fetch "$f"; done

main=""
case "$which" in q2|all) main=$q2 ;; q4) main=$q4 ;; esac
if [ -n "$main" ]; then
    if [ "$dry" -eq 1 ]; then
        echo "would link ds4flash.gguf -> gguf/$main"
    else
        ln -sf "gguf/$main" ds4flash.gguf
        echo "ds4flash.gguf -> gguf/$main"
    fi
fi
