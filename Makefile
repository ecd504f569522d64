# Two commands a fresh machine needs: `make demo` (the main job on the embedded toy model) and
# `make test`. Both create ./.venv and install pinned dependencies; torch goes first and is then used
# as a constraint so CPU machines keep the CPU wheel (see docs/design.md environment fact E1).
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH := torch==2.13.0

.PHONY: demo test webui install clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml requirements.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	echo "$(TORCH)" > $(VENV)/constraints.txt
	$(PY) -m pip install -q -c $(VENV)/constraints.txt -r requirements.txt -e ".[dev]"
	touch $@

demo: install
	$(VENV)/bin/fluxlora train train_configs/toy_subject.yaml

webui: install
	$(VENV)/bin/fluxlora webui --runs runs

test: install
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs
