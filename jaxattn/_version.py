"""The package version: the single source (pyproject.toml reads it through scikit-build-core)."""

__version__ = "0.1.0"
