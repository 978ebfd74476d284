# The two set-up commands of README.md. Both work on a fresh machine: they install what they need.
VENV ?= .venv
export HF_HUB_OFFLINE ?= 1
export TRANSFORMERS_OFFLINE ?= 1

.PHONY: test test-e2e bootstrap demo

bootstrap:
	VENV=$(VENV) bash scripts/bootstrap.sh

# The whole test suite (unit, real broker, real PostgreSQL where available, real models, e2e).
# Test files run in parallel (pytest-xdist, one worker per core, a file's tests stay together): many
# of them wait on brokers, subprocesses and deadlines, so the other core keeps working meanwhile.
PYTEST_WORKERS ?= auto
test: bootstrap
	$(VENV)/bin/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile $(PYTEST_ARGS)

# Only the end-to-end system tests.
test-e2e: bootstrap
	$(VENV)/bin/python -m pytest -q -m e2e $(PYTEST_ARGS)

# The whole story on loopback in a few minutes: export SmolLM2 -> broker -> controller -> 5 agents
# -> waves, a question, a canary, a broken version rolled back on its own (edgeship/demo.py).
demo: bootstrap
	$(VENV)/bin/python -m edgeship.demo $(DEMO_ARGS)
