# Single entry point: `make run` (main job) and `make test` (test suite) set up everything they need.
# Install order (README, "Install"): torch is pinned first so that nothing else pulls a CUDA build of it.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.vmq-installed
FM_DIR := /usr/share/datasets/fashion-mnist

.PHONY: venv data cross run test bench gpu-wheels clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install torch==2.13.0
	$(PIP) install numpy triton==3.7.1 einops pyyaml safetensors tqdm huggingface_hub transformers \
	    ninja packaging pillow torchao==0.18.0 onnx==1.23.2 onnxscript==0.7.2 onnxruntime==1.32.0 \
	    matplotlib pytest
	MAMBA_FORCE_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE \
	    $(PIP) install --no-build-isolation --no-deps mamba-ssm==2.3.2.post1
	$(PIP) install --no-deps timm==1.0.31
	# Tests only: 20 labelled ImageNet photos ship inside this wheel (foolbox/data/imagenet_*.jpg).
	$(PIP) install --no-deps foolbox==3.3.4
	$(PIP) install --no-deps --no-build-isolation -e .
	# Build the fused CPU kernels now (cached in ~/.cache/vmq_fx) rather than inside the first test or job.
	$(PY) -c "from vmq_fx.ops.native import kernels; assert kernels() is not None"
	# onnxruntime's API headers (Debian's libonnxruntime-dev, SHA-256 checked) for vmq_fx's onnxruntime custom-op
	# library (export_onnx(ops="vmq")); built now too.
	$(PY) -m vmq_fx.export.ort_ops --fetch-headers --build
	touch $(STAMP)

# Fashion-MNIST comes from Debian; install it when we can (root, apt available), else say how.
data:
	@test -f $(FM_DIR)/t10k-labels-idx1-ubyte.gz || \
	  { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	    (apt-get update -qq && apt-get install -y -qq dataset-fashion-mnist >/dev/null) ; } || \
	  echo "note: Fashion-MNIST not installed; run 'sudo apt-get install dataset-fashion-mnist'"

# Debian's aarch64 cross compiler and qemu-user: the tests compile the CPU kernels for ARM64 and run their torch-free
# cores under qemu-aarch64 (install when we can).
cross:
	@{ command -v aarch64-linux-gnu-g++ >/dev/null && command -v qemu-aarch64 >/dev/null ; } || \
	  { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	    (apt-get update -qq && apt-get install -y -qq g++-aarch64-linux-gnu qemu-user >/dev/null) ; } || \
	  echo "note: no aarch64 cross compiler or qemu-user; run 'sudo apt-get install g++-aarch64-linux-gnu qemu-user'"

# The main job: PTQ4VM W8A8 and ViM-VQ 2-bit on the shipped vim-fm-tiny (a shortened optimization schedule keeps
# it under 10 minutes on a 2-core CPU), saved, exported to ONNX, checked in onnxruntime, with a report.
run: venv data
	$(VENV)/bin/vmq quantize vim-fm-tiny --recipe ptq4vm-w8a8 vimvq-2bit --steps 50 --batch-size 64 \
	    --out-dir out/vim-fm-tiny

test: venv data cross
	$(PY) -m pytest -q

bench: venv
	$(PY) bench/scan_cpu.py

# For a lent GPU machine (torch, triton and CUDA there, no network): the wheels it lacks, into .whl/ (git-ignored),
# carried to it with the repo; bench/gpu_session.sh installs them there and runs the GPU checks.
gpu-wheels: venv
	mkdir -p .whl
	$(PIP) download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
	    --platform manylinux_2_28_x86_64 -d .whl torchao==0.18.0
	MAMBA_FORCE_BUILD=TRUE MAMBA_SKIP_CUDA_BUILD=TRUE \
	    $(PIP) wheel --no-deps --no-build-isolation -w .whl mamba-ssm==2.3.2.post1

clean:
	rm -rf $(VENV)
