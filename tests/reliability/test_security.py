"""Nothing untrusted is unpickled or handed to a shell, read from the source itself: checkpoints load with
torch.load(weights_only=True), caches with np.load(allow_pickle=False), the official CIFAR pickles only through
the unpickler in runners/sources.py that rebuilds arrays and nothing else; no shell anywhere."""
import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted(p for pkg in ("ablations", "runners", "reports") for p in (ROOT / pkg).rglob("*.py"))


def calls(path: Path):
    """(dotted name of the called function, the call node) for every call in a file."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Call):
            yield ast.unparse(node.func), node


def keyword(call: ast.Call, name: str):
    for kw in call.keywords:
        if kw.arg == name:
            return kw.value.value if isinstance(kw.value, ast.Constant) else "<not a constant>"
    return None


def test_the_scan_sees_the_code():
    assert len(SOURCES) > 10
    assert any(name == "torch.load" for p in SOURCES for name, _ in calls(p))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_unsafe_loading_and_no_shell(path):
    for name, call in calls(path):
        where = f"{path.relative_to(ROOT)}:{call.lineno} {name}"
        if name == "torch.load":
            assert keyword(call, "weights_only") is True, where
        if name in ("np.load", "numpy.load"):
            assert keyword(call, "allow_pickle") is False, where
        assert name not in ("pickle.load", "pickle.loads", "pickle.Unpickler", "marshal.loads", "shelve.open",
                            "eval", "exec", "os.system", "os.popen", "subprocess.getoutput",
                            "subprocess.getstatusoutput"), where
        assert keyword(call, "shell") in (None, False), where
        if name.startswith("subprocess.") or name.startswith("os.exec") or name.startswith("os.spawn"):
            cmd = call.args[0] if call.args else None
            assert not isinstance(cmd, (ast.Constant, ast.JoinedStr, ast.BinOp)), where  # an argv list, not a line
        assert not name.endswith((".extractall", ".extract")), where  # archives are read, never unpacked


def test_the_only_unpickler_rebuilds_arrays_and_nothing_else():
    unpicklers = [(p, node) for p in SOURCES for node in ast.walk(ast.parse(p.read_text()))
                  if isinstance(node, ast.ClassDef) and any("Unpickler" in ast.unparse(b) for b in node.bases)]
    found = [(p.relative_to(ROOT).as_posix(), n.name) for p, n in unpicklers]
    assert found == [("runners/sources.py", "ArrayUnpickler")]
    [(_, cls)] = unpicklers
    assert "find_class" in {f.name for f in cls.body if isinstance(f, ast.FunctionDef)}
    from runners.sources import PICKLE_GLOBALS, ArrayUnpickler
    assert {m for m, _ in PICKLE_GLOBALS} <= {"numpy", "numpy.core.multiarray", "numpy._core.multiarray"}
    with pytest.raises(Exception, match="which a CIFAR file never does"):
        ArrayUnpickler.find_class(None, "os", "system")


def test_grid_names_stay_inside_the_grid_folders(tmp_path, monkeypatch):
    from ablations.errors import UserError
    from ablations.grid import GRIDS_DIR, grid_path

    (tmp_path / "grids").mkdir()
    (tmp_path / "secret.toml").write_text('title = "outside every grid folder"\n')
    (tmp_path / "grids" / "smoke.toml").write_text('title = "would shadow the shipped smoke grid"\n')
    (tmp_path / "grids" / "mine.toml").write_text('title = "a grid of my own"\n')
    monkeypatch.setenv("ABLATE_GRIDS_DIR", str(tmp_path / "grids"))
    assert grid_path("smoke") == GRIDS_DIR / "smoke.toml"  # a shipped name wins
    assert grid_path("mine") == tmp_path / "grids" / "mine.toml"
    for name in ("../secret", "grids/../secret", str(tmp_path / "secret"), "..", "secret.toml", "secret\x00",
                 "~/secret", "%2e%2e%2fsecret", "..\\secret"):
        with pytest.raises(UserError, match="is not a grid name"):
            grid_path(name)
