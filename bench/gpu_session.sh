#!/usr/bin/env bash
# The GPU run (the CUDA tests, the Triton kernels timed, whole models against FP16) as one command for a lent GPU
# machine, which has torch, triton and CUDA but no network: run from the repo root with the wheels `make gpu-wheels`
# puts in .whl/ (torchao and mamba-ssm, which that machine lacks) carried along.
#
#   STEPS="tests kernels" bash bench/gpu_session.sh   # first call (at most 7.5 minutes: the two limits)
#   STEPS="models" bash bench/gpu_session.sh          # second call (under 5: quantizing Vim-B and VMamba v2v-B on
#                                                     # the CPU took 3.3 minutes on 2 cores here, then the timings)
#   STEPS="compile" bash bench/gpu_session.sh         # if time is left: torch.compile of Vim-B's variants
# One call runs at most 10 minutes, hence the split; STEPS defaults to "tests kernels models".
#
# Results go to $OUT (default ./gpu_out): env.txt, each step's log (tests.log, kernels.log, models.log, compile.log)
# and tables (kernels_gpu.md, models_gpu.md, models_compile_gpu.md). Every step has its own time limit (seconds: TESTS_S, KERNELS_S, MODELS_S, COMPILE_S) and
# writes its table row by row, so a step cut short keeps what it measured; a failing step does not stop the next.
set -u
OUT=${OUT:-$PWD/gpu_out}
STEPS=${STEPS:-tests kernels models}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/vmq_site \
    .whl/*.whl || { echo "installing the carried wheels failed" >&2; exit 1; }
  export PYTHONPATH=/tmp/vmq_site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1 TRITON_INTERPRET=0

{
  nvidia-smi
  python3 -c "import sys, torch, triton; print(sys.version); print('torch', torch.__version__, 'CUDA', \
torch.version.cuda, '| triton', triton.__version__, '|', torch.cuda.get_device_name())"
  python3 -c "from importlib.metadata import version as v; print(' | '.join(f'{p} {v(p)}' for p in \
('torchao', 'mamba_ssm', 'onnx', 'onnxruntime', 'timm', 'einops')))"
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

step() {  # step NAME SECONDS COMMAND...: run it under its limit, log to $OUT/NAME.log, report its exit status
  local name=$1 seconds=$2
  shift 2
  case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
  local t0=$SECONDS
  timeout "$seconds" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc after $((SECONDS - t0)) s (limit $seconds s)$([ $rc = 124 ] && echo ', cut short')"
  tail -n 5 "$OUT/$name.log"
}

step tests "${TESTS_S:-200}" python3 -m pytest -q -m cuda -p no:cacheprovider tests/test_kernels.py tests/test_cuda.py
step kernels "${KERNELS_S:-240}" python3 bench/kernels.py --out "$OUT/kernels_gpu.md"
step models "${MODELS_S:-300}" python3 bench/gpu_models.py --out "$OUT/models_gpu.md"
step compile "${COMPILE_S:-300}" python3 bench/gpu_models.py --models vim_base --batches 256 --compile \
  --out "$OUT/models_compile_gpu.md"
