#!/usr/bin/env bash
# GPU checks of the training path (docs/performance.md): one process, one table, under 6 minutes
# on one H100/H200. Needs torch with CUDA, numpy and regex; no Ray, no MLflow, no flash-attn
# (used when installed). Writes the table to $OUT/performance.md when OUT is set.
#   bash tests/gpu/run.sh            # on the GPU machine, from the repository root
#   bash tests/gpu/run.sh --smoke    # the same code on CPU, tiny sizes, about a minute
set -euo pipefail
cd "$(dirname "$0")/../.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
if [[ " $* " != *" --smoke "* ]]; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
python -c "import torch, numpy, regex; print('torch', torch.__version__, 'cuda', torch.version.cuda)"
exec timeout "${BENCH_TIMEOUT_S:-420}" python tests/gpu/bench.py "$@"
