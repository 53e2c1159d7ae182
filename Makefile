# Set-up and the two everyday commands. Every target creates the virtual environment it needs.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch and torchvision are pinned to the releases this project is tested with
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
PYTEST_ARGS ?= -n 2

.PHONY: run test lint bench bench-peers clean

$(BIN)/fortify: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_SPEC)
	$(BIN)/pip install --quiet -e '.[test,dev]'
	# a second resolution: torchattacks pins requests~=2.25 and Flower needs a newer one; torchattacks
	# (only used by parity tests and benches) works with the newer requests
	$(BIN)/pip install --quiet -e '.[federated]'
	touch $@

run: $(BIN)/fortify  ## the main job: standard vs PGD-trained model on digits, with a report
	$(BIN)/fortify run $(RUN_ARGS)

test: $(BIN)/fortify  ## the whole test suite, slow tests included
	$(BIN)/pytest $(PYTEST_ARGS)

lint: $(BIN)/fortify
	$(BIN)/ruff check src tests bench

bench: $(BIN)/fortify
	$(BIN)/python bench/attack_throughput.py

bench-peers: $(BIN)/fortify  ## the peers the benches compare with besides torchattacks (optional there)
	$(BIN)/pip install --quiet adversarial-robustness-toolbox foolbox pyautoattack

clean:
	rm -rf $(VENV) runs .pytest_cache
