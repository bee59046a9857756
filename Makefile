# gmgan — drive the kit. `make` lists the targets; knobs are set like `make train SIGMA=0.2 EPOCHS=5`.

PYTHON  ?= .venv/bin/python
SIGMA   ?= 0.1
EPOCHS  ?= 30
N       ?= 10000
SIGMAS  ?= 0.01 0.05 0.1 0.2 0.5 1.0
SEEDS   ?= 0
THREADS ?= 0
TRAIN_FLAGS ?=
CKPT    ?= checkpoints
RESULTS ?= results

VENV  := .venv/.installed
SWEEP := $(CKPT)/sweep
RUNS  := $(foreach s,$(SEEDS),$(foreach g,$(SIGMAS),$(SWEEP)/sigma_$(g)_seed_$(s)) $(SWEEP)/vanilla_seed_$(s))
GMGAN := CHECKPOINTS_PATH=$(CKPT) $(PYTHON) gmgan.py

.DEFAULT_GOAL := help
.PHONY: help bootstrap train generate classifier evaluate control sweep report bench test clean
.DELETE_ON_ERROR:
.PRECIOUS: $(SWEEP)/%/G.pth  # a finished run's G.pth is no intermediate file to delete

## help        list the targets (this message)
help:
	@echo "usage: make TARGET [KNOB=value ...]   knobs: SIGMA EPOCHS N SIGMAS SEEDS THREADS TRAIN_FLAGS CKPT RESULTS PYTHON"
	@grep -E '^## ' $(MAKEFILE_LIST) | sed 's/^## /  /'

## bootstrap   create .venv from requirements.txt (once; every other target does this first)
bootstrap: $(VENV)
$(VENV): requirements.txt
	python3 -m venv .venv
	.venv/bin/pip install -r requirements.txt
	touch $@

## train       train one model:            make train SIGMA=0.1 EPOCHS=30  (resumes if the run exists)
train: $(VENV)
	$(GMGAN) train --resume --sigma $(SIGMA) --epochs $(EPOCHS) --threads $(THREADS) $(TRAIN_FLAGS)

## generate    N PNGs from checkpoints/G.pth:   make generate N=10000  -> samples/
generate: $(VENV)
	$(GMGAN) generate --n $(N) --out samples

## classifier  train the MNIST feature network -> checkpoints/mnist_cnn.pth
classifier: $(VENV)
	$(GMGAN) classifier

## evaluate    score checkpoints/G.pth: FID, precision, recall, density, coverage, digits -> results/metrics.json
evaluate: $(VENV)
	$(GMGAN) evaluate --checkpoint $(CKPT)/G.pth --n $(N) --out $(RESULTS)/metrics.json

## control     one model at several sampling σ -> results/control.json, control.png
control: $(VENV)
	$(GMGAN) control --checkpoint $(CKPT)/G.pth --n $(N) --results $(RESULTS)

## sweep       one run per σ and seed + vanilla baseline, scored and reported:  make -j2 sweep THREADS=1
sweep: $(RESULTS)/sweep.csv

## report      table and plots from the scored sweep runs -> results/
report: $(VENV)
	$(GMGAN) report --results $(RESULTS)

$(RESULTS)/sweep.csv: $(RUNS:=/metrics.json) | $(VENV)
	$(GMGAN) report --results $(RESULTS)

# a run's name says its latent: sigma_<σ>_seed_<s> or vanilla_seed_<s> (K = 1, c = 0, σ = 1)
parts = $(subst _, ,$(notdir $*))
latent_flags = $(if $(filter vanilla,$(word 1,$(parts))),--K 1 --c 0 --sigma 1,--sigma $(word 2,$(parts)))

# G.pth appears only when a run has finished; until then --resume continues from its last epoch
$(SWEEP)/%/G.pth: | $(VENV)
	$(GMGAN) train --resume --run sweep/$* $(latent_flags) --seed $(lastword $(parts)) --epochs $(EPOCHS) --threads $(THREADS) $(TRAIN_FLAGS)

$(SWEEP)/%/metrics.json: $(SWEEP)/%/G.pth
	$(GMGAN) evaluate --checkpoint $< --n $(N) --threads $(THREADS) --out $@

## bench       speed of training, generation and evaluation vs plain references -> results/bench.json
bench: $(VENV)
	$(GMGAN) bench --threads $(THREADS) --results $(RESULTS)

## test        the test suite (tiny CPU configs, a few minutes)
test: $(VENV)
	$(PYTHON) -m pytest -q test_gmgan.py

## clean       remove samples/ (runs and results are kept)
clean:
	rm -rf samples
