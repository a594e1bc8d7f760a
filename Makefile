# The two commands a newcomer needs:  make demo   (the main job)   and   make test
VENV ?= .venv
PY := $(VENV)/bin/python
export OMP_NUM_THREADS ?= 2
# the demo's corpus: the shared Tatoeba copy when it is there (otherwise b2t-demo downloads it)
SHARED_ZIP := $(abspath ../shared/data/tatoeba-deu-eng-2018-05-13/deu-eng.zip)
ifneq ($(wildcard $(SHARED_ZIP)),)
export B2T_TATOEBA_ZIP ?= $(SHARED_ZIP)
endif

.PHONY: setup demo test
setup: $(VENV)/.installed
$(VENV)/.installed: setup.py requirements.txt requirements-test.txt scripts/setup-env.sh
	bash scripts/setup-env.sh $(VENV)
	touch $@

demo: setup
	$(VENV)/bin/b2t-demo $(DEMO_ARGS)

test: setup
	$(PY) -m pytest -ra --durations=25 tests $(PYTEST_ARGS)
