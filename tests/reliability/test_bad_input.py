"""Bad input, systematically: through the real CLI, every one exits 2 with exactly one line that says what is
wrong and what to do, shows no traceback, and leaves every existing result and cache byte for byte as it was."""
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
from click.testing import CliRunner

import tests.cifar_fixtures as fx
from runners.cli import main
from tests.reliability.conftest import TALLY
from tests.reliability.harness import snapshot

ROOT = Path(__file__).resolve().parents[2]
G10 = fx.generate("cifar10", n_train=30, n_test=20, seed=1)
G100 = fx.generate("cifar100", n_train=100, n_test=100, seed=1)
RUN = ("--out", "{results}", "--data-dir", "{data}", "--plain")  # a bad command must not touch these
SMOKE = ("run", "--grid", "smoke", *RUN)
IMPORT = ("data", "import", "cifar10", "{src}", "--data-dir", "{data}")
GRID_RUN = '[run]\narch = "alexnet"\nwidth = 0.125\nepochs = 1\nsubset = 64\ntest_subset = 50\n'


@dataclass(frozen=True)
class Bad:
    args: tuple[str, ...]  # {results}, {data}, {world}, {tmp} and {src} are filled in
    says: str  # part of the one line
    grid: str | bytes | None = None  # the text of ablations/grids-like file {tmp}/grids/bad.toml
    src: Callable[[Path], Path] | None = None  # makes the source {src} in a fresh folder


def grid(text: str | bytes, says: str) -> Bad:
    return Bad(("run", "--grid", "bad", *RUN), says, grid=text)


def official(folder: Path, g=G10, **kw) -> Path:
    return fx.write_official(folder / "official", g, **kw)


def tar_of(members: dict[str, bytes | str]) -> Callable[[Path], Path]:
    """A .tar.gz with these members: bytes are files, a str is a symlink's target."""
    def make(folder: Path) -> Path:
        infos = []
        for name, what in members.items():
            info = tarfile.TarInfo(name)
            if isinstance(what, str):
                info.type, info.linkname = tarfile.SYMTYPE, what
            infos.append(info)
        return fx.write_tar_with(folder / "evil.tar.gz", infos, {k: v for k, v in members.items()
                                                                  if isinstance(v, bytes)})
    return make


def truncated_archive(folder: Path) -> Path:
    path = fx.archive(official(folder), folder / "cifar-10-python.tar.gz")
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    return path


def image_tree(folder: Path, bad: bytes | None = None, drop_class: str = "") -> Path:
    tree = fx.write_image_folder(folder / "tree", G10)
    if bad is not None:
        (tree / "train" / "cat" / "bad.png").write_bytes(bad)
    if drop_class:
        for split in ("train", "test"):
            shutil.rmtree(tree / split / drop_class)
    return tree


def without(name: str) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        (official(folder) / name).unlink()
        return folder / "official"
    return make


def file_with(name: str, data: bytes) -> Callable[[Path], Path]:
    def make(folder: Path) -> Path:
        (folder / name).write_bytes(data)
        return folder / name
    return make


EVIL_PICKLE = b"\x80\x02cbuiltins\nprint\nq\x00X\x05\x00\x00\x00pwnedq\x01\x85q\x02Rq\x03."

