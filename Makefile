# The two commands a new user needs (see README.md):
#   make serve   - set up, build the default model if missing, then serve it on :8000
#   make test    - set up, then lint, check formatting and run the test suite (what CI runs)
# For the edit loop: make test-fast (the suite without the end-to-end runs that start a Docker
# engine or a load balancer).
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL ?= artifacts/model.onnx
RECIPE ?= quick

.PHONY: setup serve model test test-fast lint bench clean grpc-code
setup:
	@bash scripts/setup.sh

$(MODEL):
	$(MAKE) setup
	$(PY) -m model build --recipe $(RECIPE) --out $(dir $(MODEL))

model: $(MODEL)

serve: setup $(MODEL)
	SEPCONV_MODEL_PATH=$(MODEL) $(PY) -m service

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(PY) -m pytest -q

# Markers in pyproject.toml: e2e (a private Docker engine), load_balancer (HAProxy).
test-fast: lint
	$(PY) -m pytest -q -m "not e2e and not load_balancer"

# Benchmarks (bounded, loopback): make bench [WORKLOAD=sweep|overload|photos] [ARGS=--quick]
bench: setup
	$(PY) -m bench $(WORKLOAD) $(ARGS)

# The gRPC modules generated from service/protocols/oip_grpc/inference.proto (committed).
grpc-code: setup
	$(PY) -m service.protocols.oip_grpc.generate

clean:
	rm -rf artifacts .pytest_cache .ruff_cache
