#!/usr/bin/env bash
# The census demo with DP on: set up .venv if needed, fine-tune SmolLM2-135M with DP-SGD
# for a few minutes, sample rows, print epsilon, delta and the valid-row rate.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/dplm train recipes/census_dp.yaml "$@"
