#!/usr/bin/env bash
# The census demo with DP on: set up .venv if needed, fine-tune SmolLM2's first 2 layers with
# DP-SGD to epsilon 2.5 (a first stage on rows drawn from the DP statistics, then 150 DP-SGD
# steps: about 6 minutes on 2 cores), sample 2,000 rows, print epsilon, delta
# and the valid-row rate; then score the synthetic rows against the held-out rows (accuracy,
# discriminator AUC, DCR share, TSTR on income).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/dplm train recipes/census_dp_demo.yaml "$@"
.venv/bin/dplm report runs/census_dp_demo --target income
