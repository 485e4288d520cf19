"""Shipped configs (YAML), installed with the package so names resolve outside the repo."""
