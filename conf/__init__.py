"""Hydra configs of the ContentV runtime (YAML), shipped as package data: python demo.py --help lists them."""
