# Two entry points: `make demo` and `make test`. Both create .venv and install everything on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.install-stamp
TORCH_PINS := torch==2.14.1 torchvision==0.29.1

.PHONY: install demo test clean world

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
	$(VENV)/bin/ffclip edit --out artifacts/demo/edit.png \
		--prompt "blond hair" --prompt "a smiling face" --prompt "wearing glasses" --prompt "an old person"

# Train the shapes world's generator, CLIP and mapper from nothing (resumable: run again after an interruption), then
# write their weights into the package as the `world` preset's default and judge them. THREADS: CPU threads in all.
THREADS ?= 2
world: install
	$(PY) -m ffclip.world.build --out artifacts/world --threads $(THREADS)

test: install
	$(PY) -m pytest -q -n 2 --durations=15

clean:
	rm -rf artifacts build dist *.egg-info
