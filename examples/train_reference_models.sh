#!/usr/bin/env bash
# How the shipped reference models were trained (CPU, 2 cores).
# Each `vmq train` writes <out-dir>/<name>.safetensors and <name>.json (the model card).
set -euo pipefail
shared="trained on a 2-core CPU with the other reference model training in parallel (1 torch thread each, \
examples/train_reference_models.sh); train.seconds and eval_seconds were measured under that contention"
# Stage 1, both models in parallel, one thread each. (The shipped vim-fm-tiny's first stage was written to
# vmq_fx/models/reference and copied to out/train before stage 2; same weights.)
vmq train vim_fm_tiny --name vim-fm-tiny --epochs 6 --threads 1 --out-dir out/train --conditions "$shared" &
vmq train vmamba_fm_tiny --name vmamba-fm-tiny --epochs 5 --threads 1 --out-dir vmq_fx/models/reference \
    --conditions "$shared" &
wait
# Stage 2: vim-fm-tiny (88.40 % after stage 1) continues for 8 more epochs with a new warm-up and cosine cycle;
# its card embeds the stage-1 card (init_from) and sums both stages (total_train).
vmq train vim_fm_tiny --name vim-fm-tiny --epochs 8 --lr 1e-3 --seed 1 --threads 2 \
    --init-from out/train/vim-fm-tiny.safetensors --out-dir vmq_fx/models/reference \
    --conditions "continued from the 6-epoch run (init_from) on an otherwise idle 2-core CPU, 2 torch threads"
# vim-fm-197 (Vim at 197 tokens: 2x2 patches of the 28x28 images + the middle class token). Stage 1, 3 epochs on one
# thread (86.55 %); it continued with --init-from until it reached 90 %. `vmq train` also writes
# <name>-last.safetensors after every epoch, so a stopped stage can be continued from its last epoch.
vmq train vim_fm_197 --name vim-fm-197 --epochs 3 --threads 1 --out-dir out/train \
    --conditions "1 torch thread on a shared 2-core CPU (tests, benchmarks and quantization runs shared it)"
# Stage 2 (4 epochs asked, stopped with the session after its first; its -last checkpoint continues), stage 3 from it
# (89.57 %), stage 4 from stage 3 with a smaller peak learning rate (90.37 %). Stage 4's weights ship unchanged as
# vmq_fx/models/reference/vim-fm-197.safetensors; its card, renamed vim-fm-197, says so under "written_as".
vmq train vim_fm_197 --name vim-fm-197-s2 --epochs 4 --lr 1e-3 --seed 1 --threads 1 \
    --init-from out/train/vim-fm-197.safetensors --out-dir out/train
vmq train vim_fm_197 --name vim-fm-197-s3 --epochs 3 --lr 1e-3 --seed 2 --threads 1 \
    --init-from out/train/vim-fm-197-s2-last.safetensors --out-dir out/train \
    --conditions "1 torch thread on a shared 2-core CPU (tests, benchmarks and quantization runs shared it)"
vmq train vim_fm_197 --name vim-fm-197-s4 --epochs 3 --lr 5e-4 --seed 3 --threads 1 \
    --init-from out/train/vim-fm-197-s3.safetensors --out-dir out/train \
    --conditions "1 torch thread on a shared 2-core CPU (tests, benchmarks and quantization runs shared it)"
