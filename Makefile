# Two commands do everything on a fresh machine, set-up included:
#   make demo   installs, then runs the main job (accelerate launch examples/distill_mnist.py)
#   make test   installs, then runs the test suite (what CI's .ci/run calls)
# For development: make lint (ruff check + format check), make test-fast (skips tests marked slow), make format.
.PHONY: install demo test test-fast lint format bench clean

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The shared MNIST folder beside the checkout, when there is one; otherwise the example falls back by itself.
MNIST_DIR ?= ../shared/datasets/mnist
DEMO_ARGS ?= $(if $(wildcard $(MNIST_DIR)/train-images-idx3-ubyte.gz),--data_dir $(MNIST_DIR),)

install: $(VENV)/.installed

# torch first, pinned to the CPU wheel these machines keep on disk (an unpinned torch may pull a multi-GB CUDA build);
# pyproject's range then admits it and installs nothing more. Elsewhere the pin falls through to the range.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "torch==2.13.0" || $(BIN)/python -m pip install --quiet "torch>=2.4,<2.15"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	# DeepSpeed for the ZeRO-3 test (an sdist: ~20 s, no ops compiled), time-boxed; without it that test is skipped.
	DS_BUILD_OPS=0 timeout 300 $(BIN)/python -m pip install --quiet -e ".[deepspeed]" \
		|| echo "deepspeed was not installed: tests/test_sharded_teacher.py will skip its DeepSpeed test"
	touch $@

demo: install
	$(BIN)/accelerate launch examples/distill_mnist.py $(DEMO_ARGS) $(ARGS)

test: install
	$(BIN)/python -m pytest -q $(ARGS)

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow" $(ARGS)

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

bench: install
	$(BIN)/python -m pip install --quiet -e ".[bench]"
	$(BIN)/python benchmarks/bench_teacher_overhead.py
	$(BIN)/python benchmarks/bench_kd_memory.py --repeats 2
	$(BIN)/python benchmarks/bench_vs_trl.py
	$(BIN)/python benchmarks/bench_on_policy.py
	$(BIN)/python benchmarks/bench_cache_scale.py

clean:
	rm -rf $(VENV) outputs tmp_trainer
