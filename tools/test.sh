#!/usr/bin/env bash
# The README's test command: set-up (idempotent), then every test with a time limit.
set -euo pipefail
cd "$(dirname "$0")/.."
./tools/setup.sh --dev
export PATH="$HOME/.cargo/bin:$PATH"
# Python tools: tokeniser, checkpoint import (restricted unpickler), ONNX export, fixture.
timeout 600 .venv/bin/pytest -q tools
# Slow tests carry their own timeouts; this bounds the whole run.
timeout 1800 cargo test --locked "$@"
