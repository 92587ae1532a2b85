"""Grid specs: every shipped grid loads, expansion is the product of axes x zips x seeds, run ids are stable,
and every kind of spec error names the file, the key and what was expected."""
import dataclasses
from pathlib import Path

import pytest

from ablations.errors import UserError
from ablations.grid import expand, grid_names, grid_path, load_grid, parse_grid
from ablations.models import ModelSpec
from ablations.spec import RunSpec

SHIPPED = ["augmentation", "dropout", "gpus", "lrn", "lrn4", "pooling", "precision", "relu_vs_tanh", "smoke"]


def test_all_eight_grids_ship_and_load():
    assert grid_names() == SHIPPED
    for name in SHIPPED:
        grid = load_grid(name)
        specs = expand(grid)
        assert len({s.run_id for s in specs}) == len(specs), name  # no two runs of a grid collide
        assert grid.claims or name == "smoke"


def test_relu_vs_tanh_expansion_and_conditions():
    grid = load_grid("relu_vs_tanh")
    specs = expand(grid)
    assert len(specs) == 4 * 3 * 3  # (activation, condition) arms x lr_scale x selection seeds
    paper = [s for s in specs if dict(s.axes)["condition"] == "paper"]
    assert {s.preprocess for s in paper} == {"paper"} and {s.model.init for s in paper} == {"paper"}
    modern = [s for s in specs if dict(s.axes)["condition"] == "modern"]
    assert {s.preprocess for s in modern} == {"standard"} and {s.model.init for s in modern} == {"default"}
    assert all(s.model.arch == "convnet4" and s.weight_decay == 0 and s.augment == "none" for s in specs)
    assert all(s.early_stop_metric == "train_error" and s.early_stop_below == 0.25 for s in specs)
    # lr = the arm's centre rate x lr_scale, and the lr column shows the effective rate
    s = next(s for s in modern if dict(s.axes)["lr_scale"] == 2.0 and s.model.activation == "tanh")
    assert s.lr == pytest.approx(0.08) and dict(s.axes)["lr"] == pytest.approx(0.08)


def test_precision_grid_pairs_fp32_and_bf16_runs_of_each_model_by_seed():
    specs = expand(load_grid("precision"), "cpu")
    assert len(specs) == 20  # 2 precisions x 2 models x 5 seeds
    cells = {(s.precision, s.model.arch, s.seed) for s in specs}
    assert cells == {(p, a, seed) for p in ("fp32", "bf16") for a in ("alexnet", "convnet4") for seed in range(5)}
    for fp32 in (s for s in specs if s.precision == "fp32"):  # the bf16 twin differs in precision alone
        twin = dataclasses.replace(fp32, precision="bf16", axes=(), grid="")
        assert any(dataclasses.replace(s, axes=(), grid="") == twin for s in specs)
    (claim,) = load_grid("precision").claims
    assert claim["margin"] == 1.0 and claim["paper"] is None


def test_budget_and_overrides():
    grid = load_grid("lrn")
    cpu = expand(grid, "cpu")
    assert {s.model.width for s in cpu} == {0.25} and {s.seed for s in cpu} == {0, 1, 2}
    conditions = {(dict(s.axes)["condition"], s.preprocess, s.model.init) for s in cpu}
    # the cpu budget gives the paper row PyTorch's init (the paper's stays at chance at this size); gpu keeps it
    assert conditions == {("paper", "paper", "default"), ("modern", "standard", "default")}
    gpu = {(dict(s.axes)["condition"], s.preprocess, s.model.init) for s in expand(grid)}
    assert gpu == {("paper", "paper", "paper"), ("modern", "standard", "default")}
    small = expand(grid, "cpu", overrides={"epochs": 2, "width": 0.125}, seeds=[5])
    assert {(s.epochs, s.model.width, s.seed) for s in small} == {(2, 0.125, 5)}
    with pytest.raises(UserError, match="no budget 'tiny'"):
        expand(grid, "tiny")
    with pytest.raises(UserError, match="epochs must be >= 1"):
        expand(grid, overrides={"epochs": 0})
    with pytest.raises(UserError, match="lr must be > 0"):
        expand(grid, overrides={"lr": -0.1})
    cifar100 = expand(grid, overrides={"dataset": "cifar100"})
    assert {s.model.num_classes for s in cifar100} == {100}


def test_a_budget_gives_each_row_of_a_zip_its_own_setting(tmp_path):
    """A per-arm epoch cap (the dropout arm twice the other's): the other arm, and the gpu budget, keep theirs, so
    the runs the budget did not change keep their ids."""
    text = ("seeds = [0, 1]\n[run]\narch = 'alexnet'\nepochs = 90\n[zip.dropout]\ndropout = [0.0, 0.5]\n"
            "[budgets.cpu]\nepochs = 40\n")
    flat = parse_grid("g", _write(tmp_path, text))
    grid = parse_grid("g", _write(tmp_path, text + "[budgets.cpu.zip.dropout]\nepochs = [40, 80]\n"))
    assert {(s.model.dropout, s.epochs) for s in expand(grid, "cpu")} == {(0.0, 40), (0.5, 80)}
    assert {s.epochs for s in expand(grid)} == {90}
    same = {s.run_id for s in expand(flat, "cpu") if s.model.dropout == 0.0}
    assert same == {s.run_id for s in expand(grid, "cpu") if s.model.dropout == 0.0}
    assert not {s.run_id for s in expand(flat, "cpu")} & {s.run_id for s in expand(grid, "cpu")
                                                          if s.model.dropout == 0.5}


