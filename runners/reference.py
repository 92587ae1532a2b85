"""The seed chapter's CIFAR-10 AlexNet and data path, kept as written there, as the speed reference for `ablate bench`.

The model class and the transform are the seed chapter's code (shared/seed/alexnet-chapter.md, "代码实现"),
copied verbatim for comparison; do not "fix" them. The rest adapts the chapter's loader to this machine: the
chapter downloads CIFAR-10 with torchvision, which cannot reach its servers here, so the cached data set is
written once into torchvision's `cifar-10-batches-py/` pickle format and read from there by the same
torchvision dataset class, PIL transforms and DataLoader settings (batch 128, shuffle, 4 workers).
"""
from __future__ import annotations

import io
import pickle
import struct
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torchvision
from torchvision import transforms as transforms

from runners.data import DATASETS, CifarData

# ---------------------------------------------------------------------------------------------------------------
# Seed chapter code, kept as written for comparison (only `import torch.nn as nn` above is added; the chapter
# uses nn without showing the import).

transform = transforms.Compose(
    [transforms.RandomHorizontalFlip(), 
     transforms.ToTensor(), 
     transforms.Normalize((0.5, 0.5, 0.5), 
                          (0.5, 0.5, 0.5))])


class AlexNet(nn.Module):

    def __init__(self, num_classes=10):
        super(AlexNet, self).__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2),
            nn.Conv2d(64, 192, kernel_size=3, padding=2),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=2),
            nn.Conv2d(192, 384, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(384, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(kernel_size=3, stride=2)
        )
        self.fc_layers = nn.Sequential(
            nn.Dropout(0.6),
            nn.Linear(4096, 2048),
            nn.ReLU(inplace=True),
            nn.Dropout(0.6),
            nn.Linear(2048, 2048),
            nn.ReLU(inplace=True),
            nn.Linear(2048, num_classes),
        )

    def forward(self, x):
        conv_features = self.features(x)
        flatten = conv_features.view(conv_features.size(0), -1)
        fc = self.fc_layers(flatten)
        return fc

# End of the seed chapter's code.
# ---------------------------------------------------------------------------------------------------------------


class ExportedCIFAR10(torchvision.datasets.CIFAR10):
    """torchvision's CIFAR10, reading a folder written by `export_cifar10`.

    The only change: no md5 checks (of the batches and of batches.meta). torchvision compares each pickle with
    the md5 of the official download, and a re-export of the cached arrays (here the JPEG q75 copy) can never
    match those bytes, although the format, the loading code and every per-image transform are torchvision's."""

    meta = {**torchvision.datasets.CIFAR10.meta, "md5": None}  # md5 None: check_integrity only checks it exists

    def _check_integrity(self) -> bool:
        return True


class Py2Pickler(pickle._Pickler):
    """Pickles as Python 2's cPickle wrote the official files: protocol 2, every str and bytes a BINSTRING (so keys
    load as str under torchvision's encoding="latin1" and as bytes under encoding="bytes"), numpy arrays rebuilt
    by numpy.core.multiarray._reconstruct."""

    dispatch = pickle._Pickler.dispatch.copy()
    _reconstruct = np.ndarray.__reduce__(np.empty(0))[0]

    def save_binstring(self, obj: str | bytes) -> None:
        raw = obj.encode("latin-1") if isinstance(obj, str) else obj
        head = pickle.SHORT_BINSTRING + bytes([len(raw)]) if len(raw) < 256 else \
            pickle.BINSTRING + struct.pack("<i", len(raw))
        self.write(head + raw)
        self.memoize(obj)

    dispatch[str] = save_binstring
    dispatch[bytes] = save_binstring

    def save_global(self, obj, name=None) -> None:
        if obj is self._reconstruct:  # the name the official (numpy 1.x era) files use
            self.write(pickle.GLOBAL + b"numpy.core.multiarray\n_reconstruct\n")
            self.memoize(obj)
        else:
            super().save_global(obj, name)


def py2_pickle(obj) -> bytes:
    """`obj` pickled as the official CIFAR files are (Py2Pickler); the test fixtures write with it too."""
    buf = io.BytesIO()
    Py2Pickler(buf, protocol=2).dump(obj)
    return buf.getvalue()


def export_cifar10(data: CifarData, root: Path) -> Path:
    """Write `data` as `root/cifar-10-batches-py/` in the official python-version format: the training set in
    five batches (10,000 images each for the real set), the test batch and `batches.meta`. Returns root."""
    info = DATASETS["cifar10"]
    folder = Path(root) / info.folder
    folder.mkdir(parents=True, exist_ok=True)

    def dump(name: str, obj: dict) -> None:
        with open(folder / name, "wb") as f:
            f.write(py2_pickle(obj))

    def batch(x: torch.Tensor, y: torch.Tensor, label: str) -> dict:
        rows = x.reshape(len(x), -1).numpy()  # (n, 3072) R, G, B planes of 32x32, row-major, as the official rows
        return {"batch_label": label, "labels": y.tolist(), "data": np.ascontiguousarray(rows),
                "filenames": [f"{i:05d}.png" for i in range(len(y))]}

    chunks = zip(data.train_x.tensor_split(5), data.train_y.tensor_split(5))  # torchvision reads exactly five
    for i, (x, y) in enumerate(chunks, start=1):
        dump(f"data_batch_{i}", batch(x, y, f"training batch {i} of 5"))
    dump("test_batch", batch(data.test_x, data.test_y, "testing batch 1 of 1"))
    dump(info.meta_file, {"label_names": list(data.classes), "num_cases_per_batch": -(-len(data.train_y) // 5),
                          "num_vis": 3072})
    return Path(root)


def reference_loader(root: Path, batch_size: int = 128, num_workers: int = 4) -> torch.utils.data.DataLoader:
    """The chapter's `cifar10_loader(train=True)`, pointed at an exported root instead of a download."""
    dataset = ExportedCIFAR10(root=str(root), train=True, download=False, transform=transform)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, num_workers=num_workers)
