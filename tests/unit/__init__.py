"""Unit tests: one module each, tiny generated data, the formulas checked against their definitions."""
