# `make demo` and `make test` install what is missing first: the CPU build of torch 2.13.0 when no torch is
# installed (an installed torch is never upgraded), then llmctl in editable mode with its test extras.
PYTHON ?= python3
STAMP := .make/installed

.PHONY: install demo test bench clean

$(STAMP): pyproject.toml
	@mkdir -p .make
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install "torch==2.13.0"
	$(PYTHON) -m pip install -q -e ".[test]"
	@touch $@

install: $(STAMP)

test: $(STAMP)
	$(PYTHON) -m pytest tests -n auto --maxprocesses 4 --dist loadfile

demo: $(STAMP)
	PYTHON=$(PYTHON) bash examples/demo.sh

bench: $(STAMP)
	$(PYTHON) benchmarks/pretrain_vs_hf.py
	$(PYTHON) benchmarks/generate_vs_hf.py
	$(PYTHON) benchmarks/eval_bpb_vs_hf.py

clean:
	rm -rf .make runs/demo
