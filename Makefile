# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: bootstrap demo test test-unit test-fast lint up down status clean screenshots bench quality study-small

bootstrap:
	@infra/bootstrap.sh

demo: bootstrap  ## start the local stack and run a small retraining end to end
	$(BIN)/headbench demo

# the integration tests in one xdist worker (one session stack, file order), the unit tests beside them in another
test: bootstrap  ## ruff, the import-layer contract, then the whole suite: unit + integration against real local servers
	$(BIN)/ruff check .
	$(BIN)/lint-imports
	$(BIN)/python -m pytest -n 2 --dist loadgroup

test-unit: bootstrap  ## the unit tests alone, in two xdist workers: no servers, no Ray cluster
	$(BIN)/python -m pytest -n 2 tests/unit

test-fast: bootstrap  ## no training: one stack's CLI and API checks, the unit tests beside them (tests marked training left out)
	$(BIN)/python -m pytest -n 2 --dist loadgroup -m "not training"

bench: bootstrap  ## the pipeline benchmark: B1 plain PyTorch vs Ray Train alone vs B2 headbench, overheads, memory (~9 min)
	$(BIN)/python -m bench --ray-alone

quality: bootstrap  ## the quality benchmark: pipeline vs plain script, best recipe, demo comparison (docs/quality.md)
	$(BIN)/python -m bench quality

study-small: bootstrap  ## a head-strategy study on Fashion-MNIST subsets (3 cells x 3 strategies x 3 seeds; docs/study.md)
	$(BIN)/headbench up
	$(BIN)/headbench study --image-size 32 --epochs 2 --batch-size 32 --lr 0.01 --workers 1 --cpus-per-worker 1 \
	  --test-limit 500 --seeds 3

lint: bootstrap
	$(BIN)/ruff check .

up: bootstrap
	$(BIN)/headbench up

down:
	@if [ -x $(BIN)/headbench ]; then $(BIN)/headbench down; fi

status: bootstrap
	$(BIN)/headbench status

clean: down
	rm -rf .headbench

screenshots: bootstrap  ## docs/img/*.png from a tiny comparison, via Debian's headless Chromium
	@command -v chromium >/dev/null || (apt-get install -y -q chromium >/dev/null || (apt-get update -q >/dev/null && apt-get install -y -q chromium >/dev/null))
	@$(BIN)/python -c "import playwright" 2>/dev/null || $(BIN)/pip install -q playwright
	$(BIN)/python -m tools.screenshots