CASES = {
    # the command line
    "unknown grid": Bad(("run", "--grid", "nosuch", *RUN), "unknown grid 'nosuch'; known grids: "),
    "grid path ../../etc/passwd": Bad(("run", "--grid", "../../etc/passwd", *RUN), "is not a grid name"),
    "grid path /etc/passwd": Bad(("run", "--grid", "/etc/passwd", *RUN), "is not a grid name"),
    "grid name ..": Bad(("run", "--grid", "..", *RUN), "is not a grid name"),
    "grid file name smoke.toml": Bad(("run", "--grid", "smoke.toml", *RUN), "is not a grid name"),
    "empty grid name": Bad(("run", "--grid", "", *RUN), "is not a grid name"),
    "no --grid": Bad(("run", *RUN), "Missing option '--grid'"),
    "unknown command": Bad(("fly",), "No such command 'fly'"),
    "zero epochs": Bad((*SMOKE, "--epochs", "0"), "option --epochs: epochs must be >= 1, got 0"),
    "negative epochs": Bad((*SMOKE, "--epochs", "-3"), "epochs must be >= 1, got -3"),
    "epochs not a number": Bad((*SMOKE, "--epochs", "ten"), "Invalid value for '--epochs': 'ten' is not a valid"),
    "zero batch size": Bad((*SMOKE, "--batch-size", "0"), "batch_size must be >= 1, got 0"),
    "negative batch size": Bad((*SMOKE, "--batch-size", "-64"), "batch_size must be >= 1, got -64"),
    "zero width": Bad((*SMOKE, "--width", "0"), "width must be > 0"),
    "negative subset": Bad((*SMOKE, "--subset", "-5"), "subset must be >= 0, got -5"),
    "negative test subset": Bad((*SMOKE, "--test-subset", "-1"), "test_subset must be >= 0, got -1"),
    "seeds not numbers": Bad((*SMOKE, "--seeds", "abc"), "--seeds 'abc': give a count (3) or a comma-separated"),
    "zero seeds": Bad((*SMOKE, "--seeds", "0"), "--seeds '0': give a positive count"),
    "negative seed": Bad((*SMOKE, "--seeds", "-1"), "--seeds '-1': give a positive count"),
    "repeated seed": Bad((*SMOKE, "--seeds", "1,1"), "--seeds '1,1': a seed is listed twice"),
    "empty seed list": Bad((*SMOKE, "--seeds", ","), "--seeds ',': give a positive count"),
    "unknown budget": Bad((*SMOKE, "--budget", "huge"), "Invalid value for '--budget': 'huge' is not one of"),
    "unknown override key": Bad((*SMOKE, "colour=red"), "override colour=red: unknown setting 'colour'"),
    "override of the wrong type": Bad((*SMOKE, "lr=fast"), "override lr=fast: expected float for 'lr'"),
    "override without a value": Bad((*SMOKE, "lr"), "override 'lr' is not key=value"),
    "override of a missing axis": Bad((*SMOKE, "axes.pooling=[\"seed\"]"), "'pooling' is not a Cartesian axis"),
    "non-finite override": Bad((*SMOKE, "lr=nan"), "lr must be a finite number"),
    "oversized epochs": Bad((*SMOKE, "epochs=1000000000"), "epochs must be <= 10000"),
    "a million seeds": Bad((*SMOKE, "--seeds", "1000000"), "at most 1000 seeds"),
    "subset larger than the data": Bad((*SMOKE, "--yes", "subset=999999"), "more than the"),
    "budget the grid lacks": Bad((*SMOKE, "--budget", "cpu"), "grid 'smoke' has no budget 'cpu'"),
    "unknown precision": Bad((*SMOKE, "--precision", "fp16"), "Invalid value for '--precision': 'fp16'"),
    "unknown data set option": Bad((*SMOKE, "--dataset", "imagenet"), "Invalid value for '--dataset'"),
    "zero jobs": Bad((*SMOKE, "--jobs", "0"), "Invalid value for '--jobs'"),
    "unknown device": Bad((*SMOKE, "--device", "tpu0"), "unknown device 'tpu0'; use auto, cpu, cuda or cuda:N"),
    "a CUDA device that is not there": Bad((*SMOKE, "--device", "cuda:9"), "device 'cuda:9'"),
    "ray address without ray": Bad((*SMOKE, "--address", "head:6379"), "--address is a Ray cluster's address"),
    "ray with --jobs": Bad((*SMOKE, "--executor", "ray", "--jobs", "2"), "drop --jobs and --nnodes"),
    "--jobs with --nnodes": Bad((*SMOKE, "--jobs", "2", "--nnodes", "2"), "--jobs and --nnodes do not mix"),
    "--nnodes without --rdzv": Bad((*SMOKE, "--nnodes", "2"), "--nnodes 2 needs --rdzv HOST:PORT"),
    "node rank past the nodes": Bad((*SMOKE, "--nnodes", "2", "--node-rank", "3", "--rdzv", "head:29500"),
                                    "--node-rank 3 with --nnodes 2"),
    "results folder not writable": Bad(("run", "--grid", "smoke", "--out", "{world}/a-file/results",
                                        "--data-dir", "{data}"), "cannot write to the results folder"),
    "no data cache": Bad(("run", "--grid", "smoke", "--out", "{results}", "--data-dir", "{tmp}/empty"),
                         "no cached data set 'cifar10' in"),
    "data set not imported": Bad((*SMOKE, "--dataset", "cifar100"), "no cached data set 'cifar100' in"),
    "damaged data cache": Bad(("run", "--grid", "smoke", "--out", "{results}", "--data-dir", "{world}/damaged"),
                              "re-import it with `ablate data import cifar10 SOURCE`"),
    "show an unknown grid": Bad(("show", "nosuch", "--no-probe"), "unknown grid 'nosuch'"),
    "report without results": Bad(("report", "--results", "{tmp}/none"), "no results folder"),
    # grid files
    "grid: not TOML": grid('title = "x"\n[run\n', "not valid TOML"),
    "grid: not text": grid(b"\xff\xfe\x00\x01binary", "not a text (UTF-8) file"),
    "grid: unknown top-level key": grid('colour = "red"\n' + GRID_RUN, "unknown top-level key 'colour'"),
    "grid: unknown setting": grid(GRID_RUN + "speed = 3\n", "unknown setting 'speed'"),
    "grid: unknown axis": grid(GRID_RUN + '[axes]\ncolour = ["red"]\n', "unknown axis 'colour'"),
    "grid: unknown value": grid(GRID_RUN + '[axes]\nactivation = ["relu", "sigmoid"]\n',
                                "'sigmoid' is not a valid activation"),
    "grid: wrong type": grid('[run]\nepochs = "ten"\n', "expected int for 'epochs', got 'ten' (str)"),
    "grid: bool for a number": grid('[run]\nlr = true\n', "expected float for 'lr', got True (bool)"),
    "grid: empty axis": grid(GRID_RUN + "[axes]\nactivation = []\n", "expected a non-empty list of values"),
    "grid: axis not a list": grid(GRID_RUN + '[axes]\nactivation = "relu"\n', "expected a non-empty list"),
    "grid: repeated axis value": grid(GRID_RUN + '[axes]\nactivation = ["relu", "relu"]\n', "values repeat"),
    "grid: duplicate axis": grid(GRID_RUN + "[axes]\nlr = [0.1, 0.01]\n[zip.lr]\nlr = [0.1, 0.2]\n",
                                 "axis 'lr' is given twice"),
    "grid: duplicate key": grid(GRID_RUN + "epochs = 2\n", "not valid TOML"),
    "grid: zip of unequal lists": grid(GRID_RUN + '[zip.act]\nact = ["a", "b"]\nlr = [0.1]\n',
                                       "every key needs a list of values of the same length"),
    "grid: zero epochs": grid("[run]\nepochs = 0\n", "run.epochs: epochs must be >= 1, got 0"),
    "grid: negative learning rate": grid("[run]\nlr = -0.1\n", "run.lr: lr must be > 0, got -0.1"),
    "grid: zero learning rate": grid("[run]\nlr = 0.0\n", "lr must be > 0, got 0.0"),
    "grid: negative batch size": grid("[run]\nbatch_size = -64\n", "batch_size must be >= 1, got -64"),
    "grid: dropout of 1.5": grid("[run]\ndropout = 1.5\n", "dropout must be <= 0.99"),
    "grid: more devices than exist": grid(GRID_RUN + "devices = 64\nbatch_size = 64\n",
                                          "a run asks for 64 devices but this machine has"),
    "grid: batch not divisible by devices": grid(GRID_RUN + "devices = 2\nbatch_size = 63\n",
                                                 "batch size 63 does not split over 2 devices"),
    "grid: seeds repeat": grid("seeds = [0, 0]\n" + GRID_RUN, "seeds: expected a non-empty list of distinct"),
    "grid: early stop without a threshold": grid(GRID_RUN + '[early_stop]\nmetric = "train_error"\n',
                                                 "early_stop needs `below`"),
    "grid: claim on an unknown axis": grid(GRID_RUN + '[axes]\nlrn = [false, true]\n[[claims]]\nid = "x"\n'
                                           'metric = "test_error"\naxis = "pooling"\na = 1\nb = 2\n'
                                           'effect = "ratio"\n', "axis 'pooling' is not an axis of this grid"),
    # data sources
    "data: source missing": Bad(IMPORT, "does not exist", src=lambda p: p / "missing.tar.gz"),
    "data: truncated archive": Bad(IMPORT, "is corrupt or truncated", src=truncated_archive),
    "data: not an archive": Bad(IMPORT, "is neither a folder nor a tar/zip archive",
                                src=file_with("cifar-10-python.tar.gz", b"<html>404 not found</html>\n")),
    "data: empty file": Bad(IMPORT, "is neither a folder nor a tar/zip archive", src=file_with("c.tar.gz", b"")),
    "data: empty folder": Bad(IMPORT, "no CIFAR-10 data found", src=lambda p: p),
    "data: incomplete official folder": Bad(IMPORT, "lacks data_batch_4", src=without("data_batch_4")),
    "data: pickle that runs code": Bad(IMPORT, "is not a valid CIFAR pickle (it asks for builtins.print",
                                       src=lambda p: file_with("data_batch_1", EVIL_PICKLE)(official(p)).parent),
    "data: wrong class count (official)": Bad(IMPORT, "names 9 classes but CIFAR-10 has 10",
                                              src=lambda p: official(p, class_names=G10.classes[:9])),
    "data: wrong class count (folders)": Bad(IMPORT, "9 class folders but CIFAR-10 has 10",
                                             src=lambda p: image_tree(p, drop_class="truck")),
    "data: wrong image size": Bad(IMPORT, "is a 16x16 RGB image; CIFAR images must be 32x32 RGB",
                                  src=lambda p: image_tree(p, fx.png_bytes(16, 16))),
    "data: grey image": Bad(IMPORT, "is a 32x32 L image", src=lambda p: image_tree(p, fx.png_bytes(mode="L"))),
    "data: not an image": Bad(IMPORT, "is not a readable PNG or JPEG image",
                              src=lambda p: image_tree(p, b"GIF89a not a png")),
    "data: CIFAR-100 imported as CIFAR-10": Bad(IMPORT, "holds CIFAR-100, not CIFAR-10: run `ablate data import "
                                                "cifar100", src=lambda p: official(p, G100)),
    "data: tar slip ../": Bad(IMPORT, "escapes the target folder; refusing the archive",
                              src=tar_of({"train/cat/0.png": fx.png_bytes(), "../../evil.png": b"x"})),
    "data: absolute member path": Bad(IMPORT, "escapes the target folder",
                                      src=tar_of({"/tmp/evil.png": b"x"})),
    "data: symlink member": Bad(IMPORT, "is a link; refusing the archive",
                                src=tar_of({"train/cat/0.png": "/etc/passwd"})),
    "data: no source given": Bad(("data", "import", "cifar10"), "Missing argument 'SOURCE'"),
    "data: no data set given": Bad(("data", "import"), "Missing argument '{cifar10|cifar100}'. Choose from: "
                                                      "cifar10, cifar100"),
    "data: unknown data set": Bad(("data", "import", "mnist", "{src}", "--data-dir", "{data}"),
                                  "Invalid value for '{cifar10|cifar100}': 'mnist'", src=lambda p: p),
    "data: cache folder not writable": Bad(("data", "import", "cifar10", "{src}", "--data-dir", "{world}/a-file/d"),
                                           "cannot write the cache", src=official),
}


