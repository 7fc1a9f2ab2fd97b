# The README's commands. Each sets up .venv first (once). See notebooks/TEACHING.md for classrooms.
#   make notebooks | make test | make lab | make doctor | make wheelhouse | make setup WHEELHOUSE=dir
PYTHON ?= python3
TORCH ?= torch==2.13.0
# Where torch comes from; empty: the default index (on an ordinary Linux laptop that is torch's large CUDA build).
# For the CPU build: make setup TORCH_INDEX=<PyTorch's CPU wheel index, as on PyTorch's install page>
TORCH_INDEX ?=
# A folder made by `make wheelhouse`: `make setup WHEELHOUSE=dir` then installs from it alone, with no network.
WHEELHOUSE ?=
REQS ?= requirements.txt
VENV ?= .venv
BIN := $(VENV)/bin
NOTEBOOKS ?= $(sort $(wildcard notebooks/*.ipynb))
NB_OUT ?= build/notebooks
CELL_TIMEOUT ?= 1200
export HF_HUB_OFFLINE ?= 1
# Threads, set here for every target: a waiting OpenMP thread sleeps instead of spinning. With torch's default
# (spinning) threads, one other busy job on the CPU slows each UNet call many times over
# (python bench/threads_under_load.py). Where several notebooks share a machine, also pass OMP_NUM_THREADS=n,
# e.g. `make lab OMP_NUM_THREADS=1`.
export OMP_WAIT_POLICY ?= PASSIVE
# The test and notebook runs also use one thread per process: measured on 2 cores, sleeping threads make the toy
# UNet's tiny calls 2-3x slower with two threads than with one (the notebooks on the SD-1.5 twin: minutes each).
test notebooks: export OMP_NUM_THREADS ?= 1

# `make lab` as root (a container, many lab images): Jupyter refuses to start without --allow-root.
# In a container there is no browser and the host reaches the server through a published port.
IS_ROOT := $(filter 0,$(shell id -u 2>/dev/null))
IN_CONTAINER := $(or $(wildcard /.dockerenv),$(wildcard /run/.containerenv),$(KUBERNETES_SERVICE_HOST))
LAB_FLAGS ?= $(if $(IS_ROOT),--allow-root) $(if $(IN_CONTAINER),--ip=0.0.0.0 --no-browser)
# more options for jupyter lab, e.g. make lab LAB_ARGS=--port=9999
LAB_ARGS ?=
PIP_FROM := $(if $(WHEELHOUSE),--no-index --find-links "$(WHEELHOUSE)")

.PHONY: setup test notebooks lab doctor wheelhouse clean

$(VENV)/.installed: $(REQS)
	$(PYTHON) -m venv $(VENV)
ifeq ($(WHEELHOUSE),)
	$(BIN)/python -m pip install -q --upgrade pip
	$(if $(TORCH_INDEX),$(BIN)/python -m pip install -q "$(TORCH)" --index-url "$(TORCH_INDEX)")
endif
	$(BIN)/python -m pip install -q $(PIP_FROM) "$(TORCH)" -r $(REQS)
	touch $@

setup: $(VENV)/.installed

# every unit test, then every notebook executed top to bottom by nbval (result checks live inside the notebooks);
# the progress plugin names each notebook as it starts and its time when it ends
test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider -p tests.progress_plugin tests/ \
		--nbval-lax --nbval-current-env notebooks/

# run every notebook on the bundled model; executed copies go to build/notebooks (open the .html files).
# A failing notebook does not stop the others; the failures are named at the end (and the exit code is 1).
notebooks: setup
	@mkdir -p $(NB_OUT); failed=""; \
	for nb in $(NOTEBOOKS); do \
		name=$$(basename "$$nb" .ipynb); echo "== $$nb"; start=$$(date +%s); \
		if $(BIN)/jupyter nbconvert --to notebook --execute --ExecutePreprocessor.timeout=$(CELL_TIMEOUT) \
				--output-dir $(NB_OUT) "$$nb" \
			&& $(BIN)/jupyter nbconvert --to html "$(NB_OUT)/$$name.ipynb"; then \
			echo "   done in $$(( $$(date +%s) - start )) s: $(NB_OUT)/$$name.html"; \
		else failed="$$failed $$nb"; echo "   FAILED: $$nb"; fi; \
	done; \
	if [ -n "$$failed" ]; then echo "Notebooks that failed:$$failed (the others: $(NB_OUT)/*.html)"; exit 1; fi; \
	echo "Executed notebooks: $(NB_OUT)/*.html"

lab: setup
	@if [ -n "$(IS_ROOT)" ]; then echo "Running as root (a container or a lab image?): with --allow-root"; fi
	@if [ -n "$(IN_CONTAINER)" ]; then echo "In a container: no browser opens here. Open the URL printed below \
	(with its token) from the host, after publishing the port (e.g. docker run -p 8888:8888 ...)"; fi
	$(BIN)/jupyter lab $(LAB_FLAGS) $(LAB_ARGS) notebooks/

# is this machine ready? (versions, bundled model, CPU/GPU, widgets, threads, predicted run times)
doctor: setup
	TORCH="$(TORCH)" $(BIN)/python -m helpers.doctor

# everything `make setup` installs, as files, for machines without internet: copy the folder, then
# `make setup WHEELHOUSE=wheelhouse`. Make it on the same OS, CPU type and Python version as the room's machines.
wheelhouse: WHEELHOUSE := $(or $(WHEELHOUSE),wheelhouse)
wheelhouse:
	mkdir -p "$(WHEELHOUSE)"
	$(if $(TORCH_INDEX),$(PYTHON) -m pip download -q -d "$(WHEELHOUSE)" "$(TORCH)" --index-url "$(TORCH_INDEX)")
	$(PYTHON) -m pip download -q -d "$(WHEELHOUSE)" --find-links "$(WHEELHOUSE)" "$(TORCH)" -r $(REQS)
	@echo "Wheelhouse: $(WHEELHOUSE) ($$(ls "$(WHEELHOUSE)" | wc -l) files). On each machine: make setup WHEELHOUSE=$(WHEELHOUSE)"

clean:
	rm -rf build .cache/downloads
