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