@pytest.fixture(scope="module")
def world(tmp_path_factory, reference, data_dir) -> Path:
    """What a bad command must not touch: finished results, a data cache, a damaged cache, a file in the way."""
    world = tmp_path_factory.mktemp("world")
    shutil.copytree(reference, world / "results" / "smoke")
    shutil.copytree(data_dir, world / "data")
    shutil.copytree(data_dir, world / "damaged")
    (world / "damaged" / "cifar10" / "meta.json").write_text("{not json")
    (world / "a-file").write_text("a file where a folder is expected\n")
    return world


@pytest.mark.parametrize("name", CASES)
def test_bad_input_is_one_line_and_touches_nothing(name, world, tmp_path, monkeypatch):
    bad = CASES[name]
    grids = tmp_path / "grids"
    grids.mkdir()
    if bad.grid is not None:
        (grids / "bad.toml").write_bytes(bad.grid.encode() if isinstance(bad.grid, str) else bad.grid)
    monkeypatch.setenv("ABLATE_GRIDS_DIR", str(grids))
    src = tmp_path / "src"
    if bad.src is not None:
        src.mkdir()
        src = bad.src(src)
    args = [a.format(results=world / "results", data=world / "data", world=world, tmp=tmp_path, src=src)
            for a in bad.args]
    before = snapshot(world)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 2, result.output
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: "), result.stderr
    assert bad.says in result.stderr
    assert "Traceback" not in result.output
    assert snapshot(world) == before  # no result, cache or file touched
    TALLY["bad inputs"] += 1


def test_the_console_shows_a_traceback_only_with_debug(tmp_path):
    """The real console script, not the test runner: one line normally, the full traceback under --debug."""
    cmd = [sys.executable, "-m", "runners.cli"]
    args = ["run", "--grid", "../../etc/passwd", "--out", str(tmp_path)]
    plain, debug = [subprocess.Popen(c, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                    for c in ([*cmd, *args], [*cmd, "--debug", *args])]
    out, err = plain.communicate(timeout=120)
    assert plain.returncode == 2 and out == ""
    assert err.startswith("error: grid name '../../etc/passwd' is not a grid name") and err.count("\n") == 1
    out, err = debug.communicate(timeout=120)
    assert debug.returncode != 0 and "Traceback" in err and "UserError" in err