def test_a_claim_reads_a_side_on_another_metric_only_where_it_says_which():
    from ablations.claims import check_claim
    axes = {"level": ["a", "b"]}
    base = {"id": "c", "metric": "test_error", "axis": "level", "a": "a", "b": "a", "effect": "difference"}
    assert check_claim({**base, "a_metric": "test_error_1view"}, 0, "g.toml", axes)["a_metric"] == "test_error_1view"
    with pytest.raises(UserError, match="compares runs with themselves"):
        check_claim(base, 0, "g.toml", axes)
    with pytest.raises(UserError, match="compares runs with themselves"):
        check_claim({**base, "a_metric": "test_error"}, 0, "g.toml", axes)
    with pytest.raises(UserError, match="b_metric must be an error metric"):
        check_claim({**base, "b": "b", "b_metric": "test_eror"}, 0, "g.toml", axes)
    tencrop = next(c for c in load_grid("augmentation").claims if c["id"] == "augment-10crop")
    assert tencrop["a"] == tencrop["b"] and tencrop["a_metric"] == "test_error_1view"


def test_a_claim_declares_its_secondary_lines_or_gets_every_one_that_fits():
    from ablations.claims import claim_from_table
    relu = next(c for c in load_grid("relu_vs_tanh").claims if c["id"] == "relu-6x")
    assert relu["also"] == ["seconds"] and claim_from_table(relu).also == ("seconds",)
    speed = next(c for c in load_grid("gpus").claims if c["id"] == "data-parallel")
    assert claim_from_table(speed).also == ("efficiency",)
    lrn = next(c for c in load_grid("lrn4").claims if c["id"] == "lrn-4layer")
    assert lrn["also"] == ["top5"]  # not declared: the default for a test-error difference
    old = {k: v for k, v in speed.items() if k != "also"}  # a grid.json written before `also` existed
    assert claim_from_table(old).also == ("efficiency", "accuracy")
    assert claim_from_table({**lrn, "also": []}).also == ()


def _other(value):
    if isinstance(value, bool):
        return not value
    if isinstance(value, str):
        return value + "x"
    return value + 1 if isinstance(value, int) else value + 0.5


def test_run_id_stable_and_sensitive():
    base = RunSpec(model=ModelSpec(), grid="a", axes=(("x", 1),))
    assert base.run_id == RunSpec(model=ModelSpec(), grid="b", axes=()).run_id  # labels are not hashed
    assert base.run_id == RunSpec.from_json(base.to_json()).run_id
    for f in dataclasses.fields(RunSpec):
        if f.name in ("model", "grid", "axes"):
            continue
        changed = _other(getattr(base, f.name))
        assert dataclasses.replace(base, **{f.name: changed}).run_id != base.run_id, f.name
    for f in dataclasses.fields(ModelSpec):
        model = dataclasses.replace(base.model, **{f.name: _other(getattr(base.model, f.name))})
        assert dataclasses.replace(base, model=model).run_id != base.run_id, f.name


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "g.toml"
    path.write_text(text)
    return path


GOOD = """
seeds = [0]
[run]
arch = "alexnet"
epochs = 2
[axes]
activation = ["relu", "tanh"]
"""

