"""Data sets: import a CIFAR source once into a cache of uint8 arrays; training reads only the cache.

Sources, detected from what they contain: the official python-version archives (`cifar-10-python.tar.gz`,
`cifar-100-python.tar.gz`) or their unpacked folders, a torchvision root folder (or "download" on a connected
machine), and image-folder trees or archives (`[top/]train/<class>/*.png|jpg`, `test/<class>/...`).

Archives are read member by member in memory and never extracted; a member that is a link or whose path leaves
the archive is refused. The official files are pickles, so they are read by an unpickler that can rebuild numpy
arrays and nothing else. The cache is `<data_dir>/<name>/{train,test}_{x,y}.npy` (+ `*_coarse.npy` for
CIFAR-100) and `meta.json`, written atomically and loaded with `allow_pickle=False`.
"""
from __future__ import annotations

import bz2
import errno
import gzip
import hashlib
import io
import json
import lzma
import os
import pickle
import re
import shutil
import stat
import tarfile
import tempfile
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import BinaryIO

import numpy as np
import torch
import torch.nn.functional as F

from ablations.errors import UserError

CACHE_FORMAT = 1
ARRAY_KEYS = ("train_x", "train_y", "test_x", "test_y", "train_coarse", "test_coarse")  # file names, hash order


# ----------------------------------------------------------------------------------------------------------------
# The data sets: official names, label order and file layout

@dataclass(frozen=True)
class DatasetInfo:
    pretty: str                       # how results and reports name the official set
    classes: tuple[str, ...]          # official class names; label = index
    coarse_classes: tuple[str, ...]   # CIFAR-100's 20 superclasses (empty for CIFAR-10)
    folder: str                       # the folder inside the official archive
    train_files: tuple[str, ...]      # official pickles, in label-file order
    test_files: tuple[str, ...]
    meta_file: str
    names_key: str                    # key of the class names in the meta pickle
    labels_key: str                   # key of the labels in a batch pickle
    torchvision: str                  # torchvision.datasets class (its URL and md5 for "download")
    example_source: str               # shown when the cache is missing

    @property
    def num_classes(self) -> int:
        return len(self.classes)


_CIFAR100_CLASSES = tuple("""
apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can castle
caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin elephant
flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster man maple_tree
motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck pine_tree plain plate
poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail snake spider
squirrel streetcar sunflower sweet_pepper table tank telephone television tiger tractor train trout tulip turtle
wardrobe whale willow_tree wolf woman worm""".split())

_CIFAR100_COARSE = tuple("""
aquatic_mammals fish flowers food_containers fruit_and_vegetables household_electrical_devices household_furniture
insects large_carnivores large_man-made_outdoor_things large_natural_outdoor_scenes large_omnivores_and_herbivores
medium_mammals non-insect_invertebrates people reptiles small_mammals trees vehicles_1 vehicles_2""".split())

DATASETS: dict[str, DatasetInfo] = {
    "cifar10": DatasetInfo(
        pretty="CIFAR-10",
        classes=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
        coarse_classes=(), folder="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{i}" for i in range(1, 6)), test_files=("test_batch",),
        meta_file="batches.meta", names_key="label_names", labels_key="labels", torchvision="CIFAR10",
        example_source="../shared/data/cifar10-jpeg-q75.tar.xz"),
    "cifar100": DatasetInfo(
        pretty="CIFAR-100", classes=_CIFAR100_CLASSES, coarse_classes=_CIFAR100_COARSE, folder="cifar-100-python",
        train_files=("train",), test_files=("test",), meta_file="meta", names_key="fine_label_names",
        labels_key="fine_labels", torchvision="CIFAR100", example_source="cifar-100-python.tar.gz"),
}


def _info(name: str) -> DatasetInfo:
    if name not in DATASETS:
        raise UserError(f"unknown data set {name!r}: choose one of {', '.join(DATASETS)}")
    return DATASETS[name]


# ----------------------------------------------------------------------------------------------------------------
# What training gets

