#!/usr/bin/env bash
# The GPU table: step time, tokens/s, MFU (against the device's dense bf16 peak) and peak memory of a
# RetroMAE step against the family's own ...ForMaskedLM step (bf16 autocast, AdamW), for
#   BERT-base at 512 tokens, and XLM-RoBERTa-large (250,002-token vocabulary) at 8,192 tokens with gradient checkpointing,
# each variant in a process of its own (benchmark_step.py --lengths), with `retromae plan`'s figure beside the measured peak.
# Writes one JSON per row and gpu.md (the markdown table) in --output-dir.
#
#   benchmarks/gpu.sh                      # on a CUDA machine (H100/H200/A100 peaks known; else --peak-tflops T)
#   benchmarks/gpu.sh --dry-run            # on CPU: tiny sizes, a step each, proves the pipeline (CI)
set -euo pipefail
cd "$(dirname "$0")/.."

output_dir=""
dry_run=0
peak=()
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) dry_run=1; shift ;;
    --output-dir) output_dir="$2"; shift 2 ;;
    --peak-tflops) peak=(--peak-tflops "$2"); shift 2 ;;
    *) echo "gpu.sh: unknown argument '$1' (allowed: --dry-run, --output-dir DIR, --peak-tflops T)" >&2; exit 2 ;;
  esac
done

if [ "$dry_run" = 1 ]; then
  output_dir="${output_dir:-$(mktemp -d)}"
  # CPU has no bf16 peak to speak of: MFU is against a nominal 1 TFLOP/s unless --peak-tflops says otherwise.
  common=(--device cpu --dtype bfloat16 --repeats 1 --warmup 0 --peak-tflops "${peak[1]:-1}")
  rows=("bert smoke 2 64" "xlm-roberta smoke 2 128 --gradient-checkpointing")
else
  python -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu.sh: no CUDA device here; the table is measured on a GPU (benchmarks/gpu.sh --dry-run checks the pipeline on CPU).')"
  output_dir="${output_dir:-benchmarks/results/gpu}"
  common=(--device cuda --dtype bfloat16 --repeats 5 --warmup 2 ${peak[@]+"${peak[@]}"})
  rows=("bert base 32 512" "xlm-roberta large 4 8192 --gradient-checkpointing --vocab-size 250002")
fi
mkdir -p "$output_dir"

reports=()
for row in "${rows[@]}"; do
  read -r family size batch length extra <<<"$row"
  report="$output_dir/${family}-${size}-L${length}.json"
  # shellcheck disable=SC2086  # $extra holds several flags
  python benchmarks/benchmark_step.py --family "$family" --size "$size" --batch-size "$batch" --lengths "$length" \
    ${extra:-} "${common[@]}" --output "$report"
  reports+=("$report")
done
python benchmarks/benchmark_step.py --markdown-table "${reports[@]}" --output "$output_dir/gpu.md"
echo "gpu.sh: JSON and gpu.md in $output_dir"
