#!/usr/bin/env bash
# The GPU node check, in one command of at most ~12 minutes:
#   1. training samples/s at 32³ for the default model, splat, and the cnn decoder (bench_train.py, batch 64 and 512),
#   2. template matching particles/s (bench_match.py),
#   3. the embedded default workflow with training.device: cuda, timed with `time`,
# each under its own timeout, then one summary. Logs go to the work folder.
#
#   benchmarks/gpu_check.sh                          # on a GPU node, from the project root
#   benchmarks/gpu_check.sh --device cpu --quick     # the same steps, tiny, on a CPU (a self-test)
#
# Options: --device cuda|cpu (default cuda); --quick (a few steps, 16 particles, and the
# workflow as a snakemake dry run); --only STEP... (train, match, workflow); --work-dir DIR.
# Exit status: 0 when every step ran, 1 when one failed or timed out (the summary says which).
set -uo pipefail

device=cuda
quick=0
work="${TMPDIR:-/tmp}/cryovae-gpu-check"
steps=(train match workflow)

usage() {
    sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
    exit "$1"
}

while [ $# -gt 0 ]; do
    case "$1" in
        --device) device="$2"; shift 2 ;;
        --quick) quick=1; shift ;;
        --work-dir) work="$2"; shift 2 ;;
        --only)
            steps=()
            shift
            while [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; do steps+=("$1"); shift; done ;;
        -h|--help) usage 0 ;;
        *) echo "gpu_check.sh: unknown argument $1" >&2; usage 2 ;;
    esac
done
case "$device" in cuda|cpu) ;; *) echo "gpu_check.sh: --device must be cuda or cpu, got $device" >&2; exit 2 ;; esac
for step in "${steps[@]}"; do
    case "$step" in train|match|workflow) ;; *) echo "gpu_check.sh: unknown step $step" >&2; exit 2 ;; esac
done

repo="$(cd "$(dirname "$0")/.." && pwd)"
cd "$repo" || exit 2
export PYTHONPATH="$repo/workflow${PYTHONPATH:+:$PYTHONPATH}"
mkdir -p "$work"
python - <<'EOF' || { echo "gpu_check.sh: python cannot import torch and cryovae (install the project first)" >&2; exit 2; }
import cryovae, torch
print(f"cryovae from {cryovae.__file__}; torch {torch.__version__}; CUDA available: {torch.cuda.is_available()}")
EOF

summary=()
failed=0

# run_step NAME SECONDS COMMAND...: run under a timeout, output to $work/NAME.log; remember the outcome.
run_step() {
    local name="$1" limit="$2" rc start
    shift 2
    echo "== $name (at most ${limit} s): $*"
    start=$(date +%s)
    timeout "$limit" "$@" > "$work/$name.log" 2>&1
    rc=$?
    tail -n 5 "$work/$name.log"
    if [ "$rc" -ne 0 ]; then
        failed=1
        if [ "$rc" -eq 124 ]; then
            summary+=("$name: TIMED OUT after ${limit} s (log $work/$name.log)")
        else
            summary+=("$name: FAILED with status $rc after $(( $(date +%s) - start )) s (log $work/$name.log)")
        fi
        return 1
    fi
    return 0
}

train_rate() {
    python - "$work/$1.log" <<'EOF'
import json, sys
rows = [json.loads(line) for line in open(sys.argv[1]) if line.startswith("{")]
for r in rows:
    print(f"{r['case']} batch {r['batch']}: {r['samples_per_s']:.0f} samples/s on {r['device_name']} "
          f"({r['compute_dtype']}), peak memory {r['peak_memory_mib']:.0f} MiB")
EOF
}

if [[ " ${steps[*]} " == *" train "* ]]; then
    if [ "$quick" -eq 1 ]; then
        sizes=("8 2 120")
        warmup=1
    else
        sizes=("64 200 120" "512 60 90")
        warmup=5
    fi
    for size in "${sizes[@]}"; do
        read -r batch count limit <<< "$size"
        name="train_batch$batch"
        if run_step "$name" "$limit" python benchmarks/bench_train.py --device "$device" --what train --decoders splat cnn \
            --batch "$batch" --steps "$count" --warmup "$warmup" --max-particles 4096; then
            summary+=("train: $(train_rate "$name")")
        fi
    done
fi

if [[ " ${steps[*]} " == *" match "* ]]; then
    particles=4096
    [ "$quick" -eq 1 ] && particles=16
    if run_step match 120 python benchmarks/bench_match.py --device "$device" --particles "$particles"; then
        summary+=("match: $(grep -o '[0-9.]* s wall = [0-9]* particles/s' "$work/match.log") ($(grep -o 'device [a-z]*' "$work/match.log" | head -1); $(grep -o 'modulo the point groups: median [0-9.]*°' "$work/match.log"))")
    fi
fi

if [[ " ${steps[*]} " == *" workflow "* ]]; then
    overlay="$work/workflow_overlay.yaml"
    printf '{"output_dir": "%s", "training": {"device": "%s"}}\n' "$work/workflow" "$device" > "$overlay"
    dry=()
    [ "$quick" -eq 1 ] && dry=(--dry-run)
    rm -rf "$work/workflow"
    # bash's `time` keyword reports the wall time of the whole run on stderr, into the summary;
    # the inner script's $1 and $@ are its own arguments, expanded by the inner bash
    # shellcheck disable=SC2016
    if run_step workflow 360 bash -c 'time snakemake --cores all --configfile config.yaml "$1" "${@:2}"' \
        _ "$overlay" "${dry[@]}"; then
        summary+=("workflow (training.device: $device): $(grep -E '^(real|user|sys)' "$work/workflow.log" | tr '\t\n' '  ')")
        if [ -f "$work/workflow/model/history.csv" ]; then
            summary+=("workflow train job: $(grep -h "cryovae train: device" "$work/workflow/logs/train.log")")
            summary+=("workflow train job: $(python -c 'import sys, pandas as pd; h = pd.read_csv(sys.argv[1])
print("samples/s per epoch", h["samples_per_s"].round().tolist(),
      "validation s", h["validation_seconds"].round(1).tolist())' "$work/workflow/model/history.csv")")
        fi
    fi
fi

echo
echo "== summary ($(date -u +%Y-%m-%dT%H:%M:%SZ), $(uname -m), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg))"
for line in "${summary[@]}"; do
    echo "$line"
done
exit "$failed"
