"""Data sets: import a CIFAR source once into a cache of uint8 arrays; training reads only the cache.

Sources, detected from what they contain: the official python-version archives (`cifar-10-python.tar.gz`,
`cifar-100-python.tar.gz`) or their unpacked folders, a torchvision root folder (or "download" on a connected
machine), and image-folder trees or archives (`[top/]train/<class>/*.png|jpg`, `test/<class>/...`).

runners/sources.py reads them (archives in memory, never extracted; the official pickles by an unpickler that can
rebuild numpy arrays and nothing else); runners/datasets.py names the data sets. The cache is
`<data_dir>/<name>/{train,test}_{x,y}.npy` (+ `*_coarse.npy` for CIFAR-100) and `meta.json`, written atomically
and loaded with `allow_pickle=False`.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ablations.errors import UserError
from runners.datasets import DATASETS, CifarData, DatasetInfo, dataset_info
from runners.sources import download, read_source

__all__ = ["DATASETS", "CifarData", "DatasetInfo", "cached_from", "import_dataset", "list_datasets", "load_dataset",
           "make_synthetic", "resolve_data_dir"]

CACHE_FORMAT = 1
ARRAY_KEYS = ("train_x", "train_y", "test_x", "test_y", "train_coarse", "test_coarse")  # file names, hash order


def _cifar_data(name: str, arrays: dict[str, np.ndarray], meta: dict) -> CifarData:
    t = {key: torch.from_numpy(np.ascontiguousarray(a)) for key, a in arrays.items()}
    return CifarData(name, t["train_x"], t["train_y"], t["test_x"], t["test_y"], tuple(meta["classes"]), meta,
                     t.get("train_coarse"), t.get("test_coarse"))


def resolve_data_dir(data_dir: str | Path | None) -> Path:
    """--data-dir, then $ABLATE_DATA, then ~/.cache/ablate/data."""
    if data_dir:
        return Path(data_dir).expanduser()
    env = os.environ.get("ABLATE_DATA")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "ablate" / "data"


# ----------------------------------------------------------------------------------------------------------------
# The cache

def _fingerprint(arrays: dict[str, np.ndarray]) -> str:
    """sha256 over name, dtype, shape and bytes of each array in ARRAY_KEYS order: which data a run saw."""
    h = hashlib.sha256()
    for key in ARRAY_KEYS:
        if key in arrays:
            a = np.ascontiguousarray(arrays[key])
            h.update(f"{key}:{a.dtype.str}:{a.shape};".encode())
            h.update(a.data)
    return h.hexdigest()


def _build_meta(name: str, arrays: dict[str, np.ndarray], classes: tuple[str, ...],
                coarse_classes: tuple[str, ...], **source) -> dict:
    return {
        "cache_format": CACHE_FORMAT, "name": name, **source,
        "sha256": _fingerprint(arrays), "arrays": [k for k in ARRAY_KEYS if k in arrays],
        "classes": list(classes), "coarse_classes": list(coarse_classes) or None, "num_classes": len(classes),
        "counts": {s: len(arrays[f"{s}_y"]) for s in ("train", "test")},
        "class_counts": {s: np.bincount(arrays[f"{s}_y"], minlength=len(classes)).tolist() for s in ("train", "test")},
        "imported_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def _write_cache(target: Path, arrays: dict[str, np.ndarray], meta: dict) -> None:
    """Write a temp folder beside the target, then swap it in: a killed import leaves the old cache or the new."""
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    tmp = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        tmp.chmod(0o755)  # mkdtemp makes it owner-only; the cache is an ordinary, shareable folder
        for key, a in arrays.items():
            np.save(tmp / f"{key}.npy", a)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
        if target.exists():
            os.replace(target, old)
        try:
            os.replace(tmp, target)
        except OSError:
            if old.exists():
                os.replace(old, target)
            raise
    except OSError as err:
        if err.errno == errno.ENOSPC:
            need = sum(a.nbytes for a in arrays.values()) >> 20
            raise UserError(f"disk full while writing the cache in {target.parent}: free {need} MB or pass another "
                            f"--data-dir") from None
        raise UserError(f"cannot write the cache in {target.parent} ({err.strerror or err}): pass a writable "
                        f"--data-dir") from None
    finally:
        for leftover in (tmp, old):  # tmp is gone after a successful swap; old is the replaced cache
            if leftover is not None and leftover.exists():
                shutil.rmtree(leftover, ignore_errors=True)


def cached_from(name: str, source: str | Path, data_dir: Path | None = None) -> dict | None:
    """The cache's metadata when it was imported from this very archive (same path and sha256) and still loads;
    else None. A folder source is never assumed unchanged."""
    path = Path(source).expanduser()
    if str(source) == "download" or not path.is_file():
        return None
    try:
        meta = json.loads((resolve_data_dir(data_dir) / name / "meta.json").read_text())
    except (OSError, ValueError):
        return None
    if meta.get("source") != str(path.resolve()) or meta.get("source_sha256") != _file_sha256(path):
        return None
    try:
        load_dataset(name, data_dir)
    except UserError:
        return None
    return meta


def import_dataset(name: str, source: str | Path, data_dir: Path | None = None) -> dict:
    """Convert any supported source into the cache once; returns the cache's metadata."""
    info = dataset_info(name)
    root = resolve_data_dir(data_dir)
    if str(source) == "download":
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".download-", dir=root) as tmp:
            archive, url = download(info, Path(tmp))
            imported = read_source(archive, info)
            src = {"source": url, "source_sha256": _file_sha256(archive),
                   **imported.source, "source_kind": "torchvision-download"}
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise UserError(f"source {path} does not exist: pass an official CIFAR archive or folder, a torchvision "
                            f"root, an image-folder tree or archive, or `download` (e.g. {info.example_source})")
        path = path.resolve()
        imported = read_source(path, info)
        src = {"source": str(path), "source_sha256": None if path.is_dir() else _file_sha256(path), **imported.source}
    meta = _build_meta(name, imported.arrays, imported.classes, imported.coarse_classes, **src)
    _write_cache(root / name, imported.arrays, meta)
    return meta


