"""Packages of the distribution: bbm's own, and the presets of configs/ installed as bbm/configs (one copy of the
YAML files in the repository). The metadata lives in pyproject.toml."""
from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["bbm*"]), "bbm.configs"], package_dir={"bbm.configs": "configs"},
      package_data={"bbm.configs": ["*.yaml"]})
