#!/usr/bin/env bash
# How the shipped reference models were trained (CPU, 2 cores; the two runs in parallel, one thread each).
# Each writes vmq_fx/models/reference/<name>.safetensors and <name>.json (the model card).
set -euo pipefail
vmq train vim_fm_tiny --name vim-fm-tiny --epochs 3 --threads 1 --out-dir vmq_fx/models/reference &
vmq train vmamba_fm_tiny --name vmamba-fm-tiny --epochs 3 --threads 1 --out-dir vmq_fx/models/reference &
wait