def _file_sha256(path: Path) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def _reimport(name: str, why: str) -> UserError:
    return UserError(f"{why}: re-import it with `ablate data import {name} SOURCE`")


def load_dataset(name: str, data_dir: Path | None = None) -> CifarData:
    """Read the cache (never a source), checking the arrays against the fingerprint taken at import."""
    info = dataset_info(name)
    root = resolve_data_dir(data_dir)
    folder = root / name
    if not (folder / "meta.json").is_file():
        raise UserError(f"no cached data set '{name}' in {root}: run `ablate data import {name} SOURCE` "
                        f"(e.g. {info.example_source})")
    try:
        meta = json.loads((folder / "meta.json").read_text())
        if meta.get("cache_format") != CACHE_FORMAT:
            raise _reimport(name, f"the cache of '{name}' in {folder} has an old format")
        arrays = {key: np.load(folder / f"{key}.npy", allow_pickle=False) for key in meta["arrays"]}
        if _fingerprint(arrays) != meta.get("sha256"):
            raise _reimport(name, f"the cache of '{name}' in {folder} does not match its sha256 (changed or damaged)")
        return _cifar_data(name, arrays, meta)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise _reimport(name, f"the cache of '{name}' in {folder} is damaged ({err})") from None


def list_datasets(data_dir: Path | None = None) -> list[dict]:
    """The meta.json of every cached data set (no array checks: listing stays instant). A damaged one is listed
    as {"name": ..., "error": ...}."""
    root = resolve_data_dir(data_dir)
    if not root.is_dir():
        return []
    found = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if (folder / "meta.json").is_file():
            try:
                found.append(json.loads((folder / "meta.json").read_text()))
            except (OSError, ValueError) as err:
                found.append({"name": folder.name, "error": f"damaged meta.json ({err}): re-import it"})
    return found


# ----------------------------------------------------------------------------------------------------------------
# Synthetic stand-in

def make_synthetic(name: str, n_train: int, n_test: int, seed: int = 0) -> CifarData:
    """The real shapes and class count for tests and benchmarks. Each class is a fixed colour tint plus a fixed
    smooth pattern under per-pixel noise: a small net learns it in a few epochs, and crops and flips keep the tint.
    Labels are balanced; CIFAR-100's coarse label is fine // 5 (not the official grouping)."""
    info = dataset_info(name)
    g = torch.Generator().manual_seed(seed)
    k = info.num_classes
    tint = torch.rand(k, 3, 1, 1, generator=g) * 2 - 1                                      # (K, 3, 1, 1)
    pattern = F.interpolate(torch.rand(k, 3, 4, 4, generator=g) * 2 - 1, size=(32, 32), mode="bilinear",
                            align_corners=False)
    pattern = tint + pattern                                                                 # (K, 3, 32, 32)

    def split(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = torch.randperm(n, generator=g) % k                                               # (n,)
        x = torch.empty(n, 3, 32, 32, dtype=torch.uint8)
        for i in range(0, n, 4096):  # chunks keep the float temporaries small
            yc = y[i:i + 4096]
            noise = torch.randn(len(yc), 3, 32, 32, generator=g)
            x[i:i + 4096] = (128 + 45 * pattern[yc] + 25 * noise).round().clamp(0, 255).to(torch.uint8)
        return x.numpy(), y.numpy()

    arrays = {}
    arrays["train_x"], arrays["train_y"] = split(n_train)
    arrays["test_x"], arrays["test_y"] = split(n_test)
    if info.coarse_classes:
        arrays["train_coarse"], arrays["test_coarse"] = arrays["train_y"] // 5, arrays["test_y"] // 5
    meta = _build_meta(name, arrays, info.classes, info.coarse_classes, label=f"synthetic {info.pretty} (seed {seed})",
                       source="synthetic", source_kind="synthetic", source_sha256=None, lossy=False,
                       jpeg_quality=None, image_format="synthetic")
    return _cifar_data(name, arrays, meta)
