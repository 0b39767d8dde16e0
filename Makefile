# The few commands people type. Run inside the virtual environment (see README).
.PHONY: install demo ui test lint format wheel

install:
	pip install -c constraints.txt torch==2.13.0 && pip install -c constraints.txt -e ".[test]"

demo:
	python demo.py model=tiny_contentv backend=cpu

ui:
	python demo.py mode=ui model=tiny_contentv backend=cpu

test:
	python -m pytest -n 2 --dist loadfile

lint:
	ruff check . && ruff format --check .

format:
	ruff format . && ruff check --fix .

# A wheel in dist/ (configs included); `pip install dist/contentv-*.whl` then run `contentv ...` from anywhere.
wheel:
	pip wheel --no-deps -w dist .
