#!/usr/bin/env bash
# Run the release subset of the test suite under another torch version.
#
#   launch/torch_compat.sh 2.11.0            # venv in .venv-torch2.11.0, reused when present
#   launch/torch_compat.sh 2.11.0 /tmp/v211  # venv elsewhere
#   PYTEST_ARGS="-x" launch/torch_compat.sh 2.11.0
#
# Builds a virtual environment with `pip install torch==VERSION` (from PyPI: for 2.11.0 that is
# the CUDA wheel, which installs and runs its CPU/gloo paths on a machine without a GPU), installs
# bigtrain with its test extras into it, and runs what a torch upgrade can break: parity of every
# layout for the four families (all pipeline schedules), resume and elastic resume, checkpoint
# trust, the optimizers, the optional-package contract and the GPU check's CPU run. The default CI
# keeps its one torch; this is what a release runs for each supported version (docs/testing.md: "Supported
# torch versions").
set -euo pipefail

VERSION=${1:?usage: launch/torch_compat.sh TORCH_VERSION [VENV_DIR]}
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${2:-$ROOT/.venv-torch$VERSION}
cd "$ROOT"

start=$(date +%s)
if [[ ! -x "$VENV/bin/python" ]]; then
    python3 -m venv "$VENV"
fi
# torch first and pinned, so that installing bigtrain (torch>=2.11) keeps it.
"$VENV/bin/pip" install -q --disable-pip-version-check "torch==$VERSION"
"$VENV/bin/pip" install -q --disable-pip-version-check -e ".[test]"
installed=$(date +%s)
got=$("$VENV/bin/python" -c 'import torch; print(torch.__version__)')
if [[ "${got%%+*}" != "$VERSION" ]]; then
    echo "torch_compat: asked for torch $VERSION, the venv has $got" >&2
    exit 2
fi
size=$(du -sm "$VENV" | cut -f1)
echo "torch_compat: torch $got in $VENV (${size} MiB installed, $((installed - start)) s to install)"

TESTS=(
    tests/test_parallel.py            # vit + llama: every 2/4/8-rank layout, all four pipeline schedules
    tests/test_diffusion_parallel.py  # dit + sharded EMA parity and EMA resume across layouts
    tests/test_unet.py                # unet ZeRO-3 + EMA parity
    tests/test_causal_lm.py           # llama train/resume, TP export, contiguous stage inputs
    tests/test_resume.py              # exact and elastic resume, kill -9 during save, bit rot
    tests/test_trust.py               # checkpoint trust
    tests/test_optim.py tests/test_factored.py tests/test_adamw8bit.py
    tests/test_optional.py            # no optional package at import time
    tests/test_sharded_init.py        # meta-device init recorder: replay equals the CPU build bitwise
    tests/test_bench.py               # includes the GPU check's CPU run (marked slow)
)
# -m 'not slurm': the slow tests of these files run too (8-rank ViT 3D, the GPU check's CPU run).
set +e
OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} "$VENV/bin/python" -m pytest -q -p no:cacheprovider -m "not slurm" \
    --durations=15 "${TESTS[@]}" ${PYTEST_ARGS:-}
rc=$?
set -e
echo "torch_compat: torch $got: pytest exit $rc; tests $(( $(date +%s) - installed )) s, total $(( $(date +%s) - start )) s"
exit $rc
