"""What a setting may be: the keys a grid or an override may set, their types, choices and ranges, and the
checks that turn a bad value into one line naming where it came from (the grid file and key, or the option)."""
from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from typing import Any

from ablations.choices import DECAY_ON, DROPOUT_AT
from ablations.errors import UserError
from ablations.models import ACTIVATIONS, ARCHS, INITS, POOLINGS, TOWERS, ModelSpec
from ablations.spec import AUGMENT, DATASETS, PRECISIONS, PREPROCESS, SCHEDULES, RunSpec

MODEL_FIELDS = {f.name: f for f in dataclasses.fields(ModelSpec) if f.name != "num_classes"}
RUN_FIELDS = {f.name: f for f in dataclasses.fields(RunSpec) if f.name not in ("model", "grid", "axes")}
# every key a grid may set: run fields, model fields, and lr_scale (multiplies lr: a sweep around a base rate)


def _type_name(t: Any) -> str:
    return t if isinstance(t, str) else getattr(t, "__name__", str(t))


FIELDS: dict[str, str] = {k: _type_name(f.type) for k, f in {**RUN_FIELDS, **MODEL_FIELDS}.items()}
FIELDS["lr_scale"] = "float"

CHOICES: dict[str, tuple] = {
    "arch": tuple(ARCHS),
    "activation": tuple(ACTIVATIONS),
    "pooling": tuple(POOLINGS),
    "dropout_at": DROPOUT_AT,
    "decay_on": DECAY_ON,
    "init": INITS,
    "towers": TOWERS,
    "dataset": tuple(DATASETS),
    "preprocess": PREPROCESS,
    "augment": AUGMENT,
    "test_crops": (1, 10),
    "schedule": SCHEDULES,
    "precision": PRECISIONS,
    "early_stop_metric": ("", "train_error", "train_loss", "val_error"),  # never test_error: test decides nothing
}
# (lowest allowed, whether the bound itself is allowed)
BOUNDS: dict[str, tuple[float, bool]] = {
    "epochs": (1, True), "batch_size": (1, True), "lr": (0, False), "lr_scale": (0, False),
    "momentum": (0, True), "weight_decay": (0, True), "width": (0, False), "devices": (1, True),
    "dropout": (0, True), "subset": (0, True), "test_subset": (0, True), "val_size": (0, True),
    "step_epochs": (1, True),
    "plateau_patience": (0, True), "max_lr_drops": (0, True), "early_stop_below": (0, True),
    "loss_target": (0, True), "seed": (0, True),
}
# upper bounds: the paper's regimes fit far inside them; beyond them a value is a typo, not an experiment
UPPER: dict[str, float] = {"dropout": 0.99, "momentum": 0.999, "epochs": 10_000, "batch_size": 65_536,
                           "subset": 10_000_000, "test_subset": 10_000_000, "val_size": 1_000_000, "devices": 1024,
                           "lr": 1e6, "lr_scale": 1e6, "weight_decay": 1.0, "step_epochs": 10_000,
                           "plateau_patience": 10_000, "max_lr_drops": 100, "early_stop_below": 1e6,
                           "loss_target": 1e6, "seed": 2 ** 31 - 1}
MAX_SEEDS = 1000


def check_seeds(seeds: Any, where: str) -> None:
    if (not isinstance(seeds, list) or not seeds
            or any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in seeds)
            or len(set(seeds)) != len(seeds)):
        raise UserError(f"{where}: expected a non-empty list of distinct non-negative integers, got {seeds!r}")
    if len(seeds) > MAX_SEEDS or max(seeds) > UPPER["seed"]:
        raise UserError(f"{where}: at most {MAX_SEEDS} seeds, each below 2^31, got {len(seeds)} up to {max(seeds)}")


def check_axis(key: str, values: Any, where: str, label: bool = False, distinct: bool = True) -> None:
    if not label and key not in FIELDS:
        raise UserError(f"{where}: unknown axis {key!r}; axes can be: {', '.join(sorted(FIELDS))}")
    if not isinstance(values, list) or not values:
        raise UserError(f"{where}: expected a non-empty list of values, got {values!r}")
    if distinct and len({repr(v) for v in values}) != len(values):
        raise UserError(f"{where}: values repeat in {values!r}; list each value once")
    if not label:
        for v in values:
            check_value(key, v, where)


def check_value(key: str, value: Any, where: str) -> Any:
    """Type, choice and range check for one setting; returns the value (ints widened to float where needed)."""
    if key not in FIELDS:
        raise UserError(f"{where}: unknown setting {key!r}; valid settings: {', '.join(sorted(FIELDS))}")
    kind = FIELDS[key]
    ok = {
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "str": isinstance(value, str),
    }.get(kind, True)
    if not ok:
        raise UserError(f"{where}: expected {kind} for {key!r}, got {value!r} ({type(value).__name__})")
    if kind in ("int", "float") and not math.isfinite(value):  # nan passes every `value < bound` test
        raise UserError(f"{where}: {key} must be a finite number, got {value!r}")
    if key in CHOICES and value not in CHOICES[key]:
        raise UserError(f"{where}: {value!r} is not a valid {key}; expected one of "
                        f"{', '.join(repr(c) for c in CHOICES[key])}")
    if key in BOUNDS:
        low, inclusive = BOUNDS[key]
        if value < low or (value == low and not inclusive):
            rel = ">=" if inclusive else ">"
            raise UserError(f"{where}: {key} must be {rel} {low:g}, got {value!r}")
    if key in UPPER and value > UPPER[key]:
        raise UserError(f"{where}: {key} must be <= {UPPER[key]:g}, got {value!r}")
    return float(value) if kind == "float" else value


AXIS_PREFIX = "axes."  # an override `axes.NAME=[...]` replaces the values of a Cartesian axis


def parse_overrides(items: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """`key=value` words from the command line (Hydra's spelling), values in TOML syntax: lr=0.02,
    augment=none or augment="none", axes.lrn=[true], axes.lr_scale=[0.5, 1.0]. Checked like the grid file."""
    out: dict[str, Any] = {}
    for item in items:
        key, eq, text = item.partition("=")
        key = key.strip()
        if not eq or not key:
            raise UserError(f"override {item!r} is not key=value (e.g. lr=0.02 or axes.lrn=[true])")
        try:
            value = tomllib.loads(f"v = {text.strip()}")["v"]
        except tomllib.TOMLDecodeError:
            if not re.fullmatch(r"[A-Za-z_][\w.-]*", text.strip()):
                raise UserError(f"override {item!r}: {text!r} is not a TOML value (a number, true/false, a word, "
                                f"\"a string\" or a [list])") from None
            value = text.strip()  # a bare word: relu, crop_flip
        if key.startswith(AXIS_PREFIX):
            name = key[len(AXIS_PREFIX):]
            check_axis(name, value, f"override {item}")
        else:
            value = check_value(key, value, f"override {item}")
        if key in out:
            raise UserError(f"override {key!r} is given twice; give each key once")
        out[key] = value
    return out
