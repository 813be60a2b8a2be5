#!/usr/bin/env bash
# The census demo with DP on: set up .venv if needed, fine-tune SmolLM2-135M with DP-SGD
# for a few minutes, sample rows, print epsilon, delta and the valid-row rate; then score the
# synthetic rows against the held-out rows (accuracy, discriminator AUC, DCR share).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/dplm train recipes/census_dp.yaml "$@"
.venv/bin/dplm report runs/census_dp
