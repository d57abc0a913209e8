# Two commands for a new user (see README):
#   make demo   set up .venv, then make-sample -> preprocess -> train (which registers the model) -> batch-infer
#   make test   set up .venv, lint, run the test suite and the strict docs build (what CI runs)
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
DATA   := data

.PHONY: demo test lint docs install clean

$(BIN)/activate:
	$(PYTHON) -m venv $(VENV)

# Re-install when the dependency list changes.
$(VENV)/.installed: pyproject.toml | $(BIN)/activate
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/python workflow.py make-sample --out $(DATA)/sample --classes 10 --train-per-class 40 --val-per-class 10
	$(BIN)/python workflow.py preprocess --source $(DATA)/sample --out $(DATA)/sample-shards --resize 128
	$(BIN)/python workflow.py train --config configs/demo.yaml --data $(DATA)/sample-shards
	$(BIN)/python workflow.py batch-infer --model models:/alexnet@champion --input $(DATA)/sample-shards --split val --output outputs/predictions.parquet --overwrite
	@echo
	@echo "Outputs:"
	@echo "  shards + manifest    $(DATA)/sample-shards/manifest.json (rejects: quarantine.jsonl)"
	@echo "  checkpoints          checkpoints/"
	@echo "  predictions          outputs/predictions.parquet"
	@echo "  runs + registry      sqlite:///mlflow.db (artifacts in mlruns/)"
	@echo "Open the MLflow UI (runs, metrics, Model Registry) on http://127.0.0.1:5000 :"
	@echo "  $(BIN)/mlflow ui --backend-store-uri sqlite:///mlflow.db --host 127.0.0.1"

lint: install
	$(BIN)/ruff check .

# The documentation site (mkdocs.yml, docs/): --strict fails on any broken link or anchor.
docs: install
	$(BIN)/mkdocs build --strict -d $(VENV)/site

test: lint docs
	$(BIN)/python -m pytest

clean:
	rm -rf $(DATA)/sample $(DATA)/sample-shards checkpoints outputs mlruns mlflow.db
