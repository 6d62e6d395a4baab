# make test: the test suite (installs the requirements first if they are missing), <= 3 min on 2 cores.
# make smoke: every script at a tiny size.  make reproduce: every script's default run, results in runs/.
PYTHON ?= python3
SCRIPTS := flowrl fope contextar ssrl read_r hallucination_lens msi_agent

.PHONY: test smoke reproduce deps

deps:
	@$(PYTHON) -c "import torch, numpy, tiktoken, datasets, matplotlib, pytest" 2>/dev/null || $(PYTHON) -m pip install -r requirements.txt

test: deps
	$(PYTHON) -m pytest -q tests

smoke: deps
	@set -e; for s in $(SCRIPTS); do if [ -f $$s.py ]; then echo "== $$s.py --smoke"; $(PYTHON) $$s.py --smoke --out runs/smoke/$$s; fi; done

reproduce: deps
	@set -e; for s in $(SCRIPTS); do if [ -f $$s.py ]; then echo "== $$s.py"; $(PYTHON) $$s.py; fi; done
