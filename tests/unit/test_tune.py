"""Selection seeds choose the tuned setting; confirmation seeds, at the chosen value only, measure the effect."""
import math

import pytest

from ablations.errors import UserError
from ablations.grid import confirmation_count, expand, load_grid, parse_grid
from ablations.tune import pick, position


def test_pick_takes_the_lowest_mean_and_breaks_ties_on_the_second_score():
    assert pick([(1, 5.0, 0.3), (1, 7.0, 0.3), (2, 5.5, 0.2), (2, 6.0, 0.2)]) == 2  # 5.75 < 6.0
    assert pick([(1, 10.0, 0.3), (2, 10.0, 0.26)]) == 2  # both censored at the cap: the one that got closer
    assert pick([(1, math.nan, 0.1)]) is None and pick([]) is None


def test_position_names_an_edge():
    assert "inside" in position([0.5, 1.0, 2.0], 1.0)
    assert "lowest" in position([0.5, 1.0, 2.0], 0.5) and "highest" in position([2.0, 0.5, 1.0], 2.0)


def test_confirmation_runs_appear_only_at_the_chosen_value():
    grid = load_grid("relu_vs_tanh")
    selection = expand(grid, "cpu")
    assert {s.seed for s in selection} == set(grid.tune["seeds"]) and len(selection) == 3 * 4 * 3
    chosen = expand(grid, "cpu", chooser=lambda specs: 2.0 if specs[0].model.activation == "tanh" else 0.5)
    confirmation = chosen[len(selection):]
    assert len(confirmation) == confirmation_count(grid, "cpu") == 3 * 4
    assert {s.seed for s in confirmation} == set(grid.seeds)
    for s in confirmation:
        assert dict(s.axes)["lr_scale"] == (2.0 if s.model.activation == "tanh" else 0.5)
    # each chooser call sees exactly one cell's selection runs: every lr_scale, every selection seed
    seen = []
    expand(grid, "cpu", chooser=lambda specs: seen.append(specs) or None)
    assert len(seen) == 4 and all(len(c) == 9 and len({(s.model.activation, dict(s.axes)["condition"])
                                                        for s in c}) == 1 for c in seen)


def test_selection_and_confirmation_seeds_must_differ(tmp_path):
    path = tmp_path / "g.toml"
    path.write_text('seeds = [0, 1]\n[run]\narch = "convnet4"\n[axes]\nlr_scale = [1.0, 2.0]\n'
                    '[tune]\naxis = "lr_scale"\nmetric = "epochs_to_target"\nseeds = [1, 2]\n')
    with pytest.raises(UserError, match="must differ"):
        parse_grid("g", path)
    path.write_text('seeds = [0]\n[run]\narch = "convnet4"\n[axes]\nlr_scale = [1.0, 2.0]\n'
                    '[tune]\naxis = "lr_scale"\nmetric = "test_error"\nseeds = [1]\n')
    with pytest.raises(UserError, match="test split decides nothing"):
        parse_grid("g", path)


TUNED_GRID = """title = "tuned: two rates chosen on seed 0, measured on seed 5"
seeds = [5]

[run]
arch = "convnet4"
epochs = 2
batch_size = 32
subset = 128
test_subset = 50
val_size = 40
precision = "fp32"

[early_stop]
metric = "train_error"
below = 0.5

[tune]
axis = "lr_scale"
metric = "epochs_to_target"
seeds = [0]

[axes]
activation = ["relu", "tanh"]
lr_scale = [0.01, 1.0]

[[claims]]
id = "relu-6x"
metric = "epochs_to_target"
axis = "activation"
a = "tanh"
b = "relu"
effect = "ratio"
paper = 6.0
tune = "lr_scale"
"""


def test_a_tuned_grid_runs_its_selection_then_its_confirmation_in_one_command(tmp_path, data_dir, monkeypatch):
    import dataclasses
    import json

    import pandas as pd
    from click.testing import CliRunner

    from reports.claims import evaluate
    from reports.load import load_grid as load_results_grid
    from runners.cli import main
    grids = tmp_path / "grids"
    grids.mkdir()
    (grids / "tuned.toml").write_text(TUNED_GRID)
    monkeypatch.setenv("ABLATE_GRIDS_DIR", str(grids))
    out = tmp_path / "out"
    ran = CliRunner().invoke(main, ["run", "--grid", "tuned", "--out", str(out), "--data-dir", str(data_dir),
                                    "--plain"])
    assert ran.exit_code == 0, ran.output
    assert "selection done; 2 confirmation runs at the chosen lr_scale" in ran.output
    runs = pd.read_csv(out / "tuned" / "runs.csv")
    assert sorted(runs.seed) == [0, 0, 0, 0, 5, 5]
    confirm = runs[runs.seed == 5]
    selection = runs[runs.seed == 0]
    for act in ("relu", "tanh"):  # the confirmation rate is the one that crossed soonest on the selection seed
        side = selection[selection.activation == act].assign(
            score=lambda d: d.epochs_to_target.fillna(d.epochs))
        best = side.sort_values(["score", "train_error"]).lr_scale.iloc[0]
        assert list(confirm[confirm.activation == act].lr_scale) == [best]
    assert json.loads((out / "tuned" / "grid.json").read_text())["run_seeds"] == [0, 5]
    (r,) = [r for r in evaluate(load_results_grid(out, "tuned")) if r.claim.id == "relu-6x"]
    assert "chosen on seeds 0, estimated on seeds 5" in r.selection
    from reports.load import coverage
    grid = load_results_grid(out, "tuned")
    assert coverage(grid) == ["selection: 4 of 4 cell(s) x 1 seed(s)",
                              "confirmation at the chosen lr_scale: 2 of 2 cell(s) x 1 seed(s)"], \
        "unchosen rates need no confirmation seeds"
    lacking = dataclasses.replace(grid, runs=grid.runs[grid.runs.seed != 5].reset_index(drop=True))
    assert coverage(lacking)[1].startswith("confirmation at the chosen lr_scale: 0 of 2 cell(s) x 1 seed(s) (short: ")
    again = CliRunner().invoke(main, ["run", "--grid", "tuned", "--out", str(out), "--data-dir", str(data_dir),
                                      "--plain"])
    assert again.exit_code == 0 and "6 already done" in again.output, again.output


def test_a_claim_cannot_tune_on_test_data(tmp_path):
    path = tmp_path / "g.toml"
    path.write_text('seeds = [0]\n[run]\narch = "convnet4"\n[axes]\nlr_scale = [1.0, 2.0]\nlrn = [false, true]\n'
                    '[[claims]]\nid = "x"\nmetric = "test_error"\naxis = "lrn"\na = false\nb = true\n'
                    'effect = "difference"\ntune = "lr_scale"\n')
    with pytest.raises(UserError, match="would choose its lr_scale on test data"):
        parse_grid("g", path)
