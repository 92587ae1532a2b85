"""Data sources and the cache, on tiny generated data sets written in the official formats (no network)."""
from __future__ import annotations

import json
import tarfile
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ablations.errors import UserError
from runners import data as D
from runners import sources
from runners.cli import main
from tests import cifar_fixtures as fx


@pytest.fixture(scope="module")
def g10() -> fx.Generated:
    return fx.generate("cifar10", n_train=30, n_test=20, seed=0)


@pytest.fixture(scope="module")
def g100() -> fx.Generated:  # one image per class and split at least: image folders need all 100 folders
    return fx.generate("cifar100", n_train=100, n_test=100, seed=1)


def assert_same(data: D.CifarData, g: fx.Generated, order: dict[str, np.ndarray] | None = None) -> None:
    for split in ("train", "test"):
        x, y, coarse = g.split(split)
        idx = order[split] if order else np.arange(len(y))
        np.testing.assert_array_equal(getattr(data, f"{split}_x").numpy(), x[idx])
        np.testing.assert_array_equal(getattr(data, f"{split}_y").numpy(), y[idx])
        if coarse is not None:
            np.testing.assert_array_equal(getattr(data, f"{split}_coarse").numpy(), coarse[idx])
    assert data.classes == g.classes


def image_order(g: fx.Generated) -> dict[str, np.ndarray]:
    return {s: fx.expected_order(g.split(s)[1]) for s in ("train", "test")}


# ----------------------------------------------------------------------------------------------------------------
# Round trips: every source kind gives back exactly the generated arrays

@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
@pytest.mark.parametrize("layout, kind", [("archive", "official-archive"), ("folder", "official-folder"),
                                          ("root", "torchvision-root")])
def test_official_sources_round_trip(tmp_path, g10, g100, name, layout, kind):
    g = g10 if name == "cifar10" else g100
    folder = fx.write_official(tmp_path / "root", g)
    source = {"archive": lambda: fx.archive(folder, tmp_path / f"{name}-python.tar.gz"),
              "folder": lambda: folder, "root": lambda: tmp_path / "root"}[layout]()
    meta = D.import_dataset(name, source, tmp_path / "cache")
    data = D.load_dataset(name, tmp_path / "cache")
    assert_same(data, g)
    assert data.train_x.is_contiguous() and data.train_y.dtype == torch.int64
    assert meta["source_kind"] == kind and meta["label"] == D.DATASETS[name].pretty and not meta["lossy"]
    assert meta["counts"] == {"train": len(g.train_y), "test": len(g.test_y)}
    assert meta["class_counts"]["train"] == np.bincount(g.train_y, minlength=len(g.classes)).tolist()
    assert data.meta["sha256"] == meta["sha256"]
    if name == "cifar100":
        assert meta["coarse_classes"] == list(D.DATASETS["cifar100"].coarse_classes)


@pytest.mark.parametrize("layout", ["tar.xz", "tar", "shuffled-tar", "zip", "folder", "folder-with-top",
                                    "archive-contents"])
def test_png_image_folders_round_trip(tmp_path, g10, layout):
    tree = fx.write_image_folder(tmp_path / "cifar10-png", g10, "png")
    source = {"tar.xz": lambda: fx.archive(tree, tmp_path / "c.tar.xz"),
              "tar": lambda: fx.archive(tree, tmp_path / "c.tar"),
              "shuffled-tar": lambda: fx.archive(tree, tmp_path / "s.tar", shuffle_seed=0),
              "zip": lambda: fx.archive(tree, tmp_path / "c.zip"),
              "folder": lambda: tree, "folder-with-top": lambda: tmp_path,
              "archive-contents": lambda: fx.archive(tree, tmp_path / "flat.tar.gz", arcname="")}[layout]()
    meta = D.import_dataset("cifar10", source, tmp_path / "cache")
    assert_same(D.load_dataset("cifar10", tmp_path / "cache"), g10, image_order(g10))
    assert meta["label"] == "CIFAR-10 (PNG copy)" and meta["lossy"] is False
    assert meta["source_kind"] == ("image-folder" if layout.startswith("folder") else "image-folder-archive")


