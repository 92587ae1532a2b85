"""Reading a data set source into arrays, safely: the official python-version archives or folders, a torchvision
root, image-folder trees or archives, or a download. Archives are read member by member in memory and never
extracted; a member that is a link or whose path leaves the archive is refused. The official files are pickles,
read by an unpickler that can rebuild numpy arrays and nothing else."""
from __future__ import annotations

import bz2
import gzip
import io
import lzma
import os
import pickle
import re
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ablations.errors import UserError

from runners.datasets import DATASETS, DatasetInfo

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


def unpickle(data: bytes, where: str) -> dict:
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
    meta = unpickle(files[info.meta_file], at)
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
            batch = unpickle(files[fname], at)
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


def copy_label(pretty: str, formats: set[str], source_name: str) -> tuple[str, bool, int | None]:
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


def read_source(path: Path, info: DatasetInfo) -> _Imported:
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
        label, lossy, quality = copy_label(info.pretty, scan.formats, path.name)
        kind = "image-folder" if is_dir else "image-folder-archive"
        return _Imported(arrays, classes, (), dict(source_kind=kind, label=label, lossy=lossy, jpeg_quality=quality,
                                                   image_format="/".join(sorted(scan.formats))))
    if scan.other_official:
        other = sorted(scan.other_official)[0]
        raise UserError(f"{where} holds {DATASETS[other].pretty}, not {info.pretty}: run "
                        f"`ablate data import {other} {where}`")
    raise UserError(f"no {info.pretty} data found in {where}: expected the official {info.folder}/ files (or a "
                    f"torchvision root holding them), or train/<class>/*.png|jpg and test/<class>/... image folders")


def download(info: DatasetInfo, into: Path) -> tuple[Path, str]:
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