@dataclass(frozen=True, eq=False)  # eq=False: a tensor has no single truth value to compare with
class CifarData:
    name: str                  # "cifar10" | "cifar100"
    train_x: torch.Tensor      # (N, 3, 32, 32) uint8
    train_y: torch.Tensor      # (N,) int64
    test_x: torch.Tensor       # (M, 3, 32, 32) uint8
    test_y: torch.Tensor       # (M,) int64
    classes: tuple[str, ...]
    meta: dict                 # meta.json: label, source, sha256, counts, ...
    train_coarse: torch.Tensor | None = None  # (N,) int64, CIFAR-100 superclasses
    test_coarse: torch.Tensor | None = None

    def __post_init__(self):
        for x, y in ((self.train_x, self.train_y), (self.test_x, self.test_y)):
            if x.dtype != torch.uint8 or x.shape[1:] != (3, 32, 32) or y.dtype != torch.int64 or y.shape != x.shape[:1]:
                raise ValueError(f"CifarData wants (N, 3, 32, 32) uint8 images and (N,) int64 labels, "
                                 f"got {tuple(x.shape)} {x.dtype} and {tuple(y.shape)} {y.dtype}")

    @property
    def num_classes(self) -> int:
        return len(self.classes)


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
# Reading a source: every source becomes a stream of (path inside the source, read the bytes) entries

Entry = tuple[str, Callable[[], bytes]]


def _check_member(name: str, where: str, is_link: bool, is_special: bool) -> None:
    """Nothing is extracted, but an archive that tries these is not a CIFAR copy: refuse it outright."""
    parts = re.split(r"[/\\]", name)
    if name.startswith(("/", "\\")) or re.match(r"^[A-Za-z]:", name) or ".." in parts:
        raise UserError(f"archive member {name!r} in {where} escapes the target folder; refusing the archive")
    if is_link:
        raise UserError(f"archive member {name!r} in {where} is a link; refusing the archive")
    if is_special:
        raise UserError(f"archive member {name!r} in {where} is a device or special file; refusing the archive")


def _dir_entries(root: Path) -> Iterator[Entry]:
    """Files up to 4 levels deep (`top/train/<class>/img.png` is the deepest layout), in sorted order."""
    for dirpath, dirnames, filenames in os.walk(root):
        rel = Path(dirpath).relative_to(root)
        dirnames[:] = sorted(dirnames) if len(rel.parts) < 3 else []
        for name in sorted(filenames):
            yield (rel / name).as_posix(), Path(dirpath, name).read_bytes


MAX_MEMBER_BYTES = 512 << 20  # the largest official member (CIFAR-100's train pickle) is ~150 MB


def _check_size(name: str, size: int, where: str) -> None:
    """A member is read into memory: one larger than any CIFAR file is refused before a byte is read."""
    if size > MAX_MEMBER_BYTES:
        raise UserError(f"archive member {name!r} in {where} is {size / 2**20:.0f} MB, more than any CIFAR file "
                        f"({MAX_MEMBER_BYTES >> 20} MB at most); refusing the archive")


def _tar_entries(tar: tarfile.TarFile, where: str) -> Iterator[Entry]:
    """Members in archive order. The tar is a forward-only stream: read an entry before taking the next."""
    for member in tar:
        _check_member(member.name, where, member.issym() or member.islnk(),
                      not (member.isfile() or member.isdir()))
        if member.isfile():
            _check_size(member.name, member.size, where)
            yield member.name, lambda m=member: tar.extractfile(m).read()


def _zip_entries(archive: zipfile.ZipFile, where: str) -> Iterator[Entry]:
    for info in archive.infolist():
        _check_member(info.filename, where, stat.S_ISLNK(info.external_attr >> 16), False)
        if not info.is_dir():
            _check_size(info.filename, info.file_size, where)
            yield info.filename, lambda i=info: archive.read(i)


_COMPRESSED = {b"\x1f\x8b": lambda f: gzip.GzipFile(fileobj=f), b"\xfd7zXZ\x00": lzma.LZMAFile, b"BZh": bz2.BZ2File}


def _tar_stream(raw: BinaryIO, where: str) -> BinaryIO:
    """The uncompressed tar stream. Decompressing here, not in tarfile's stream mode (which skips the gzip CRC),
    lets a corrupt archive be detected."""
    head = raw.read(262)
    raw.seek(0)
    for magic, opener in _COMPRESSED.items():
        if head.startswith(magic):
            return opener(raw)
    if head[257:262] == b"ustar":
        return raw
    raise UserError(f"{where} is neither a folder nor a tar/zip archive: pass an official CIFAR archive or folder, "
                    f"a torchvision root, or an image-folder tree or archive")


# ----------------------------------------------------------------------------------------------------------------
# The official python-version files

