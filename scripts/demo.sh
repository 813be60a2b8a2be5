#!/usr/bin/env bash
# The census demo with DP on: set up .venv if needed, spend epsilon 2.5 on the table's DP
# statistics and fine-tune SmolLM2's first 2 layers on 20,000 rows drawn from them (the plan
# for a compute budget this small: recipes/census_dp_demo.yaml), sample 2,000 rows, print
# epsilon, delta and the valid-row rate; then score the synthetic rows against the held-out
# rows (accuracy, discriminator AUC, DCR share, TSTR on income).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
.venv/bin/dplm train recipes/census_dp_demo.yaml "$@"
.venv/bin/dplm report runs/census_dp_demo --target income
