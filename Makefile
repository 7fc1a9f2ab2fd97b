# The two commands of the README: `make notebooks` and `make test`. Both set up .venv first (once).
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE ?= 1

.PHONY: setup test notebooks lab clean

$(VENV)/.installed: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "$(TORCH)" -r requirements.txt
	touch $@

setup: $(VENV)/.installed

# every unit test, then every notebook executed top to bottom by nbval (result checks live inside the notebooks)
test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider tests/ --nbval-lax --nbval-current-env notebooks/

# run every notebook on the bundled model; executed copies go to build/notebooks (open the .html files)
notebooks: setup
	mkdir -p build/notebooks
	$(BIN)/jupyter nbconvert --to notebook --execute --ExecutePreprocessor.timeout=1200 \
		--output-dir build/notebooks notebooks/*.ipynb
	$(BIN)/jupyter nbconvert --to html build/notebooks/*.ipynb
	@echo "Executed notebooks: build/notebooks/*.html"

lab: setup
	$(BIN)/jupyter lab notebooks/

clean:
	rm -rf build .cache/downloads