_RECONSTRUCT = np.ndarray.__reduce__(np.empty(0))[0]  # numpy's array-rebuild function, wherever it lives
PICKLE_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,   # the name in the official files (numpy 1.x)
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,  # the name numpy >= 2 writes
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class ArrayUnpickler(pickle.Unpickler):
    """The official files hold only dicts, lists, byte strings, ints and numpy arrays, so every global except the
    array-rebuild ones is refused: a pickle that asks for anything else is not a CIFAR file."""

    def find_class(self, module: str, name: str):
        try:
            return PICKLE_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(f"it asks for {module}.{name}, which a CIFAR file never does") from None


def _unpickle(data: bytes, where: str) -> dict:
    try:
        obj = ArrayUnpickler(io.BytesIO(data), encoding="bytes").load()
    except Exception as err:  # noqa: BLE001 - any failure (refused global, truncation, bad opcode) means the same
        raise UserError(f"{where} is not a valid CIFAR pickle ({err}); refusing it: re-download the official "
                        f"archive") from None
    if not isinstance(obj, dict):
        raise UserError(f"{where} is not a valid CIFAR pickle (a {type(obj).__name__}, not a dict): re-download it")
    return obj


def _field(d: dict, key: str, where: str):
    if key.encode() not in d:
        raise UserError(f"{where} has no {key!r} entry: it is not an official CIFAR file; re-download it")
    return d[key.encode()]


def _names(meta: dict, key: str, where: str) -> tuple[str, ...]:
    names = _field(meta, key, where)
    if not isinstance(names, list) or not all(isinstance(n, (bytes, str)) for n in names):
        raise UserError(f"{where}: {key!r} must be a list of names; re-download the archive")
    return tuple(n.decode() if isinstance(n, bytes) else n for n in names)


def _labels(batch: dict, key: str, n: int, num_classes: int, where: str) -> np.ndarray:
    y = np.asarray(_field(batch, key, where))
    if y.shape != (n,) or y.dtype.kind not in "iu" or (n and (y.min() < 0 or y.max() >= num_classes)):
        raise UserError(f"{where}: {key!r} must be {n} integers in [0, {num_classes}); re-download the archive")
    return y.astype(np.int64)


def _official_arrays(files: dict[str, bytes], info: DatasetInfo, where: str):
    """-> (arrays, classes, coarse_classes) from the official pickles, in the official batch order."""
    missing = [f for f in (*info.train_files, *info.test_files, info.meta_file) if f not in files]
    if missing:
        raise UserError(f"{where} lacks {', '.join(missing)} of {info.folder}/: the copy is incomplete or truncated; "
                        f"re-download it")
    at = f"{where}:{info.meta_file}"
    meta = _unpickle(files[info.meta_file], at)
    classes = _names(meta, info.names_key, at)
    coarse = _names(meta, "coarse_label_names", at) if info.coarse_classes else ()
    if len(classes) != info.num_classes:
        raise UserError(f"{where} names {len(classes)} classes but {info.pretty} has {info.num_classes}: "
                        f"import it under the right name or re-download it")
    arrays = {}
    for split, names in (("train", info.train_files), ("test", info.test_files)):
        xs, ys, cs = [], [], []
        for fname in names:
            at = f"{where}:{fname}"
            batch = _unpickle(files[fname], at)
            x = _field(batch, "data", at)
            if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
                raise UserError(f"{at}: 'data' must be an (N, 3072) uint8 array; re-download the archive")
            xs.append(x.reshape(-1, 3, 32, 32))  # rows are R, G, B planes of 32x32, row-major
            ys.append(_labels(batch, info.labels_key, len(x), info.num_classes, at))
            if coarse:
                cs.append(_labels(batch, "coarse_labels", len(x), len(coarse), at))
        arrays[f"{split}_x"], arrays[f"{split}_y"] = np.concatenate(xs), np.concatenate(ys)
        if coarse:
            arrays[f"{split}_coarse"] = np.concatenate(cs)
    return arrays, classes, coarse


# ----------------------------------------------------------------------------------------------------------------
# Image folders

_IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG"}


def _decode_image(data: bytes, where: str) -> np.ndarray:
    """-> (3, 32, 32) uint8. Import time only: training never sees PIL."""
    from PIL import Image
    try:
        with Image.open(io.BytesIO(data), formats=("PNG", "JPEG")) as img:
            if img.size != (32, 32) or img.mode != "RGB":
                raise UserError(f"{where} is a {img.width}x{img.height} {img.mode} image; CIFAR images must be "
                                f"32x32 RGB")
            return np.asarray(img).transpose(2, 0, 1)  # (H, W, C) -> (C, H, W)
    except OSError as err:  # PIL's UnidentifiedImageError and "image file is truncated"
        raise UserError(f"{where} is not a readable PNG or JPEG image ({err}): re-create or re-download the "
                        f"source") from None


