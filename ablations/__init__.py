"""What is varied: the model family, the choice lists, run specs and their ids, grid files (loading, checking,
expanding) and the claims they declare.

The public surface, importable from here (loaded on first use): ModelSpec, build_model, train_flops_per_image
(ablations.models), RunSpec (ablations.spec), Grid, load_grid, expand, parse_overrides, defined_run_ids
(ablations.grid), Claim (ablations.claims), UserError (ablations.errors).
"""
from __future__ import annotations

import importlib

_PUBLIC = {"ModelSpec": "ablations.models", "build_model": "ablations.models",
           "train_flops_per_image": "ablations.models", "RunSpec": "ablations.spec", "Grid": "ablations.grid",
           "load_grid": "ablations.grid", "expand": "ablations.grid", "parse_overrides": "ablations.grid",
           "defined_run_ids": "ablations.grid", "Claim": "ablations.claims", "UserError": "ablations.errors"}
__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'ablations' has no attribute {name!r}")
