# Two entry points: `make demo` and `make test`. Both create .venv and install everything on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.install-stamp
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test clean world gpu-check

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml Makefile | $(PY)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q $(TORCH_PINS)
	$(PY) -m pip install -q -e ".[dev,openvino,serve]" $(TORCH_PINS)
	@# the web editor's test drives the Debian chromium (never a downloaded browser); it skips if this fails
	command -v chromium >/dev/null 2>&1 || apt-get install -y -q chromium >/dev/null 2>&1 \
		|| (apt-get update -q >/dev/null 2>&1 && apt-get install -y -q chromium >/dev/null 2>&1) \
		|| echo "note: could not install chromium; the web editor test will be skipped"
	touch $(STAMP)

demo: install
	$(VENV)/bin/ffclip edit --out artifacts/demo/edit.png --num 6 --seed 3 \
		--prompt "make it red" --prompt "paint the object blue" --prompt "a triangle" \
		--prompt "reshape it as a square" --prompt "make it small" --prompt "on a gray background"

# Train the shapes world's generator, CLIP and mapper from nothing (resumable: run again after an interruption), then
# write their weights into the package as the `world` preset's default and judge them. THREADS: CPU threads in all.
THREADS ?= 2
world: install
	$(PY) -m ffclip.world.build --out artifacts/world --threads $(THREADS)

test: install
	$(PY) -m pytest -q -n 2 --dist loadfile --durations=15

# The prepared GPU check, with the machine's own Python and packages (no install; .venv's Python where there is one):
# kernels, mapper and generator forms, the whole edit and TensorRT graph replay, into
# $(GPU_CHECK_OUT)/gpu_check.{json,md}. DRY_RUN=1: on the CPU.
# The Triton kernels ahead of time for both architectures, no GPU needed:
#   .venv/bin/python -m ffclip.kernels.aot --arch sm_80 --arch sm_90 --dtype fp16 --dtype bf16 --dtype fp32 --out aot.json
GPU_CHECK_OUT ?= artifacts/gpu-check
GPU_CHECK_PYTHON ?= $(if $(wildcard $(PY)),$(PY),$(PYTHON))
gpu-check:
	$(GPU_CHECK_PYTHON) benchmarks/gpu_check.py --out $(GPU_CHECK_OUT) $(if $(DRY_RUN),--dry-run)

clean:
	rm -rf artifacts build dist *.egg-info
