#!/usr/bin/env bash
# The test suite, slow real-model tests included: set up .venv if needed, then pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/python -m pytest -q "$@"
