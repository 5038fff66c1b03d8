# One command per job on a fresh machine: `make test`, `make demo`.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH := torch==2.14.1 torchvision==0.29.1
export HF_HUB_OFFLINE := 1

.PHONY: install lint test test-all demo demo-survival bench clean

install: $(STAMP)

VIEWER := icmil_pl/views/viewer

$(STAMP): pyproject.toml $(VIEWER)/package-lock.json
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[dev]' $(TORCH)
	npm ci --prefix $(VIEWER) --no-audit --no-fund --loglevel=error  # OpenSeadragon for `python -m icmil_pl view`
	touch $(STAMP)

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q

test-all: install
	$(PY) -m pytest -q -m ''

# ICMIL, 2 iterations, on a synthetic cohort written under data/demo on first use (4-10 minutes on 2 CPU cores).
demo: install
	$(PY) -m icmil_pl fit -c experiments/demo.yaml

# Survival: ICMIL, 1 iteration, patient bags, BagGradient through the discrete-time survival loss.
demo-survival: install
	$(PY) -m icmil_pl fit -c experiments/demo_survival.yaml

bench: install
	$(PY) benchmarks/bench_slides.py
	$(PY) benchmarks/bench_features.py
	$(PY) benchmarks/bench_digits_e2e.py --epochs 5 --seeds 5
	$(PY) benchmarks/bench_chunked.py --sizes 256 1024
	$(PY) benchmarks/bench_chunked.py --embedder vit_small_lora --chunk-size 32 --sizes 64 128 256 1024 8192 \
		--variants chunked full --steps 1 --large 256 --warmup-size 32 --budget-gb 16
	$(PY) benchmarks/bench_gpu.py
	$(PY) benchmarks/bench_icmil.py
	$(PY) benchmarks/bench_verdict.py --config experiments/demo.yaml --seeds 5 --arms frozen BagGradient Distillation \
		"end to end" --e2e-epochs 8 --out runs/bench_demo --model.init_args.reestimate_batchnorm=8192
	$(PY) benchmarks/bench_tasks.py
	$(PY) -m icmil_pl fit -c experiments/pretrain_ssl.yaml -c experiments/ssl/hard_cohort.yaml
	$(PY) benchmarks/bench_verdict.py --config experiments/hard_cohort.yaml --ssl runs/ssl_hard/embedder.pt --seeds 5 \
		--arms frozen "frozen ssl" BagGradient "BagGradient ssl" "Distillation ssl" "end to end ssl" --e2e-epochs 8

clean:
	rm -rf $(VENV) *.egg-info $(VIEWER)/node_modules
