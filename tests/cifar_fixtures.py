"""Tiny generated CIFAR data sets written in the official formats, for tests that must not need the network.

`generate` makes the arrays; `write_official` lays them out as the official python-version pickles (written the
way Python 2's cPickle wrote the real files), `write_image_folder` as `train/<class>/*.png|jpg` trees, and
`archive` packs either into a .tar.gz / .tar.xz / .tar / .zip.
"""
from __future__ import annotations

import io
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from runners.data import DATASETS
from runners.reference import py2_pickle


@dataclass(frozen=True, eq=False)
class Generated:
    name: str                       # "cifar10" | "cifar100"
    classes: tuple[str, ...]
    train_x: np.ndarray             # (N, 3, 32, 32) uint8
    train_y: np.ndarray             # (N,) int64
    test_x: np.ndarray              # (M, 3, 32, 32) uint8
    test_y: np.ndarray              # (M,) int64
    train_coarse: np.ndarray | None = None
    test_coarse: np.ndarray | None = None

    def split(self, split: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        return getattr(self, f"{split}_x"), getattr(self, f"{split}_y"), getattr(self, f"{split}_coarse")


def generate(name: str = "cifar10", n_train: int = 30, n_test: int = 20, seed: int = 0) -> Generated:
    """Blocky random images (4x4-pixel grey blocks, a colour cast, a little noise: a JPEG copy stays close), every
    class present once n >= the number of classes. CIFAR-100 coarse labels come from a fixed fine -> coarse map."""
    rng = np.random.default_rng(seed)
    info = DATASETS[name]
    fine_to_coarse = rng.permutation(np.repeat(np.arange(20), 5)) if info.coarse_classes else None

    def split(n: int):
        luma = rng.integers(40, 216, (n, 1, 8, 8))     # (n, 1, 8, 8) grey levels of 4x4-pixel blocks
        tint = rng.integers(-30, 31, (n, 3, 1, 1))      # (n, 3, 1, 1) one colour cast per image
        x = np.kron(luma + tint, np.ones((1, 1, 4, 4), dtype=np.int64)) + rng.integers(-4, 5, (n, 3, 32, 32))
        y = rng.permutation(np.arange(n) % info.num_classes).astype(np.int64)
        coarse = fine_to_coarse[y].astype(np.int64) if fine_to_coarse is not None else None
        return np.clip(x, 0, 255).astype(np.uint8), y, coarse

    (tx, ty, tc), (vx, vy, vc) = split(n_train), split(n_test)
    return Generated(name, info.classes, tx, ty, vx, vy, tc, vc)


# ----------------------------------------------------------------------------------------------------------------
# Official python-version format

def _batch(x: np.ndarray, y: np.ndarray, coarse: np.ndarray | None, label: str) -> dict:
    batch = {b"batch_label": label.encode(), b"filenames": [f"img_{i:05d}.png".encode() for i in range(len(y))],
             b"data": x.reshape(len(x), 3 * 32 * 32)}  # (N, 3072): R, G, B planes, each 32x32 row-major
    if coarse is None:
        batch[b"labels"] = y.tolist()
    else:
        batch[b"fine_labels"], batch[b"coarse_labels"] = y.tolist(), coarse.tolist()
    return batch


def write_official(root: Path, g: Generated, class_names: tuple[str, ...] | None = None) -> Path:
    """root/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta} or root/cifar-100-python/{train,test,
    meta}; returns that folder. `class_names` overrides the names in the meta file (to test the count check)."""
    info = DATASETS[g.name]
    folder = Path(root) / info.folder
    folder.mkdir(parents=True, exist_ok=True)
    names = [c.encode() for c in (class_names or g.classes)]
    if g.train_coarse is None:
        (folder / "batches.meta").write_bytes(py2_pickle(
            {b"num_cases_per_batch": -(-len(g.train_y) // 5), b"label_names": names, b"num_vis": 3072}))
        for i, idx in enumerate(np.array_split(np.arange(len(g.train_y)), 5), start=1):
            batch = _batch(g.train_x[idx], g.train_y[idx], None, f"training batch {i} of 5")
            (folder / f"data_batch_{i}").write_bytes(py2_pickle(batch))
        (folder / "test_batch").write_bytes(py2_pickle(_batch(g.test_x, g.test_y, None, "testing batch 1 of 1")))
    else:
        (folder / "meta").write_bytes(py2_pickle({b"fine_label_names": names, b"coarse_label_names":
                                                  [c.encode() for c in info.coarse_classes]}))
        for split in ("train", "test"):
            (folder / split).write_bytes(py2_pickle(_batch(*g.split(split), f"{split}ing batch 1 of 1")))
    return folder


# ----------------------------------------------------------------------------------------------------------------
# Image folders and archives

def write_image_folder(root: Path, g: Generated, ext: str = "png", class_names: tuple[str, ...] | None = None) -> Path:
    """root/{train,test}/<class>/<index>.<ext> (JPEG at quality 75, like the shared copy); returns root. The
    importer sorts by (label, file name), i.e. np.argsort(y, kind="stable") of the generated order."""
    names = class_names or g.classes
    for split in ("train", "test"):
        x, y, _ = g.split(split)
        for i in range(len(y)):
            path = Path(root) / split / names[y[i]] / f"{i:04d}.{ext}"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(x[i].transpose(1, 2, 0)).save(path, **({"quality": 75} if ext == "jpg" else {}))
    return Path(root)


def archive(folder: Path, out: Path, arcname: str | None = None, shuffle_seed: int | None = None) -> Path:
    """Pack `folder` (as `arcname`, default its name; "" packs its contents at the top) by out's suffix; with
    `shuffle_seed` the tar holds its files in a random order (as real archives may)."""
    out = Path(out)
    arcname = folder.name if arcname is None else arcname
    if out.suffix == ".zip":
        with zipfile.ZipFile(out, "w") as z:
            for path in sorted(folder.rglob("*")):
                if path.is_file():
                    z.write(path, str(Path(arcname) / path.relative_to(folder)))
        return out
    mode = {".gz": "w:gz", ".tgz": "w:gz", ".xz": "w:xz", ".tar": "w"}[out.suffix]
    with tarfile.open(out, mode) as tar:
        if shuffle_seed is not None:
            files = sorted(p for p in folder.rglob("*") if p.is_file())
            for i in np.random.default_rng(shuffle_seed).permutation(len(files)):
                tar.add(files[i], arcname=str(Path(arcname) / files[i].relative_to(folder)))
        elif arcname:
            tar.add(folder, arcname=arcname)
        else:
            for child in sorted(folder.iterdir()):
                tar.add(child, arcname=child.name)
    return out


def expected_order(y: np.ndarray) -> np.ndarray:
    """The order an image-folder import puts the generated images in: by label, then by file (= index)."""
    return np.argsort(y, kind="stable")


def png_bytes(width: int = 32, height: int = 32, mode: str = "RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (width, height)).save(buf, format="PNG")
    return buf.getvalue()


def write_tar_with(out: Path, members: list[tarfile.TarInfo], data: dict[str, bytes]) -> Path:
    """A .tar.gz of hand-made members (links, devices, `../` names): `data` holds the regular files' bytes."""
    with tarfile.open(out, "w:gz") as tar:
        for info in members:
            payload = data.get(info.name)
            if payload is not None:
                info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload) if payload is not None else None)
    return out