def test_cifar100_image_folder_round_trip(tmp_path, g100):
    tree = fx.write_image_folder(tmp_path / "c100", g100, "png")
    D.import_dataset("cifar100", fx.archive(tree, tmp_path / "c100.tar.gz"), tmp_path / "cache")
    data = D.load_dataset("cifar100", tmp_path / "cache")
    assert data.train_coarse is None  # folders carry no superclass
    assert_same(data, fx.Generated(**{**g100.__dict__, "train_coarse": None, "test_coarse": None}), image_order(g100))


def test_jpeg_archive_is_labelled_lossy_with_its_quality(tmp_path, g10):
    tree = fx.write_image_folder(tmp_path / "imgs", g10, "jpg")
    meta = D.import_dataset("cifar10", fx.archive(tree, tmp_path / "cifar10-jpeg-q75.tar.xz", ""), tmp_path / "c")
    data = D.load_dataset("cifar10", tmp_path / "c")
    assert meta["label"] == "CIFAR-10 (JPEG q75 copy)" and meta["lossy"] is True and meta["jpeg_quality"] == 75
    order = image_order(g10)
    np.testing.assert_array_equal(data.train_y.numpy(), g10.train_y[order["train"]])
    np.testing.assert_array_equal(data.test_y.numpy(), g10.test_y[order["test"]])
    err = np.abs(data.test_x.numpy().astype(int) - g10.test_x[order["test"]])
    assert 0 < err.mean() < 8  # lossy, but close


@pytest.mark.parametrize("formats, name, expected", [
    ({"JPEG"}, "cifar10-jpeg-q75.tar.xz", ("CIFAR-10 (JPEG q75 copy)", True, 75)),
    ({"JPEG", "PNG"}, "my_q90_copy", ("CIFAR-10 (JPEG q90 copy)", True, 90)),
    ({"JPEG"}, "cifar10-jpeg.tar.xz", ("CIFAR-10 (JPEG copy)", True, None)),
    ({"JPEG"}, "faq12.tar", ("CIFAR-10 (JPEG copy)", True, None)),  # "q12" inside a word is no quality
    ({"PNG"}, "cifar10-q75.tar", ("CIFAR-10 (PNG copy)", False, None)),
])
def test_copy_label(formats, name, expected):
    assert sources.copy_label("CIFAR-10", formats, name) == expected


def test_unofficial_class_names_take_sorted_order(tmp_path, g10):
    names = ("k", "c", "a", "j", "b", "e", "d", "g", "f", "h")
    fx.write_image_folder(tmp_path / "tree", g10, "png", class_names=names)
    D.import_dataset("cifar10", tmp_path / "tree", tmp_path / "cache")
    data = D.load_dataset("cifar10", tmp_path / "cache")
    assert data.classes == tuple(sorted(names))
    relabel = np.array([sorted(names).index(n) for n in names])  # generated label -> imported label
    y = relabel[g10.train_y]
    order = np.lexsort((np.arange(len(y)), y))
    np.testing.assert_array_equal(data.train_y.numpy(), y[order])
    np.testing.assert_array_equal(data.train_x.numpy(), g10.train_x[order])


def test_download_uses_torchvision_url_and_reads_the_archive(tmp_path, g10, monkeypatch):
    import torchvision.datasets.utils as tvu
    archive = fx.archive(fx.write_official(tmp_path / "src", g10), tmp_path / "official.tar.gz")
    calls = []

    def fake_download(url, root, filename, md5):
        calls.append(url)
        Path(root, filename).write_bytes(archive.read_bytes())

    monkeypatch.setattr(tvu, "download_url", fake_download)
    meta = D.import_dataset("cifar10", "download", tmp_path / "cache")
    assert calls and calls[0].endswith("cifar-10-python.tar.gz")
    assert meta["source_kind"] == "torchvision-download" and meta["source"] == calls[0]
    assert_same(D.load_dataset("cifar10", tmp_path / "cache"), g10)
    assert [p.name for p in (tmp_path / "cache").iterdir()] == ["cifar10"]  # the download is cleaned up