def _image_arrays(images: dict[str, list], info: DatasetInfo, where: str):
    """-> (arrays, classes). Labels follow the sorted folder names, which for the official names is the official
    label order; images are sorted by (label, file name) so the arrays do not depend on archive order."""
    if not images["train"] or not images["test"]:
        missing = "train" if not images["train"] else "test"
        raise UserError(f"{where} has no {missing}/<class>/ images: both train/ and test/ are needed")
    names = {split: {c for c, _, _ in items} for split, items in images.items()}
    if names["train"] != names["test"]:
        odd = sorted(names["train"] ^ names["test"])
        raise UserError(f"train/ and test/ in {where} have different class folders ({', '.join(odd[:5])} "
                        f"in only one of them)")
    classes = tuple(sorted(names["train"]))  # == info.classes for official names: both official orders are sorted
    if len(classes) != info.num_classes:
        raise UserError(f"{where} has {len(classes)} class folders but {info.pretty} has {info.num_classes}: "
                        f"import it under the right name or point at a complete copy")
    label = {c: i for i, c in enumerate(classes)}
    arrays = {}
    for split, unsorted in images.items():
        items = sorted(unsorted, key=lambda item: (label[item[0]], item[1]))
        arrays[f"{split}_x"] = np.stack([img for _, _, img in items])  # (N, 3, 32, 32), contiguous
        arrays[f"{split}_y"] = np.array([label[c] for c, _, _ in items], dtype=np.int64)
    return arrays, classes


def _copy_label(pretty: str, formats: set[str], source_name: str) -> tuple[str, bool, int | None]:
    """-> (label, lossy, jpeg quality). A lossy copy must say so wherever its results appear:
    "CIFAR-10 (JPEG q75 copy)", the quality taken from a `q<NN>` in the source's name."""
    if "JPEG" not in formats:
        return f"{pretty} ({'/'.join(sorted(formats))} copy)", False, None
    m = re.search(r"(?<![a-z0-9])q(\d{1,3})(?![0-9])", source_name.lower())
    quality = int(m.group(1)) if m else None
    return f"{pretty} (JPEG{f' q{quality}' if quality else ''} copy)", True, quality


# ----------------------------------------------------------------------------------------------------------------
# One pass over a source

@dataclass
class _Scan:
    official: dict[str, bytes] = field(default_factory=dict)  # the requested set's official files, by name
    official_in_folder: bool = False                          # seen as <folder>/<file> (a root or an archive)
    other_official: set[str] = field(default_factory=set)     # other data sets whose official files are here
    images: dict[str, list] = field(default_factory=lambda: {"train": [], "test": []})  # [(class, file, image)]
    tops: set[str] = field(default_factory=set)               # folder(s) above train/ and test/
    formats: set[str] = field(default_factory=set)            # PNG, JPEG


def _scan(entries: Iterable[Entry], info: DatasetInfo, where: str, sep: str) -> _Scan:
    """Classify each file as an official pickle or an image of train/<class>/ or test/<class>/; ignore the rest
    (READMEs, a torchvision root's copy of the archive). Images are decoded on the fly: one sequential pass."""
    scan = _Scan()
    for path, read in entries:
        parts = [p for p in path.split("/") if p not in ("", ".")]
        if not parts:
            continue
        for name, ds in DATASETS.items():
            if parts[-1] in (*ds.train_files, *ds.test_files, ds.meta_file) and parts[:-1] in ([], [ds.folder]):
                if ds is info:
                    scan.official[parts[-1]] = read()
                    scan.official_in_folder |= len(parts) == 2
                else:
                    scan.other_official.add(name)
        suffix = os.path.splitext(parts[-1])[1].lower()
        if len(parts) in (3, 4) and parts[-3] in scan.images and suffix in _IMAGE_FORMATS \
                and not parts[-1].startswith("."):
            scan.tops.add("/".join(parts[:-3]))
            scan.formats.add(_IMAGE_FORMATS[suffix])
            scan.images[parts[-3]].append((parts[-2], parts[-1], _decode_image(read(), f"{where}{sep}{path}")))
    return scan


