# Two commands for a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
TORCH  := torch==2.13.0

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo eval-demo test install install-test lint bench clean

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	touch $@

# torch first, pinned: an unpinned resolution would fetch CUDA wheels.
$(VENV)/.installed: $(VENV)/.created pyproject.toml
	$(PIP) install -q $(TORCH)
	$(PIP) install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(PIP) install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

# The demo study (configs/study-demo.yaml: study 1 reduced; 480 s on 2 cores from a fresh clone,
# install included, on 2026-12-06): two shards side by side (one thread each), merged, then the
# report; the last line printed is the Markdown report's path. A rerun skips finished runs.
DEMO_DIR   := runs/study-demo
DEMO_STORE := $(DEMO_DIR)/study.sqlite
# Runs in progress (checkpoints at every evaluation point) on tmpfs where there is one.
DEMO_WORK  := $(if $(wildcard /dev/shm/.),/dev/shm/batchscale-$(shell id -u)-study-demo,$(DEMO_DIR)/work)
DEMO_SWEEP := $(VENV)/bin/batchscale sweep configs/study-demo.yaml --work $(DEMO_WORK) --threads 1

demo: $(VENV)/.installed
	mkdir -p $(DEMO_DIR)
	$(DEMO_SWEEP) --shard 0/2 --store $(DEMO_DIR)/shard-0.sqlite > $(DEMO_DIR)/shard-0.log 2>&1 & \
	$(DEMO_SWEEP) --shard 1/2 --store $(DEMO_DIR)/shard-1.sqlite; s1=$$?; \
	wait $$! || { echo "shard 0 failed: see $(DEMO_DIR)/shard-0.log"; exit 1; }; exit $$s1
	$(VENV)/bin/batchscale merge $(DEMO_STORE) $(DEMO_DIR)/shard-0.sqlite $(DEMO_DIR)/shard-1.sqlite
	$(VENV)/bin/batchscale report $(DEMO_STORE) --out $(DEMO_DIR)/report

# A reference study, e.g. `make study-static-mix` (configs/study-static-mix.yaml; hours: see
# the config): two single-thread processes side by side, each running its shard and then
# helping with the other's (processes sharing a store never run a cell twice: README, "Store,
# shards, presets"), merged, shipped to results/<study>/ (the report, the store, MANIFEST.md
# with these commands). A rerun resumes: finished runs are skipped, so a study may span
# sessions. REUSE="a.sqlite b.sqlite": take the finished runs of those stores (an earlier
# grid, a pilot) whose resolved config is a cell of this one. A process that fails says so
# (with the time) when it fails, not when the other one ends.
REUSE ?=
STUDY_SWEEP = $(VENV)/bin/batchscale sweep configs/$@.yaml --threads 1 $(addprefix --reuse ,$(REUSE))
study-%: $(VENV)/.installed
	mkdir -p runs/$@
	( { $(STUDY_SWEEP) --shard 0/2 --store runs/$@/shard-0.sqlite --work runs/$@/work-0 && \
	    $(STUDY_SWEEP) --shard 1/2 --store runs/$@/shard-1.sqlite --work runs/$@/work-0-helps-1; } > runs/$@/shard-0.log 2>&1 || \
	  { echo "$$(date -u +%FT%TZ) process 0 failed: see runs/$@/shard-0.log (process 1 runs on)"; exit 1; } ) & \
	{ $(STUDY_SWEEP) --shard 1/2 --store runs/$@/shard-1.sqlite --work runs/$@/work-1 && \
	  $(STUDY_SWEEP) --shard 0/2 --store runs/$@/shard-0.sqlite --work runs/$@/work-1-helps-0; } > runs/$@/shard-1.log 2>&1 || \
	  { echo "$$(date -u +%FT%TZ) process 1 failed: see runs/$@/shard-1.log (process 0 runs on)"; s1=1; }; \
	wait $$! || exit 1; [ -z "$$s1" ] || exit 1
	rm -f runs/$@/study.sqlite
	$(VENV)/bin/batchscale merge runs/$@/study.sqlite runs/$@/shard-0.sqlite runs/$@/shard-1.sqlite
	$(VENV)/bin/batchscale ship runs/$@/study.sqlite --out results/$@ \
	  --sweep-command "batchscale sweep configs/$@.yaml --threads 1 --work runs/$@/work-0 --shard 0/2 --store runs/$@/shard-0.sqlite" \
	  --sweep-command "batchscale sweep configs/$@.yaml --threads 1 --work runs/$@/work-1 --shard 1/2 --store runs/$@/shard-1.sqlite" \
	  --sweep-command "batchscale sweep configs/$@.yaml --threads 1 --work runs/$@/work-0-helps-1 --shard 1/2 --store runs/$@/shard-1.sqlite" \
	  --sweep-command "batchscale sweep configs/$@.yaml --threads 1 --work runs/$@/work-1-helps-0 --shard 0/2 --store runs/$@/shard-0.sqlite" \
	  --sweep-command "batchscale merge runs/$@/study.sqlite runs/$@/shard-0.sqlite runs/$@/shard-1.sqlite"

# The packaged default model on STS-B test (a minute).
eval-demo: $(VENV)/.installed
	$(VENV)/bin/batchscale eval --model default --task stsb --split test

# The house style is `ruff check` (pyproject.toml); the code is not `ruff format`ted, so a
# format check here failed on every checkout.
lint: $(VENV)/.installed-test
	$(VENV)/bin/ruff check src tests benchmarks

test: $(VENV)/.installed-test
	$(VENV)/bin/ruff check src tests benchmarks
	$(PY) -m pytest -q

# Long measurements (tens of minutes on 2 cores); not part of `make test`.
bench: $(VENV)/.installed-test
	$(PY) benchmarks/losses.py
	$(PY) benchmarks/loss_scaling.py
	$(PY) benchmarks/gradcache.py
	$(PY) benchmarks/shuffling.py
	$(PY) benchmarks/eval_default.py

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache .ruff_cache