BAD_SPECS = [
    ("[run]\nepochs = 0\n", "epochs must be >= 1"),
    ("[run]\nepochs = 'ten'\n", "expected int for 'epochs'"),
    ("[run]\nlr = -1.0\n", "lr must be > 0"),
    ("[run]\nbatch_size = 0\n", "batch_size must be >= 1"),
    ("[run]\nbogus = 1\n", "unknown setting 'bogus'"),
    ("[axes]\nactivation = []\n", "non-empty list"),
    ("[axes]\nactivation = ['relu', 'relu']\n", "values repeat"),
    ("[axes]\nactivation = ['relu', 'swish']\n", "'swish' is not a valid activation"),
    ("[axes]\nflavour = [1, 2]\n", "unknown axis 'flavour'"),
    ("[axes]\nlrn = [true, false]\n[zip.z]\nz = ['a', 'b']\nlrn = [true, false]\n", "given twice"),
    ("[zip.z]\nz = ['a', 'b']\nlr = [0.1]\n", "same length"),
    ("seeds = []\n", "seeds"),
    ("seeds = [1, 1]\n", "seeds"),
    ("colour = 'red'\n", "unknown top-level key 'colour'"),
    ("[axes]\nlrn = [true, false]\n[[claims]]\nid = 'x'\nmetric = 'test_error'\naxis = 'lrn'\n"
     "a = true\nb = 'maybe'\neffect = 'difference'\n", "b = 'maybe' is not a value"),
    ("[axes]\nlrn = [true, false]\n[[claims]]\nid = 'x'\nmetric = 'test_error'\naxis = 'lrn'\n"
     "a = true\nb = false\neffect = 'sum'\n", "effect must be"),
    ("[axes]\nlrn = [true, false]\n[[claims]]\nid = 'x'\nmetric = 'test_error'\naxis = 'lrn'\n"
     "a = true\nb = false\neffect = 'difference'\nmargin = -1.0\n", "margin .* must be a number > 0"),
    ("[axes]\nlrn = [true, false]\n[[claims]]\nid = 'x'\nmetric = 'test_error'\naxis = 'lrn'\n"
     "a = true\nb = false\neffect = 'difference'\nmargin = 1.0\npaper = 1.4\n", "a paper number or a margin"),
    ("[run\n", "not valid TOML"),
    ("[axes]\nlrn = [true, false]\n[[claims]]\nid = 'x'\nmetric = 'test_error'\naxis = 'lrn'\n"
     "a = true\nb = false\neffect = 'difference'\nalso = ['movie']\n", "also must be a list of"),
    ("[axes]\nlrn = [true, false]\n[[claims]]\nid = 'x'\nmetric = 'test_error'\naxis = 'lrn'\n"
     "a = true\nb = false\neffect = 'difference'\nalso = ['seconds']\n", "'seconds' cannot follow this claim"),
    ("[zip.z]\nz = ['a', 'b']\n[budgets.cpu.zip.y]\nepochs = [1, 2]\n", "not a zip of this grid"),
    ("[zip.z]\nz = ['a', 'b']\n[budgets.cpu.zip.z]\nepochs = [1, 2, 3]\n", "one value per row of zip.z"),
    ("[zip.z]\nz = ['a', 'b']\n[budgets.cpu.zip.z]\nepochs = [0, 2]\n", "epochs must be >= 1"),
    ("[zip.z]\nz = ['a', 'b']\n[budgets.cpu.zip.z]\nz = ['c', 'd']\n", "the zip's own values"),
    ("[axes]\nlrn = [true, false]\n[zip.z]\nz = ['a', 'b']\n[budgets.cpu.zip.z]\nlrn = [true, false]\n",
     "'lrn' is already an axis"),
]


@pytest.mark.parametrize("text,message", BAD_SPECS)
def test_bad_specs_name_file_key_and_expectation(tmp_path, text, message):
    path = _write(tmp_path, text)
    with pytest.raises(UserError, match=message) as err:
        parse_grid("g", path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


def test_good_spec_parses(tmp_path):
    grid = parse_grid("g", _write(tmp_path, GOOD))
    assert [dict(s.axes)["activation"] for s in expand(grid)] == ["relu", "tanh"]


@pytest.mark.parametrize("name", ["../../etc/passwd", "/etc/passwd", "smoke.toml", "..", "", "a/b"])
def test_grid_names_cannot_escape_the_grids_folder(name):
    with pytest.raises(UserError, match="not a grid name|unknown grid"):
        grid_path(name)


def test_unknown_grid_lists_known():
    with pytest.raises(UserError, match="known grids: augmentation"):
        load_grid("nope")


def test_key_value_overrides_reach_every_spec_and_its_run_id():
    from ablations.grid import parse_overrides
    grid = load_grid("lrn")
    base = expand(grid, "cpu")
    over = expand(grid, "cpu", overrides=parse_overrides(["lr=0.02", "augment=none", "axes.lrn=[true]"]))
    assert {s.lr for s in over} == {0.02} and {s.augment for s in over} == {"none"}
    assert {s.model.lrn for s in over} == {True} and len(over) == len(base) // 2
    assert not {s.run_id for s in over} & {s.run_id for s in base}  # another setting: another run id
    assert parse_overrides(['augment="flip"', "dropout=0.5", "lrn=true"]) == {"augment": "flip", "dropout": 0.5,
                                                                             "lrn": True}
    with pytest.raises(UserError, match="not a Cartesian axis"):
        expand(grid, "cpu", overrides=parse_overrides(["axes.pooling=[\"seed\"]"]))


@pytest.mark.parametrize("value,seeds", [("3", [0, 1, 2]), ("0,4,7", [0, 4, 7]), ("5,", [5]), ("0,", [0])])
def test_seeds_option_reads_a_count_or_a_list_where_a_comma_makes_a_list_of_one(value, seeds):
    from runners.cli import _parse_seeds
    assert _parse_seeds(value) == seeds


@pytest.mark.parametrize("value", ["0", ",", "-1", "1,1"])
def test_seeds_option_refuses_no_seeds_negative_or_repeated_ones(value):
    from runners.cli import _parse_seeds
    with pytest.raises(UserError, match="--seeds"):
        _parse_seeds(value)