def test_download_offline_names_the_alternatives(tmp_path, monkeypatch):
    import torchvision.datasets.utils as tvu

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(tvu, "download_url", offline)
    with pytest.raises(UserError, match=r"could not download CIFAR-10 .*cifar10-jpeg-q75\.tar\.xz"):
        D.import_dataset("cifar10", "download", tmp_path / "cache")


# ----------------------------------------------------------------------------------------------------------------
# Bad sources: one clear UserError each

@pytest.mark.parametrize("damage", ["truncate", "flip-byte", "drop-gzip-trailer"])
def test_corrupt_archive_is_refused(tmp_path, g10, damage):
    archive = fx.archive(fx.write_official(tmp_path / "src", g10), tmp_path / "cifar-10-python.tar.gz")
    raw = archive.read_bytes()
    mid = len(raw) // 2
    raw = {"truncate": raw[:mid], "flip-byte": raw[:mid] + bytes([raw[mid] ^ 0x55]) + raw[mid + 1:],
           "drop-gzip-trailer": raw[:-8]}[damage]
    archive.write_bytes(raw)
    with pytest.raises(UserError, match="corrupt or truncated.*re-download"):
        D.import_dataset("cifar10", archive, tmp_path / "cache")
    assert not (tmp_path / "cache" / "cifar10").exists()


def test_truncated_image_archive_is_refused(tmp_path, g10):
    archive = fx.archive(fx.write_image_folder(tmp_path / "t", g10), tmp_path / "c.tar.xz")
    archive.write_bytes(archive.read_bytes()[:-100])
    with pytest.raises(UserError, match="corrupt or truncated"):
        D.import_dataset("cifar10", archive, tmp_path / "cache")


