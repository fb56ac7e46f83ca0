# qwen3repro — entry points. Every target sets up what it needs (a .venv with torch 2.13.0 first).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
TORCH_VERSION ?= 2.13.0
STAMP  := $(VENV)/.installed
# Where the tiny, small and micro pipelines compute: cpu (default), cuda, cuda:N or auto. The device is not
# part of any lineage hash; a run asking for a GPU on a machine without one stops before its first stage.
DEVICE ?= cpu

.PHONY: help venv system-deps test test-all bench tiny-pipeline small-pipeline seeds micro-pipeline scaling-laws clean

help:
	@echo "make tiny-pipeline   run the tiny replication end to end (writes runs/tiny/); DEVICE=cuda runs it on one GPU"
	@echo "make small-pipeline  tiny's pretraining + ~6x longer post-training (writes runs/small/, ~1 h after tiny)"
	@echo "make seeds           long-context and post-training rows over 3 training seeds (after tiny-pipeline; ~65 min):"
	@echo "                     runs/SPREAD.md, runs/SPREAD-post-training.md"
	@echo "make test            CPU test suite (what CI runs)"
	@echo "make bench           benchmarks (pytest-benchmark), ratios against transformers"
	@echo "make clean           remove runs/ and caches (keeps .venv)"
	@echo "make full STAGE=s2 MODEL=qwen3-0.6b [NODES=4 GPUS_PER_NODE=8] [DRY_RUN=1] [DATA=shards] [INIT=hub-id] [FORCE=1]"
	@echo "                     full-scale stage through nanotron: write its config, launch or print the plan"
	@echo "make full STAGE=all MODEL=qwen3-32b DRY_RUN=1   every stage of the model's chain, planned"
	@echo "make full-eval STAGE=fusion MODEL=qwen3-32b     a trained stage converted to HF and evaluated"

# The code reward's sandbox needs bubblewrap and libseccomp (Debian packages). As root they are installed
# here; otherwise the sandbox refuses to run code, and this says what to install.
system-deps:
	@if command -v bwrap >/dev/null 2>&1 && ldconfig -p 2>/dev/null | grep -q libseccomp.so.2; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		apt-get install -y -q bubblewrap libseccomp2 >/dev/null 2>&1 || \
		{ apt-get update -q >/dev/null 2>&1 && apt-get install -y -q bubblewrap libseccomp2 >/dev/null; }; \
	else echo "warning: the code sandbox needs bubblewrap and libseccomp2 (apt-get install bubblewrap libseccomp2); without them code rewards are 'no reward'"; fi

$(STAMP): pyproject.toml | system-deps
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q -e '.[dev,full]'
	$(PIP) install -q --no-deps verl==0.9.1
	touch $(STAMP)

venv: $(STAMP)

test: $(STAMP) system-deps
	$(PY) -m pytest -q

test-all: $(STAMP) system-deps
	$(PY) -m pytest -q -m "not gpu"

bench: $(STAMP)
	$(PY) -m pytest -q -m bench --benchmark-enable -s tests/bench

tiny-pipeline: $(STAMP)
	$(VENV)/bin/qwen3repro pipeline tiny --device $(DEVICE)

# Post-training claims with more compute; copies tiny's finished pretraining stages when present.
small-pipeline: $(STAMP)
	$(VENV)/bin/qwen3repro pipeline small --device $(DEVICE)

