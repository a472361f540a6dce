# longspec_lab: two commands do everything on a fresh machine.
#   make demo   install into .venv and run ar / chain / tree side by side on the embedded model
#   make test   install, add the Debian packages the tests need (as root), run every test
#   make lab    open JupyterLab on notebooks/

VENV  := .venv
PY    := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: install sysdeps demo test test-fast lint lab site clean gpu-wheels

$(PY):
	python3 -m venv $(VENV)

# the pinned CPU torch first: a bare `torch` requirement would pull a multi-GB CUDA build
$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

# graphviz renders the tree diagrams; chromium runs the real-browser notebook test
sysdeps:
	@missing=""; \
	command -v dot >/dev/null 2>&1 || missing="$$missing graphviz"; \
	[ -x /usr/lib/chromium/chromium ] || missing="$$missing chromium"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = "0" ]; then \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	  else echo "warning: missing Debian packages:$$missing (run as root or install them)"; fi; \
	fi

demo: install
	$(VENV)/bin/longspec-lab demo

# lint and format check (ruff, line length 120), then every tier: unit, integration, notebooks, browser
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: install sysdeps lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

# the quick tier for your own loop: the unit tests on CPU, about four minutes on 2 cores
test-fast: install
	$(PY) -m pytest -q tests/unit $(PYTEST_ARGS)

# as root (containers), JupyterLab refuses to start without --allow-root
lab: install
	$(VENV)/bin/jupyter lab notebooks/ $$( [ "$$(id -u)" = "0" ] && echo --allow-root )

# the static HTML site of the notebooks, executed on CPU in small mode: open build/site/index.html
site: install
	$(PY) -m longspec_lab.teach.site --out build/site

clean:
	rm -rf $(VENV) build *.egg-info

# The jupyter packages that notebooks 04 and 07 need, as wheels for the GPU machine's Python, into .whl (ignored by
# git): the device run carries the folder with the tree and `run_notebooks --wheels .whl` unpacks it there, where
# nothing can be installed (docs/GPU_JOBS.md). About 30 MB for Python 3.12.
GPU_PYTHON ?= 3.12
NOTEBOOK_WHEELS := nbclient nbformat ipykernel ipywidgets plotly anywidget graphviz
gpu-wheels: install
	$(PY) -m pip download -q --only-binary=:all: --implementation cp --python-version $(GPU_PYTHON) \
	  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
	  -d .whl $(NOTEBOOK_WHEELS)
	@echo "wheels for Python $(GPU_PYTHON) in .whl: $$(ls .whl | wc -l) files, $$(du -sh .whl | cut -f1)"
