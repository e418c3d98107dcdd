#!/usr/bin/env bash
# Run the whole test suite on the oldest torch / torchvision pair that requirements.txt
# allows (torch 2.4, torchvision 0.19), in a fresh virtual environment of its own (~5 GB).
#
#     bash tools/test_oldest.sh              # extra arguments go to pytest, e.g. -x -k peft
#
# CI runs the newest versions; this script is how the lower bound is kept honest.
set -euo pipefail
cd "$(dirname "$0")/.."
venv=${OLDEST_VENV:-.venv-oldest}
rm -rf "$venv"
python3 -m venv "$venv"
. "$venv/bin/activate"
pip install -q -r requirements-test.txt -c tools/oldest-constraints.txt
# torchao 0.18 does not import on torch 2.4 (torch.int1) and then breaks transformers' and PEFT's imports too:
# without it the torchao cases of test_quantized.py skip, the bitsandbytes ones run.
pip uninstall -q -y torchao
python -c "import torch, torchvision; print(f'torch {torch.__version__}, torchvision {torchvision.__version__}')"
if [ -z "${MNIST_DATA_DIR:-}" ] && [ -d ../shared/data/MNIST/raw ]; then
  export MNIST_DATA_DIR="$(realpath ../shared/data)"
fi
python -m pytest -q -rs -p no:cacheprovider "$@"
