"""The package version: one constant, imported by io/cli/data/reference and read by pyproject.toml."""
__version__ = "0.1.0"
