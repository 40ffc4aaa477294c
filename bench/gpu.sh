#!/usr/bin/env bash
# Every GPU benchmark of the project in one command, for a lent CUDA machine (budget: under 8 minutes), its output
# appended to bench/RESULTS.md under one dated heading (each script's own tables, in a fenced block).
#
#   bash bench/gpu.sh [--upstream-root /path/to/ACE-Step-1.5]
#
# Each benchmark runs under its own time limit (together 480 s: the 8-minute budget), so one that fails or
# overruns costs only its section.
set -uo pipefail
cd "$(dirname "$0")/.."
upstream=()
[ "${1:-}" = "--upstream-root" ] && [ -n "${2:-}" ] && upstream=(--upstream-root "$2")
results=bench/RESULTS.md
gpu="$(nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null | head -1)"
{
  echo
  echo "## GPU run $(date -u '+%Y-%m-%d %H:%M UTC') — ${gpu:-no nvidia-smi}, torch $(python -c 'import torch; print(torch.__version__)')"
} >> "$results"

section() {  # title, time limit in seconds, command...
  local title="$1" limit="$2"; shift 2
  echo "== $title" >&2
  local text rc
  text="$(timeout "$limit" "$@" 2>&1)"; rc=$?
  { echo; echo "### $title"; echo; echo '```'; echo "$ $*"; echo "$text" | tail -n 60
    [ "$rc" = 0 ] || echo "(exit $rc$([ "$rc" = 124 ] && echo ', time limit'))"; echo '```'; } >> "$results"
}

section "Training step at the real 2B shape (MFU, peak memory)" 100 \
  python bench/train_step.py --device cuda --shape 2b --write /dev/null
section "Step time and peak memory, every base precision, 2B" 80 \
  python bench/real_scale.py --device cuda --shape 2b --crop-seconds 60 --repeats 2
section "Step time and peak memory, every base precision, XL" 100 \
  python bench/real_scale.py --device cuda --shape xl --crop-seconds 60 --repeats 2
section "XL nf4 with fused backward and AdamW8bit (issue 12's 3 GiB row)" 60 \
  python bench/real_scale.py --device cuda --shape xl --crop-seconds 60 --repeats 2 --precisions nf4 \
  --fused-backward --optimizer adamw8bit
section "Ours vs the reference stack (60 s and 240 s, checkpointing on/off)" 100 \
  python bench/train_step_vs_reference.py --device cuda --rounds 3 "${upstream[@]}"
section "Decoder forward, real 2B shape" 40 \
  python bench/model_forward.py --device cuda --real --repeats 3 "${upstream[@]}"
echo "appended to $results" >&2
