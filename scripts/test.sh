#!/usr/bin/env bash
# Install cryovae with its test dependencies, then lint the workflow and run every test,
# the slow ones included (end-to-end workflow, RELION's own reconstruction, real SLURM).
#
#   bash scripts/test.sh                 # everything
#   bash scripts/test.sh -m "not slow"   # extra arguments go to pytest
#
# As root on Debian/Ubuntu it also installs RELION, slurm-wlm and munge from the
# distribution for the slow tests; elsewhere those tests skip with the reason.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh test

need=()
for pair in relion_reconstruct:relion slurmctld:slurm-wlm munged:munge; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || need+=("${pair#*:}")
done
if ((${#need[@]})) && [[ $(id -u) == 0 ]] && command -v apt-get >/dev/null; then
  echo "installing ${need[*]} for the slow tests"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >/dev/null
fi

# shellcheck disable=SC1091
source .venv/bin/activate
ruff check --select F,E9 workflow tests benchmarks
snakemake --lint
snakemake -n --quiet rules
python -m pytest "$@"
