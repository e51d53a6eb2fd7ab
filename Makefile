# The two commands a new user needs (see README.md):
#   make serve   - set up, build the default model if missing, then serve it on :8000
#   make test    - set up, then run the test suite (what CI runs)
VENV ?= .venv
PY := $(VENV)/bin/python
MODEL ?= artifacts/model.onnx
RECIPE ?= quick

.PHONY: setup serve model test lint bench clean grpc-code
setup:
	@bash scripts/setup.sh

$(MODEL):
	$(MAKE) setup
	$(PY) -m model build --recipe $(RECIPE) --out $(dir $(MODEL))

model: $(MODEL)

serve: setup $(MODEL)
	SEPCONV_MODEL_PATH=$(MODEL) $(PY) -m service

test: setup
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

# The gRPC modules generated from service/protocols/oip_grpc/inference.proto (committed).
grpc-code: setup
	$(PY) -m service.protocols.oip_grpc.generate

clean:
	rm -rf artifacts .pytest_cache .ruff_cache
