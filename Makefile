# The two set-up commands of README.md. Both work on a fresh machine: they install what they need.
VENV ?= .venv
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

.PHONY: test test-e2e bootstrap

bootstrap:
	VENV=$(VENV) bash scripts/bootstrap.sh

# The whole test suite (unit, real broker, real PostgreSQL where available, real models, e2e).
test: bootstrap
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

# Only the end-to-end system tests.
test-e2e: bootstrap
	$(VENV)/bin/python -m pytest -q -m e2e $(PYTEST_ARGS)