def _scan_archive(path: Path, info: DatasetInfo) -> _Scan:
    where = str(path)
    try:
        raw = open(path, "rb")
    except OSError as err:
        raise UserError(f"cannot read {path} ({err.strerror or err})") from None
    with raw:
        try:
            if raw.read(2) == b"PK":
                with zipfile.ZipFile(raw) as archive:
                    return _scan(_zip_entries(archive, where), info, where, ":")
            raw.seek(0)
            stream = _tar_stream(raw, where)
            with tarfile.open(fileobj=stream, mode="r|") as tar:
                scan = _scan(_tar_entries(tar, where), info, where, ":")
            while stream.read(1 << 20):  # to the end, so gzip/xz verify their checksums and lengths
                pass
            return scan
        except (tarfile.TarError, zipfile.BadZipFile, EOFError, zlib.error, lzma.LZMAError, OSError) as err:
            raise UserError(f"archive {path} is corrupt or truncated ({err or type(err).__name__}): "
                            f"re-download it") from None


@dataclass(frozen=True)
class _Imported:
    arrays: dict[str, np.ndarray]
    classes: tuple[str, ...]
    coarse_classes: tuple[str, ...]
    source: dict  # meta fields that describe the source


def _read_source(path: Path, info: DatasetInfo) -> _Imported:
    where, is_dir = str(path), path.is_dir()
    scan = _scan(_dir_entries(path), info, where, "/") if is_dir else _scan_archive(path, info)
    has_images = bool(scan.images["train"] or scan.images["test"])
    if scan.official and has_images:
        raise UserError(f"{where} holds both official {info.pretty} files and image folders: point at one of them")
    if scan.official:
        arrays, classes, coarse = _official_arrays(scan.official, info, where)
        kind = ("torchvision-root" if scan.official_in_folder else "official-folder") if is_dir else "official-archive"
        return _Imported(arrays, classes, coarse, dict(source_kind=kind, label=info.pretty, lossy=False,
                                                       jpeg_quality=None, image_format="official pickle"))
    if has_images:
        if len(scan.tops) > 1:
            raise UserError(f"{where} has train/ and test/ under several folders ({', '.join(sorted(scan.tops))}): "
                            f"point at one of them")
        arrays, classes = _image_arrays(scan.images, info, where)
        label, lossy, quality = _copy_label(info.pretty, scan.formats, path.name)
        kind = "image-folder" if is_dir else "image-folder-archive"
        return _Imported(arrays, classes, (), dict(source_kind=kind, label=label, lossy=lossy, jpeg_quality=quality,
                                                   image_format="/".join(sorted(scan.formats))))
    if scan.other_official:
        other = sorted(scan.other_official)[0]
        raise UserError(f"{where} holds {DATASETS[other].pretty}, not {info.pretty}: run "
                        f"`ablate data import {other} {where}`")
    raise UserError(f"no {info.pretty} data found in {where}: expected the official {info.folder}/ files (or a "
                    f"torchvision root holding them), or train/<class>/*.png|jpg and test/<class>/... image folders")


def _download(info: DatasetInfo, into: Path) -> tuple[Path, str]:
    """The official archive from torchvision's URL, checked against its md5. Needs network access."""
    import torchvision
    cls = getattr(torchvision.datasets, info.torchvision)
    try:
        torchvision.datasets.utils.download_url(cls.url, str(into), cls.filename, cls.tgz_md5)
    except Exception as err:  # noqa: BLE001 - URLError, timeouts, md5 mismatch: all mean "no usable download"
        raise UserError(f"could not download {info.pretty} ({str(err).strip() or type(err).__name__}): offline, "
                        f"import a local copy instead: the official {cls.filename} or its unpacked {info.folder}/, "
                        f"a torchvision root, or an image-folder tree or archive (e.g. {info.example_source})"
                        ) from None
    return into / cls.filename, cls.url


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
    info = _info(name)
    root = resolve_data_dir(data_dir)
    if str(source) == "download":
        root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".download-", dir=root) as tmp:
            archive, url = _download(info, Path(tmp))
            imported = _read_source(archive, info)
            src = {"source": url, "source_sha256": _file_sha256(archive),
                   **imported.source, "source_kind": "torchvision-download"}
    else:
        path = Path(source).expanduser()
        if not path.exists():
            raise UserError(f"source {path} does not exist: pass an official CIFAR archive or folder, a torchvision "
                            f"root, an image-folder tree or archive, or `download` (e.g. {info.example_source})")
        path = path.resolve()
        imported = _read_source(path, info)
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
    info = _info(name)
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
    info = _info(name)
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
