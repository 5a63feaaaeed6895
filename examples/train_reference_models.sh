#!/usr/bin/env bash
# How the shipped reference models were trained (CPU, 2 cores; the two runs in parallel, one thread each).
# Each writes vmq_fx/models/reference/<name>.safetensors and <name>.json (the model card).
set -euo pipefail
shared="trained on a 2-core CPU with the other reference model training in parallel (1 torch thread each, \
examples/train_reference_models.sh); train.seconds and eval_seconds were measured under that contention"
vmq train vim_fm_tiny --name vim-fm-tiny --epochs 6 --threads 1 --out-dir vmq_fx/models/reference \
    --conditions "$shared" &
vmq train vmamba_fm_tiny --name vmamba-fm-tiny --epochs 5 --threads 1 --out-dir vmq_fx/models/reference \
    --conditions "$shared" &
wait