def _member(name: str, kind: bytes = tarfile.REGTYPE, link: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, link
    return info


@pytest.mark.parametrize("evil, message", [
    (_member("../evil"), "escapes the target folder"),
    (_member("train/../../evil"), "escapes the target folder"),
    (_member("/etc/evil"), "escapes the target folder"),
    (_member("train/cat/x.png", tarfile.SYMTYPE, "/etc/passwd"), "is a link"),
    (_member("train/cat/y.png", tarfile.LNKTYPE, "train/cat/0.png"), "is a link"),
    (_member("train/cat/dev", tarfile.CHRTYPE), "device or special file"),
])
def test_malicious_archive_members_are_refused(tmp_path, evil, message):
    archive = fx.write_tar_with(tmp_path / "evil.tar.gz", [_member("train/cat/0.png"), evil],
                                {"train/cat/0.png": fx.png_bytes(), "../evil": b"x", "train/../../evil": b"x",
                                 "/etc/evil": b"x"})
    with pytest.raises(UserError, match=f"archive member .* {message}; refusing"):
        D.import_dataset("cifar10", archive, tmp_path / "cache")


def test_pickle_asking_for_other_globals_is_refused(tmp_path, g10, capsys):
    folder = fx.write_official(tmp_path / "src", g10)
    (folder / "data_batch_1").write_bytes(b"\x80\x02cbuiltins\nprint\nq\x00X\x05\x00\x00\x00pwnedq\x01\x85q\x02Rq\x03.")
    with pytest.raises(UserError, match=r"data_batch_1 is not a valid CIFAR pickle \(it asks for builtins\.print"):
        D.import_dataset("cifar10", folder, tmp_path / "cache")
    assert "pwned" not in capsys.readouterr().out  # print(b"pwned") never ran


def test_unpickler_reads_the_official_python2_layout(g10):
    raw = fx.py2_pickle({b"data": g10.train_x.reshape(30, -1), b"labels": g10.train_y.tolist()})
    assert b"cnumpy.core.multiarray\n_reconstruct\n" in raw and b"_codecs" not in raw
    batch = sources.unpickle(raw, "x")
    np.testing.assert_array_equal(batch[b"data"], g10.train_x.reshape(30, -1))


@pytest.mark.parametrize("image, message", [
    (fx.png_bytes(31, 32), r"test/cat/bad\.png is a 31x32 RGB image; CIFAR images must be 32x32 RGB"),
    (fx.png_bytes(32, 32, "L"), r"test/cat/bad\.png is a 32x32 L image"),
    (b"not an image at all", r"test/cat/bad\.png is not a readable PNG or JPEG image"),
])
def test_bad_images_are_named(tmp_path, g10, image, message):
    tree = fx.write_image_folder(tmp_path / "t", g10)
    (tree / "test" / "cat" / "bad.png").write_bytes(image)
    with pytest.raises(UserError, match=message):
        D.import_dataset("cifar10", tree, tmp_path / "cache")


def test_wrong_class_count_in_image_folders(tmp_path, g10):
    tree = fx.write_image_folder(tmp_path / "t", g10)
    for split in ("train", "test"):
        for f in (tree / split / "truck").iterdir():
            f.unlink()
        (tree / split / "truck").rmdir()
    with pytest.raises(UserError, match="9 class folders but CIFAR-10 has 10"):
        D.import_dataset("cifar10", tree, tmp_path / "cache")


def test_wrong_class_count_in_official_meta(tmp_path, g10):
    folder = fx.write_official(tmp_path / "src", g10, class_names=g10.classes[:9])
    with pytest.raises(UserError, match="names 9 classes but CIFAR-10 has 10"):
        D.import_dataset("cifar10", folder, tmp_path / "cache")


def test_wrong_data_set_name_points_at_the_right_command(tmp_path, g100):
    folder = fx.write_official(tmp_path / "src", g100)
    with pytest.raises(UserError, match="holds CIFAR-100, not CIFAR-10: run `ablate data import cifar100"):
        D.import_dataset("cifar10", folder, tmp_path / "cache")


def test_incomplete_official_folder(tmp_path, g10):
    folder = fx.write_official(tmp_path / "src", g10)
    (folder / "data_batch_4").unlink()
    with pytest.raises(UserError, match="lacks data_batch_4"):
        D.import_dataset("cifar10", folder, tmp_path / "cache")


@pytest.mark.parametrize("make, message", [
    (lambda p: p / "missing.tar.gz", "does not exist"),
    (lambda p: (p / "notes.txt").write_text("hello") and p / "notes.txt", "neither a folder nor a tar/zip archive"),
    (lambda p: (p / "empty").mkdir() or p / "empty", "no CIFAR-10 data found"),
])
def test_unusable_sources(tmp_path, make, message):
    with pytest.raises(UserError, match=message):
        D.import_dataset("cifar10", make(tmp_path), tmp_path / "cache")


def test_unknown_data_set_name(tmp_path):
    with pytest.raises(UserError, match="unknown data set 'mnist': choose one of cifar10, cifar100"):
        D.import_dataset("mnist", tmp_path, tmp_path / "cache")


# ----------------------------------------------------------------------------------------------------------------
# The cache

def test_load_without_cache_names_the_import_command(tmp_path):
    with pytest.raises(UserError, match=r"no cached data set 'cifar10' in .*: run `ablate data import cifar10 SOURCE` "
                                        r"\(e\.g\. \.\./shared/data/cifar10-jpeg-q75\.tar\.xz\)"):
        D.load_dataset("cifar10", tmp_path)


def test_load_detects_a_changed_cache(tmp_path, g10):
    D.import_dataset("cifar10", fx.write_official(tmp_path / "src", g10), tmp_path / "cache")
    y = np.load(tmp_path / "cache" / "cifar10" / "train_y.npy")
    y[0] = (y[0] + 1) % 10
    np.save(tmp_path / "cache" / "cifar10" / "train_y.npy", y)
    with pytest.raises(UserError, match="does not match its sha256.*ablate data import cifar10"):
        D.load_dataset("cifar10", tmp_path / "cache")


def test_load_reports_a_damaged_cache(tmp_path, g10):
    D.import_dataset("cifar10", fx.write_official(tmp_path / "src", g10), tmp_path / "cache")
    (tmp_path / "cache" / "cifar10" / "test_x.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(UserError, match="is damaged.*re-import"):
        D.load_dataset("cifar10", tmp_path / "cache")


def test_reimport_replaces_the_cache_and_leaves_no_temp_folders(tmp_path, g10):
    other = fx.generate("cifar10", 30, 20, seed=5)
    first = D.import_dataset("cifar10", fx.write_official(tmp_path / "a", g10), tmp_path / "cache")
    second = D.import_dataset("cifar10", fx.write_official(tmp_path / "b", other), tmp_path / "cache")
    assert first["sha256"] != second["sha256"]
    assert_same(D.load_dataset("cifar10", tmp_path / "cache"), other)
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == ["cifar10"]
    assert (tmp_path / "cache" / "cifar10").stat().st_mode & 0o777 == 0o755


def test_fingerprint_is_the_same_for_the_same_data(tmp_path, g10):
    folder = fx.write_official(tmp_path / "src", g10)
    a = D.import_dataset("cifar10", folder, tmp_path / "c1")["sha256"]
    b = D.import_dataset("cifar10", fx.archive(folder, tmp_path / "x.tar.gz"), tmp_path / "c2")["sha256"]
    assert a == b and len(a) == 64


def test_failed_import_keeps_the_old_cache(tmp_path, g10):
    D.import_dataset("cifar10", fx.write_official(tmp_path / "src", g10), tmp_path / "cache")
    with pytest.raises(UserError):
        D.import_dataset("cifar10", tmp_path / "nothing-here", tmp_path / "cache")
    assert_same(D.load_dataset("cifar10", tmp_path / "cache"), g10)


def test_list_datasets(tmp_path, g10):
    assert D.list_datasets(tmp_path / "nowhere") == []
    D.import_dataset("cifar10", fx.write_official(tmp_path / "src", g10), tmp_path / "cache")
    (tmp_path / "cache" / "cifar100").mkdir()
    (tmp_path / "cache" / "cifar100" / "meta.json").write_text("{not json")
    found = D.list_datasets(tmp_path / "cache")
    assert [m["name"] for m in found] == ["cifar10", "cifar100"]
    assert found[0]["counts"] == {"train": 30, "test": 20} and "damaged meta.json" in found[1]["error"]
    assert json.loads((tmp_path / "cache" / "cifar10" / "meta.json").read_text()) == found[0]


def test_resolve_data_dir_precedence(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("ABLATE_DATA", raising=False)
    assert D.resolve_data_dir(None) == tmp_path / "home" / ".cache" / "ablate" / "data"
    monkeypatch.setenv("ABLATE_DATA", str(tmp_path / "env"))
    assert D.resolve_data_dir(None) == tmp_path / "env"
    assert D.resolve_data_dir(str(tmp_path / "flag")) == tmp_path / "flag"


# ----------------------------------------------------------------------------------------------------------------
# Synthetic data and the tables

def test_make_synthetic_is_deterministic_balanced_and_learnable():
    a, b = D.make_synthetic("cifar10", 400, 200, seed=3), D.make_synthetic("cifar10", 400, 200, seed=3)
    assert torch.equal(a.train_x, b.train_x) and torch.equal(a.test_y, b.test_y)
    assert not torch.equal(a.train_x, D.make_synthetic("cifar10", 400, 200, seed=4).train_x)
    assert a.train_x.shape == (400, 3, 32, 32) and a.train_x.dtype == torch.uint8 and a.train_y.dtype == torch.int64
    assert torch.bincount(a.train_y, minlength=10).tolist() == [40] * 10
    # nearest class mean, flipped test images: the signal survives augmentation
    means = torch.stack([a.train_x[a.train_y == c].float().mean(0) for c in range(10)])   # (10, 3, 32, 32)
    test = a.test_x.flip(-1).float()                                                     # (200, 3, 32, 32)
    pred = torch.cdist(test.flatten(1), means.flatten(1)).argmin(1)
    assert (pred == a.test_y).float().mean() > 0.5
    c100 = D.make_synthetic("cifar100", 200, 100)
    assert c100.num_classes == 100 and c100.train_coarse.max() == 19 and c100.meta["sha256"]


def test_dataset_tables():
    c10, c100 = D.DATASETS["cifar10"], D.DATASETS["cifar100"]
    assert c10.classes[:3] == ("airplane", "automobile", "bird") and c10.classes[-1] == "truck"
    assert list(c10.classes) == sorted(c10.classes)  # image folders rely on it: sorted names = official labels
    assert c100.num_classes == 100 and list(c100.classes) == sorted(c100.classes)  # official order is alphabetical
    assert len(c100.coarse_classes) == 20 and list(c100.coarse_classes) == sorted(c100.coarse_classes)


# ----------------------------------------------------------------------------------------------------------------
# CLI

def test_cli_import_and_list(tmp_path, g10):
    archive = fx.archive(fx.write_image_folder(tmp_path / "t", g10, "jpg"), tmp_path / "cifar10-jpeg-q75.tar.xz")
    runner = CliRunner()
    res = runner.invoke(main, ["data", "import", "cifar10", str(archive), "--data-dir", str(tmp_path / "cache")])
    assert res.exit_code == 0, res.output
    assert "imported CIFAR-10 (JPEG q75 copy): 30 train + 20 test images, 10 classes" in res.output
    assert "lossy" in res.output
    res = runner.invoke(main, ["data", "list", "--data-dir", str(tmp_path / "cache")], env={"COLUMNS": "300"})
    assert res.exit_code == 0, res.output
    meta = json.loads((tmp_path / "cache" / "cifar10" / "meta.json").read_text())
    for text in ("cifar10", "CIFAR-10 (JPEG q75 copy)", "30", "20", meta["sha256"][:8]):
        assert text in res.output


def test_cli_errors_are_one_line(tmp_path):
    runner = CliRunner()
    res = runner.invoke(main, ["data", "import", "cifar10", str(tmp_path / "nope"), "--data-dir", str(tmp_path)])
    assert res.exit_code == 2 and res.output.startswith("error: source ") and res.output.count("\n") == 1
    res = runner.invoke(main, ["data", "list", "--data-dir", str(tmp_path / "empty")])
    assert res.exit_code == 0 and "no data sets in" in res.output


def test_importing_the_same_archive_again_does_nothing(tmp_path):
    from click.testing import CliRunner
    from runners.cli import main
    from tests.cifar_fixtures import archive as pack, generate, write_official
    folder = write_official(tmp_path / "src", generate("cifar10", n_train=60, n_test=20, seed=4))
    archive = pack(folder, tmp_path / "cifar-10-python.tar.gz")
    args = ["data", "import", "cifar10", str(archive), "--data-dir", str(tmp_path / "cache")]
    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0 and first.output.startswith("imported"), first.output
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0 and "already cached" in again.output, again.output
    forced = CliRunner().invoke(main, [*args, "--force"])
    assert forced.exit_code == 0 and forced.output.startswith("imported"), forced.output


def test_an_archive_member_larger_than_any_cifar_file_is_refused_before_reading(tmp_path, monkeypatch):
    import tarfile

    from ablations.errors import UserError
    from runners.data import import_dataset
    monkeypatch.setattr(sources, "MAX_MEMBER_BYTES", 1000)  # a small limit stands in for a multi-GB member
    big = tmp_path / "big.bin"
    big.write_bytes(b"\0" * 5000)
    out = tmp_path / "bomb.tar"
    with tarfile.open(out, "w") as tar:
        tar.add(big, arcname="cifar-10-batches-py/data_batch_1")
    with pytest.raises(UserError, match="more than any CIFAR file"):
        import_dataset("cifar10", out, data_dir=tmp_path / "cache")
