# The few commands people type. Run inside the virtual environment (see README).
.PHONY: install demo ui test lint format

install:
	pip install torch==2.13.0 && pip install -e ".[test]"

demo:
	python demo.py model=tiny_contentv backend=cpu

ui:
	python demo.py mode=ui model=tiny_contentv backend=cpu

test:
	python -m pytest

lint:
	ruff check . && ruff format --check .

format:
	ruff format . && ruff check --fix .
