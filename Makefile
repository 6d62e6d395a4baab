# make test: the test suite (installs the requirements first if any is missing), <= 90 s on 2 cores.
# make smoke: every script at a tiny size, into runs/smoke/.
# make record: every script's default run, written into its committed record results/<script>/.
PYTHON ?= python3
SCRIPTS := flowrl fope contextar ssrl read_r hallucination_lens msi_agent

.PHONY: test smoke record deps

deps:
	@$(PYTHON) -c "import torch, numpy, tiktoken, datasets, matplotlib, pytest" 2>/dev/null || $(PYTHON) -m pip install -r requirements.txt

test: deps
	$(PYTHON) -m pytest -q tests

smoke: deps
	@set -e; for s in $(SCRIPTS); do echo "== $$s.py --smoke"; $(PYTHON) $$s.py --smoke --out runs/smoke/$$s; done

record: deps
	@set -e; for s in $(SCRIPTS); do echo "== $$s.py"; $(PYTHON) $$s.py --out results/$$s; done