# The claims over three training seeds, each row's verdict and figures side by side with runs/tiny (seed 0):
# the long-context rows with the flagship's S1-S3 again under seeds 1 and 2 (tiny/tiny-seed1.toml,
# tiny-seed2.toml: runs/SPREAD.md), and the post-training and distillation rows with those stages again
# under seeds 1 and 2 from tiny's pretrained models (tiny/tiny-post-seed1.toml, tiny-post-seed2.toml:
# runs/SPREAD-post-training.md).
seeds: $(STAMP)
	$(VENV)/bin/qwen3repro pipeline tiny-seed1 --device $(DEVICE)
	$(VENV)/bin/qwen3repro pipeline tiny-seed2 --device $(DEVICE)
	$(VENV)/bin/qwen3repro eval spread runs/tiny runs/tiny-seed1 runs/tiny-seed2 --shared --out runs/SPREAD.md
	$(VENV)/bin/qwen3repro pipeline tiny-post-seed1 --device $(DEVICE)
	$(VENV)/bin/qwen3repro pipeline tiny-post-seed2 --device $(DEVICE)
	$(VENV)/bin/qwen3repro eval spread runs/tiny runs/tiny-post-seed1 runs/tiny-post-seed2 --shared \
		--out runs/SPREAD-post-training.md

micro-pipeline: $(STAMP)
	$(VENV)/bin/qwen3repro pipeline micro --device $(DEVICE)

# LR x batch x model-size sweep and power-law fits for the optimal LR and batch (~30 min on one thread).
scaling-laws: $(STAMP)
	$(VENV)/bin/qwen3repro scaling-laws --out runs/scaling_laws

clean:
	rm -rf runs .pytest_cache .hypothesis

# Full scale through nanotron (full/README.md). STAGE: s1 s2 s3 cold-start fusion distill, or all (the chain's
# plan, with DRY_RUN=1); MODEL: qwen3-0.6b ...; INIT: a released checkpoint (hub id or local folder) to start from;
# FORCE=1 launches a plan that does not fit in 90% of GPU memory.
STAGE ?=
MODEL ?=
NODES ?=
GPUS_PER_NODE ?=
DRY_RUN ?=
DATA ?=
INIT ?=
FORCE ?=
.PHONY: full full-eval
# A trained stage's latest checkpoint -> Hugging Face layout -> the evaluation suites (qwen3repro eval-hf).
full-eval: $(STAMP)
	$(VENV)/bin/qwen3repro full-eval --stage "$(STAGE)" --model "$(MODEL)" $(if $(DRY_RUN),--dry-run)

full: $(STAMP)
	$(PY) -m qwen3repro.nanotron.cli --stage "$(STAGE)" --model "$(MODEL)" \
		$(if $(NODES),--nodes $(NODES)) $(if $(GPUS_PER_NODE),--gpus-per-node $(GPUS_PER_NODE)) \
		$(if $(DRY_RUN),--dry-run) $(if $(DATA),--data $(DATA)) $(if $(INIT),--init $(INIT)) $(if $(FORCE),--force)

# verl 0.9.1 for the full-scale RL and on-policy distillation stages, in its own environment: verl pins
# transformers >=5.5.3,<5.11 while the main environment has a newer one. Our package goes in without extras
# (its core dependencies have no transformers pin, so verl's choice stands), enough for the reward module
# (qwen3repro.verl.reward) and the data writer to import next to verl. hypothesis is for the peer tests
# (tests/test_verl_peer.py), which skip while this environment is absent.
VERL_VENV    ?= .venv-verl
VERL_VERSION ?= 0.9.1
VERL_STAMP   := $(VERL_VENV)/.installed
.PHONY: verl-env
$(VERL_STAMP): pyproject.toml
	test -x $(VERL_VENV)/bin/python || $(PYTHON) -m venv $(VERL_VENV)
	$(VERL_VENV)/bin/pip install -q --upgrade pip
	$(VERL_VENV)/bin/pip install -q torch==$(TORCH_VERSION)
	$(VERL_VENV)/bin/pip install -q torch==$(TORCH_VERSION) 'verl[verl-core]==$(VERL_VERSION)' -e . 'hypothesis>=6.100' 'pytest>=8'
	$(VERL_VENV)/bin/pip check
	$(VERL_VENV)/bin/python -c "import verl, transformers, qwen3repro.rewards; print('verl', verl.__version__, 'transformers', transformers.__version__)"
	touch $(VERL_STAMP)

verl-env: $(VERL_STAMP)
