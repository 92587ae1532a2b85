"""The report: statistics against known answers, planted effects recovered with the right verdicts, censoring,
tuning, per-condition rows, and a rendered report from a small synthetic results folder written by
`write_grid` exactly as results/<grid>/{grid.json, runs.csv, epochs.csv} are laid out by `ablate run`."""
import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from ablations.errors import UserError
from ablations.claims import Claim
from reports.claims import claims_of, evaluate, keyed, split_axes
from reports.verdicts import (EQUIVALENT, INCONCLUSIVE, LARGER, MEASURED, NOT_EQUIVALENT, NOT_REPRODUCED,
                              NOT_TESTABLE, OPPOSITE, REPRODUCED, SMALLER, VERDICTS, verdict)
from reports.load import load_grid, load_results
from reports.stats import Interval, bootstrap, compare, mean_ci, paired_ratio, t_critical

# ---------------------------------------------------------------- the builder


def write_grid(root: Path, name: str, runs: list[dict], claims: list[dict], *, epochs: int = 10,
               seeds: list[int] | None = None, budget: str = "gpu", dataset: str = "cifar10",
               target: float | None = 0.25, loss_target: float | None = None,
               extra_meta: dict | None = None) -> Path:
    """Write results/<name>/ as the runner does. Each run dict holds its axis values, `seed`, and optionally
    epochs_to_target (None = never reached), test_error, train_error, images_per_second, status, epochs_to_loss."""
    gdir = root / name
    gdir.mkdir(parents=True)
    metric_keys = {"seed", "epochs_to_target", "test_error", "train_error", "images_per_second", "status",
                   "val_fingerprint",
                   "epochs_to_loss", "test_error_top5", "learned", "clean_train_error", "converged", "train_loss",
                   "lrn_factor_spread", "test_error_1view"}
    axes = list(dict.fromkeys(k for r in runs for k in r if k not in metric_keys))
    label = "CIFAR-10 (synthetic test copy)" if dataset == "cifar10" else "CIFAR-100 (synthetic)"
    meta = {"name": name, "title": f"{name} grid", "description": "synthetic", "model": "alexnet",
            "dataset": dataset, "axes": axes, "claims": claims, "seeds": seeds or sorted({r["seed"] for r in runs}),
            "early_stop": {"metric": "train_error", "below": target} if target else None, "epochs": epochs,
            "budget": budget, "command": f"ablate run --grid {name} --budget {budget}", "dataset_label": label}
    meta.update(extra_meta or {})
    (gdir / "grid.json").write_text(json.dumps(meta))
    rows, epoch_rows = [], []
    for i, r in enumerate(runs):
        run_id = f"{name[:4]}{i:04d}"
        reach = r.get("epochs_to_target")
        reach = reach if reach is not None and reach <= epochs else None  # past the cap: never reached
        n_ep = math.ceil(reach) if (target and reach) else epochs
        final_train = r.get("train_error", 0.24 if (target and reach) else 0.3)
        start = 0.9
        curve = [start + (final_train - start) * e / n_ep for e in range(1, n_ep + 1)]  # linear to the final value
        test_final = r.get("test_error", 0.3)
        ips = r.get("images_per_second", 1000.0)
        cum = np.cumsum([50_000 / ips] * n_ep)
        for e in range(1, n_ep + 1):
            epoch_rows.append({"run_id": run_id, "grid": name, **{a: r[a] for a in axes}, "seed": r["seed"],
                               "epoch": e, "lr": r.get("lr", 0.01), "train_loss": 2.3 * curve[e - 1],
                               "train_error": curve[e - 1], "test_loss": 2.3 * test_final,
                               "test_error": test_final + 0.2 * (n_ep - e) / n_ep, "test_error_top5": 0.1,
                               "epoch_seconds": cum[0], "images_per_second": ips, "cum_seconds": cum[e - 1]})
        reached = bool(target and reach)
        rows.append({"run_id": run_id, "grid": name, "status": r.get("status", "finished"),
                     "stop_reason": "early_stop" if reached else "epochs", **{a: r[a] for a in axes},
                     **{k: r[k] for k in ("learned", "clean_train_error", "converged", "lrn_factor_spread",
                                          "test_error_1view") if k in r},
                     "seed": r["seed"], "epochs": epochs, "epochs_run": n_ep,
                     "train_loss": r.get("train_loss", 2.3 * final_train),
                     "train_error": final_train, "test_loss": 2.3 * test_final, "test_error": test_final,
                     "test_error_top5": r.get("test_error_top5", 0.1), "best_test_error": test_final,
                     "target_metric": "train_error" if target else None, "target_value": target,
                     "epochs_to_target": reach if reached else None,
                     "seconds_to_target": float(cum[math.ceil(reach) - 1]) if reached else None,
                     "reached_target": reached if target else None,
                     "epochs_to_loss": r.get("epochs_to_loss"), "loss_target": loss_target,
                     "wall_seconds": float(cum[-1]) + 5, "train_seconds": float(cum[-1]), "images_per_second": ips,
                     "dataset": dataset, "dataset_label": label, "precision": r.get("precision", "bf16"),
                     "device": "cpu",
                     "device_name": "test cpu", "devices": r.get("devices", 1), "world_size": r.get("devices", 1),
                     "torch_version": "2.14.1", "width": 1.0, "subset": None, "budget": budget,
                     "val_fingerprint": r.get("val_fingerprint", "0123456789ab"),
                     "model_params": 1000, "flops_per_image": 1e6})
    pd.DataFrame(rows).to_csv(gdir / "runs.csv", index=False)
    pd.DataFrame(epoch_rows).to_csv(gdir / "epochs.csv", index=False)
    return gdir


RELU_CLAIM = {"id": "relu-6x", "paper_claim": "relu-6x", "title": "ReLU 6x faster", "metric": "epochs_to_target",
              "axis": "activation", "a": "tanh", "b": "relu", "effect": "ratio", "paper": 6.0, "tune": "lr"}
LRN_CLAIM = {"id": "lrn", "paper_claim": "lrn", "title": "LRN lowers test error", "metric": "test_error",
             "axis": "lrn", "a": False, "b": True, "effect": "difference", "paper": 1.4}


def relu_runs(seeds, relu=(5.0, 0.5), tanh=(30.0, 2.0), rng_seed=0, condition=None):
    """relu is fastest at lr 0.1, tanh at lr 0.01; the other rate is slower for each (so tuning matters)."""
    rng = np.random.default_rng(rng_seed)
    runs = []
    for seed in seeds:
        for act, (mu, sd), best in (("relu", relu, 0.1), ("tanh", tanh, 0.01)):
            for lr in (0.01, 0.1):
                slow = 1.0 if lr == best else 1.8
                epochs = max(1, int(round(slow * (mu + sd * rng.standard_normal()))))
                extra = {"condition": condition} if condition else {}
                runs.append({"activation": act, "lr": lr, **extra, "seed": seed, "epochs_to_target": epochs})
    return runs


def lrn_runs(seeds, effect_points, noise_points=0.3, rng_seed=1):
    rng = np.random.default_rng(rng_seed)
    runs = []
    for seed in seeds:
        base = 0.25 + 0.02 * rng.standard_normal()  # a per-seed offset shared by both sides: pairing removes it
        for lrn in (False, True):
            err = base + (effect_points / 100 if not lrn else 0) + noise_points / 100 * rng.standard_normal()
            runs.append({"lrn": lrn, "seed": seed, "test_error": err, "train_error": err - 0.05})
    return runs


def only(results, claim_id):
    return [r for r in results if r.claim.id == claim_id]


# ---------------------------------------------------------------- statistics against known answers

def test_t_critical_matches_tables():
    known = {1: 12.7062, 2: 4.3027, 4: 2.7764, 9: 2.2622, 29: 2.0452, 120: 1.9799}
    for df, t in known.items():
        assert t_critical(0.95, df) == pytest.approx(t, abs=1e-4), df
    assert t_critical(0.90, 10) == pytest.approx(1.8125, abs=1e-4)


def test_mean_ci_formula_and_single_value():
    iv = mean_ci([1, 2, 3, 4, 5])
    half = 2.776445 * math.sqrt(2.5) / math.sqrt(5)  # t(0.975, 4) * sd / sqrt(n)
    assert (iv.estimate, iv.lo, iv.hi) == pytest.approx((3, 3 - half, 3 + half), abs=1e-5)
    one = mean_ci([7.0, float("nan")])
    assert one.estimate == 7 and not one.has_interval and one.method == "single"


def test_bootstrap_of_a_constant_is_the_constant():
    for paired in (True, False):
        iv = bootstrap([5.0] * 4, [2.0] * 4, "ratio", paired=paired)
        assert (iv.estimate, iv.lo, iv.hi) == pytest.approx((2.5, 2.5, 2.5))
    iv = bootstrap([5.0, 5.0, 5.0], [2.0, 2.0], "difference", paired=False)
    assert (iv.lo, iv.hi) == pytest.approx((3.0, 3.0))


def test_bootstrap_is_reproducible_and_covers_the_mean_difference():
    rng = np.random.default_rng(0)
    a, b = rng.normal(10, 1, 6), rng.normal(8, 1, 5)
    first, second = bootstrap(a, b, "difference", paired=False), bootstrap(a, b, "difference", paired=False)
    assert first == second
    assert first.lo < a.mean() - b.mean() < first.hi


def test_paired_ratio_is_a_geometric_mean_with_log_t_interval():
    iv = paired_ratio([2.0, 8.0, 4.0], [1.0, 2.0, 1.0])  # per-seed ratios 2, 4, 4
    logs = np.log([2, 4, 4])
    half = 4.302653 * logs.std(ddof=1) / math.sqrt(3)
    assert iv.estimate == pytest.approx(math.exp(logs.mean()))
    assert (iv.lo, iv.hi) == pytest.approx((math.exp(logs.mean() - half), math.exp(logs.mean() + half)))
    assert compare([3.0], [1.0], "ratio", paired=True).method == "single"


# ---------------------------------------------------------------- claims and verdicts

def test_planted_6x_is_recovered_and_tuning_picks_each_sides_best_lr(tmp_path):
    write_grid(tmp_path, "relu_vs_tanh", relu_runs(range(5)), [RELU_CLAIM], epochs=60)
    grid = load_grid(tmp_path, "relu_vs_tanh")
    (r,) = only(evaluate(grid), "relu-6x")
    assert r.tuned_a == "0.01" and r.tuned_b == "0.1"  # tanh best at 0.01, relu at 0.1
    runs = grid.runs.set_index("run_id")
    assert set(runs.loc[list(r.runs_a), "lr"]) == {0.01} and set(runs.loc[list(r.runs_b), "lr"]) == {0.1}
    assert r.paired and r.interval.n == 5 and r.n_text == "5"
    assert r.interval.lo <= 6.0 <= r.interval.hi and 4 < r.interval.estimate < 8
    assert r.verdict == REPRODUCED and r.bound == ""
    assert "tanh: lr 0.01" in r.selection and "relu: lr 0.1" in r.selection
    assert "chosen and estimated on the same seeds" in r.selection  # no [tune] table: said to be optimistic
    (sec,) = only(evaluate(grid), "relu-6x/seconds")  # the same runs, in training seconds, as a secondary line
    assert sec.claim.secondary and sec.runs_a == r.runs_a and sec.verdict.startswith(MEASURED)


def test_zero_effect_is_not_reproduced_when_the_paper_is_excluded_else_inconclusive(tmp_path):
    write_grid(tmp_path, "lrn", lrn_runs(range(5), effect_points=0.0), [LRN_CLAIM], target=None)
    (r,) = evaluate(load_grid(tmp_path, "lrn"))
    assert r.interval.lo < 0 < r.interval.hi < 1.4 and r.verdict == NOT_REPRODUCED
    assert "includes no effect (0) and excludes the paper's +1.40 pts" in r.reason
    for lo, hi, expected in ((-0.5, 1.3, NOT_REPRODUCED), (-0.5, 1.5, INCONCLUSIVE), (-0.5, 1.4, INCONCLUSIVE)):
        assert verdict(Interval((lo + hi) / 2, lo, hi, 5, "paired t"), r.claim) == expected


@pytest.mark.parametrize("effect, expected", [(-2.0, OPPOSITE), (0.5, SMALLER), (1.4, REPRODUCED), (3.0, LARGER)])
def test_difference_verdicts(tmp_path, effect, expected):
    write_grid(tmp_path, "lrn", lrn_runs(range(4), effect_points=effect, noise_points=0.05), [LRN_CLAIM],
               target=None)
    (r,) = evaluate(load_grid(tmp_path, "lrn"))
    assert r.interval.estimate == pytest.approx(effect, abs=0.15)  # in percentage points
    assert r.verdict == expected


PARITY_CLAIM = {"id": "bf16-parity", "title": "bf16 within 1 point", "metric": "test_error", "axis": "precision",
                "a": "bf16", "b": "fp32", "effect": "difference", "margin": 1.0}


def precision_runs(seeds, effect_points, noise_points, rng_seed=2):
    rng = np.random.default_rng(rng_seed)
    runs = []
    for seed in seeds:
        base = 0.30 + 0.03 * rng.standard_normal()  # the seed's own level, shared by its fp32 and bf16 runs
        for precision in ("fp32", "bf16"):
            shift = effect_points / 100 if precision == "bf16" else 0.0
            err = base + shift + noise_points / 100 * rng.standard_normal()
            runs.append({"precision": precision, "seed": seed, "test_error": err, "train_error": err - 0.05})
    return runs


@pytest.mark.parametrize("effect, noise, expected", [(0.1, 0.05, EQUIVALENT), (3.0, 0.05, NOT_EQUIVALENT),
                                                     (-3.0, 0.05, NOT_EQUIVALENT), (0.5, 2.0, INCONCLUSIVE)])
def test_a_margin_claim_is_an_equivalence_test(tmp_path, effect, noise, expected):
    write_grid(tmp_path, "precision", precision_runs(range(3), effect, noise), [PARITY_CLAIM], target=None)
    (r,) = evaluate(load_grid(tmp_path, "precision"))
    assert r.interval.estimate == pytest.approx(effect, abs=0.1 + 2 * noise)
    assert r.verdict.split(":")[0] == expected and r.paper_text() == "within ±1 pts (our margin)"
    row = r.row()
    assert row["margin"] == 1.0 and row["precision"] == "bf16, fp32" and math.isnan(row["paper"] or math.nan)


def test_equivalence_needs_the_whole_interval_strictly_inside_the_margin():
    claim = Claim(id="p", paper_claim="p", title="p", metric="test_error", axis="precision", a="bf16", b="fp32",
                  effect="difference", margin=1.0)

    def v(lo, hi):
        return verdict(Interval((lo + hi) / 2, lo, hi, 3, "paired t"), claim).split(":")[0]

    assert v(-0.9, 0.9) == EQUIVALENT
    assert v(-1.0, 0.5) == INCONCLUSIVE and v(0.2, 1.0) == INCONCLUSIVE  # touching the margin is not inside
    assert v(1.0, 2.0) == NOT_EQUIVALENT and v(-3.0, -1.0) == NOT_EQUIVALENT
    assert v(-1.5, 1.5) == INCONCLUSIVE


def test_censored_runs_count_at_the_cap_and_make_a_lower_bound(tmp_path):
    runs = [{"activation": "relu", "seed": s, "epochs_to_target": 3} for s in range(3)]
    runs += [{"activation": "tanh", "seed": 0, "epochs_to_target": None},
             {"activation": "tanh", "seed": 1, "epochs_to_target": None},
             {"activation": "tanh", "seed": 2, "epochs_to_target": 9}]
    write_grid(tmp_path, "relu_vs_tanh", runs, [{**RELU_CLAIM, "tune": None}], epochs=10)
    (r,) = only(evaluate(load_grid(tmp_path, "relu_vs_tanh")), "relu-6x")
    assert r.censored_a == 2 and r.censored_b == 0 and r.bound == "lower"
    assert r.interval.estimate == pytest.approx((10 / 3 * 10 / 3 * 3) ** (1 / 3))  # tanh counted as 10, 10, 9
    assert r.ours_text().startswith("≥ 3.22x (") and "2 of 3 tanh runs censored at 10 epochs" in r.ours_text()
    assert "[" not in r.ours_text()  # a bound, never an interval
    assert r.verdict == NOT_TESTABLE  # a bound below 6x cannot exclude 6x
    assert "tanh took at least 3.22x as long as relu; the paper's 6.00x is not excluded" in r.reason


def test_a_side_can_be_read_on_another_metric_of_the_same_runs(tmp_path):
    """The 10-crop claim compares two readings of one net (a = b, a_metric the plain view), paired by seed; the
    PCA claim reads the 10-crop runs on their plain view against crop_flip's."""
    runs = []
    for seed, (crop, one, ten) in enumerate([(0.300, 0.290, 0.280), (0.310, 0.295, 0.270), (0.305, 0.300, 0.285)]):
        runs.append({"level": "crop_flip", "seed": seed, "test_error": crop})
        runs.append({"level": "pca_10crop", "seed": seed, "test_error": ten, "test_error_1view": one})
    claims = [{"id": "tencrop", "metric": "test_error", "axis": "level", "a": "pca_10crop", "b": "pca_10crop",
               "a_metric": "test_error_1view", "effect": "difference", "paper": 1.5},
              {"id": "pca", "metric": "test_error", "axis": "level", "a": "crop_flip", "b": "pca_10crop",
               "b_metric": "test_error_1view", "effect": "difference", "paper": 1.0}]
    write_grid(tmp_path, "aug", runs, claims, target=None)
    results = evaluate(load_grid(tmp_path, "aug"))
    (ten,), (pca,) = only(results, "tencrop"), only(results, "pca")
    assert ten.paired and ten.runs_a == ten.runs_b and ten.interval.n == 3
    assert ten.interval.estimate == pytest.approx(100 * np.mean([0.010, 0.025, 0.015]))
    assert pca.paired and pca.interval.estimate == pytest.approx(100 * np.mean([0.010, 0.015, 0.005]))
    row = ten.row()
    assert (row["metric_a"], row["metric_b"]) == ("test_error_1view", "test_error")
    assert pca.row()["metric_a"] == "test_error" and pca.row()["metric_b"] == "test_error_1view"
    from reports.verdicts import side_label
    assert side_label(ten.claim, "a") == "pca_10crop (test_error_1view)"
    assert side_label(ten.claim, "b") == "pca_10crop (test_error)" and side_label(pca.claim, "a") == "crop_flip"


def test_coverage_names_runs_the_grid_file_defines_that_have_not_run(tmp_path):
    """A cell with no run at all has no row to count seeds in: the coverage note counts the grid file's own runs."""
    from ablations.grid import expand, load_grid as grid_file
    from reports.load import coverage
    specs = expand(grid_file("smoke"), "gpu")
    done = [s for s in specs if dict(s.axes)["activation"] == "relu"]  # every tanh cell still to run
    write_grid(tmp_path, "smoke", [{**dict(s.axes), "seed": s.seed} for s in done], [], target=None)
    runs = pd.read_csv(tmp_path / "smoke" / "runs.csv").assign(run_id=[s.run_id for s in done])
    runs.to_csv(tmp_path / "smoke" / "runs.csv", index=False)
    notes = coverage(load_grid(tmp_path, "smoke"))
    assert f"{len(specs) - len(done)} of the {len(specs)} runs the grid file defines are not done yet" in notes[0]
    assert not any(n.startswith("complete") for n in notes) and "" not in notes
    from reports.render import build_report, readme_block
    assert readme_block(build_report(tmp_path, ["smoke"]))[-1] == (
        f"Runs the grid files define that are not trained yet: smoke {len(specs) - len(done)} of {len(specs)} "
        f"(`ablate run --grid smoke --budget gpu`).")
    write_grid(tmp_path / "all", "smoke", [{**dict(s.axes), "seed": s.seed} for s in specs], [], target=None)
    runs = pd.read_csv(tmp_path / "all" / "smoke" / "runs.csv").assign(run_id=[s.run_id for s in specs])
    runs.to_csv(tmp_path / "all" / "smoke" / "runs.csv", index=False)
    assert any(n.startswith("complete: 4 cell(s) x 2 seed(s)") for n in coverage(load_grid(tmp_path / "all", "smoke")))
    assert "not trained yet" not in " ".join(readme_block(build_report(tmp_path / "all", ["smoke"])))


def test_the_cell_table_counts_converged_runs_where_training_has_no_target(tmp_path):
    from reports.render import _cells, _cells_markdown
    runs = [{"lrn": lrn, "seed": s, "test_error": 0.3, "converged": lrn or s == 0} for lrn in (False, True)
            for s in range(3)]
    write_grid(tmp_path, "lrn", runs, [LRN_CLAIM], target=None)
    grid = load_grid(tmp_path, "lrn")
    lines = _cells_markdown(grid, _cells(grid))
    assert lines[0].startswith("| lrn | n | converged |")
    assert lines[2].startswith("| False | 3 | 1 of 3 |") and lines[3].startswith("| True | 3 | 3 of 3 |")
    write_grid(tmp_path / "t", "lrn", runs, [LRN_CLAIM], target=0.25)  # runs that stop at a target: no column
    grid = load_grid(tmp_path / "t", "lrn")
    assert "converged" not in _cells_markdown(grid, _cells(grid))[0]


def test_one_seed_gives_no_interval_and_says_so(tmp_path):
    write_grid(tmp_path, "lrn", lrn_runs([0], effect_points=1.0), [LRN_CLAIM], target=None)
    (r,) = evaluate(load_grid(tmp_path, "lrn"))
    assert r.verdict == INCONCLUSIVE and "single seed: no interval" in r.ours_text()
    assert r.reason == "a single seed pair: no interval, so no verdict"
    assert not math.isnan(r.interval.estimate) and r.n_text == "1"


def test_claim_splits_per_condition_not_per_zipped_partner(tmp_path):
    runs = []
    for condition, base, tanh in (("paper", 0.0005, 30.0), ("modern", 0.02, 7.0)):
        for r in relu_runs(range(3), tanh=(tanh, 0.5), condition=condition):
            scale = r.pop("lr") * 10  # lr_scale 0.1 or 1; the effective lr moves with condition and scale
            runs.append({**r, "lr_scale": scale, "preprocess": {"paper": "paper"}.get(condition, "standard"),
                         "lr": base * scale})
    claim = {**RELU_CLAIM, "tune": "lr_scale"}
    write_grid(tmp_path, "relu_vs_tanh", runs, [claim], epochs=60)
    grid = load_grid(tmp_path, "relu_vs_tanh")
    assert split_axes(keyed(grid.runs, grid.axes), grid.axes, claims_of(grid)[0]) == ["condition"]
    rows = {r.split: r for r in only(evaluate(grid), "relu-6x")}
    assert set(rows) == {(("condition", "modern"),), (("condition", "paper"),)}
    assert rows[(("condition", "paper"),)].verdict == REPRODUCED
    assert rows[(("condition", "modern"),)].verdict == SMALLER  # ~1.4x: same direction, below 6x
    assert "(lr 0.0005)" in rows[(("condition", "paper"),)].selection


def test_seeds_that_do_not_pair_fall_back_to_an_unpaired_bootstrap(tmp_path):
    runs = [r for r in lrn_runs(range(6), effect_points=2.0, noise_points=0.1)
            if (r["lrn"] and r["seed"] >= 3) or (not r["lrn"] and r["seed"] < 3)]
    write_grid(tmp_path, "lrn", runs, [LRN_CLAIM], target=None)
    (r,) = evaluate(load_grid(tmp_path, "lrn"))
    assert not r.paired and r.interval.method == "bootstrap" and r.n_text == "3+3 (unpaired)"
    assert "seeds do not pair: unpaired bootstrap" in r.notes


def test_data_parallel_gets_efficiency_and_cifar100_gets_top5(tmp_path):
    claims = [{"id": "data-parallel", "metric": "images_per_second", "axis": "devices", "a": 2, "b": 1,
               "effect": "ratio"}, {**LRN_CLAIM, "axis": "devices", "a": 1, "b": 2, "id": "acc", "paper": None}]
    runs = [{"devices": d, "seed": s, "images_per_second": 1000.0 * (1.8 if d == 2 else 1) + 10 * s}
            for d in (1, 2) for s in range(3)]
    write_grid(tmp_path, "gpus", runs, claims, target=None, dataset="cifar100")
    results = evaluate(load_grid(tmp_path, "gpus"))
    ids = [r.claim.id for r in results]
    assert ids == ["data-parallel", "data-parallel/efficiency", "data-parallel/accuracy", "acc", "acc/top5"]
    speed, eff = results[0], results[1]
    assert eff.interval.estimate == pytest.approx(speed.interval.estimate / 2)
    assert eff.ours_text().startswith("90%")
    views = [{**LRN_CLAIM, "axis": "devices", "a": 1, "b": 1, "a_metric": "test_error_1view", "id": "views",
              "also": ["top5"]}]  # no plain-view top-5 is recorded: no top-5 line
    write_grid(tmp_path / "v", "gpus", runs, views, target=None, dataset="cifar100")
    assert [c.id for c in claims_of(load_grid(tmp_path / "v", "gpus"))] == ["views"]


# ---------------------------------------------------------------- loading errors and the rendered report

def test_truncated_or_missing_runs_csv_is_a_clear_error(tmp_path):
    gdir = write_grid(tmp_path, "lrn", lrn_runs(range(2), 1.0), [LRN_CLAIM], target=None)
    text = (gdir / "runs.csv").read_text()
    (gdir / "runs.csv").write_text(text[: len(text) // 2])
    with pytest.raises(UserError, match=r"runs\.csv is truncated.*ablate run --grid lrn"):
        load_results(tmp_path)
    (gdir / "runs.csv").unlink()
    (gdir / "runs" / "abc123").mkdir(parents=True)
    (gdir / "runs" / "abc123" / "summary.json").write_text("{}")  # a finished run that no aggregate lists
    with pytest.raises(UserError, match=r"runs\.csv is missing but 1 run folders exist.*ablate run --grid lrn"):
        load_results(tmp_path)
    with pytest.raises(UserError, match=r"no results for grid 'nope'.*grids with results: lrn"):
        load_results(tmp_path, ["nope"])


def test_cli_error_is_one_line_without_traceback(tmp_path):
    from runners.cli import main

    gdir = write_grid(tmp_path, "lrn", lrn_runs(range(2), 1.0), [LRN_CLAIM], target=None)
    (gdir / "runs.csv").write_text("run_id,grid,status\nabc,lrn,fini")
    result = CliRunner().invoke(main, ["report", "--results", str(tmp_path)])
    assert result.exit_code == 2
    assert result.output.strip().count("\n") == 0 and result.output.startswith("error: ")
    assert "Traceback" not in result.output and "re-run `ablate run --grid lrn`" in result.output


def _png_ok(path: Path) -> None:
    from matplotlib.image import imread

    assert path.stat().st_size > 2000, path
    img = imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100, path
    assert path.with_suffix(".svg").stat().st_size > 2000


def build_results(root: Path) -> None:
    """A small results folder: two conditions of relu/tanh, LRN with one seed of three, a dropout grid with
    learning curves, data-parallel devices, and a grid that has no runs yet."""
    runs = [{**r, "condition": c} for c in ("paper", "modern") for r in relu_runs(range(3), condition=None)]
    write_grid(root, "relu_vs_tanh", runs, [RELU_CLAIM], epochs=40, budget="cpu")
    write_grid(root, "lrn", lrn_runs([0], 1.0), [LRN_CLAIM], target=None, seeds=[0, 1, 2])
    drop = [{"dropout": p, "seed": s, "train_error": 0.05 if p == 0 else 0.15, "test_error": 0.30 - 0.03 * (p > 0)}
            for p in (0.0, 0.5) for s in range(3)]
    write_grid(root, "dropout", drop, [{"id": "dropout", "metric": "gap", "axis": "dropout", "a": 0.0, "b": 0.5,
                                        "effect": "difference"}], target=None)
    gpus = [{"devices": d, "seed": s, "images_per_second": 900.0 * d ** 0.9 + 5 * s} for d in (1, 2, 4)
            for s in range(2)]
    write_grid(root, "gpus", gpus, [{"id": "data-parallel", "paper_claim": "two-gpu", "metric": "images_per_second",
                                     "axis": "devices", "a": 2, "b": 1, "effect": "ratio"}], target=None)
    (root / "pooling").mkdir()
    (root / "pooling" / "grid.json").write_text(json.dumps(
        {"name": "pooling", "axes": ["pooling"], "claims": [{"id": "overlap-pool", "metric": "test_error",
                                                             "axis": "pooling", "a": "nonoverlap", "b": "overlap",
                                                             "effect": "difference", "paper": 0.4}],
         "command": "ablate run --grid pooling", "dataset_label": "CIFAR-10 (synthetic test copy)"}))


def test_render_writes_report_verdicts_and_figures(tmp_path):
    from reports.render import render_report

    build_results(tmp_path / "results")
    path = render_report(tmp_path / "results", tmp_path / "out", dpi=40)
    text = path.read_text()
    assert path == tmp_path / "out" / "REPORT.md"
    assert text.index("## Claims") < text.index("## How the verdicts are decided") < text.index("## relu_vs_tanh")
    assert "relu-6x** (condition=paper)" in text and "relu-6x** (condition=modern)" in text
    assert "lrn: 1 of 3 seeds" in text and "pooling: no runs" in text
    assert "augmentation: no runs (`ablate run --grid augmentation --budget cpu`)" in text  # shipped, never run
    assert "smoke" not in text  # a pipeline check, not a paper claim
    assert "`ablate run --grid relu_vs_tanh --budget cpu`" in text and "CIFAR-10 (synthetic test copy)" in text
    assert "- Precision: bf16 (24 runs)" in text  # relu_vs_tanh: 2 conditions x 3 seeds x 2 activations x 2 lrs
    cost = text[text.index("## What the reproduction cost"):text.index("## What is missing")]
    assert "| measured on |" in cost and "| test cpu (bf16) |" in cost  # each grid names its machines
    assert "Target: the whole cpu reproduction in one night, 8 h on one 2-core machine." in cost
    assert "h over it." in cost and "more than one machine" not in cost  # the generated runs: 8.75 h on one
    verdicts = pd.read_csv(tmp_path / "out" / "verdicts.csv")
    assert {"claim", "split", "paper", "estimate", "lo", "hi", "verdict", "n", "dataset_label", "precision",
            "margin"} <= set(verdicts)
    assert set(verdicts.claim) >= {"relu-6x", "lrn", "dropout", "data-parallel", "data-parallel/efficiency",
                                   "overlap-pool"}
    assert verdicts.set_index("claim").loc["lrn", "verdict"] == INCONCLUSIVE
    assert verdicts.set_index("claim").loc["overlap-pool", "verdict"] == "no data"
    reasons = verdicts.set_index("claim").reason
    assert "detect only effects of" in reasons["data-parallel"]
    assert "detect only" not in reasons["data-parallel/efficiency"], "a speed-up's power, not an efficiency of 104%"
    figures = sorted((tmp_path / "out" / "figures").glob("*.png"))
    names = {p.stem for p in figures}
    assert {"claims_forest", "relu_vs_tanh_figure1", "lrn_lrn_variants", "dropout_dropout_variants",
            "dropout_dropout_curves", "gpus_scaling"} <= names
    for png in figures:
        _png_ok(png)
        assert f"figures/{png.name}" in text or png.stem == "claims_forest"
    # a rerun on the same results rewrites the same bytes (no SVG timestamp or random ids): git shows no diff
    before = {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()}
    render_report(tmp_path / "results", tmp_path / "out", dpi=40)
    assert {p: p.read_bytes() for p in (tmp_path / "out").rglob("*") if p.is_file()} == before


def test_cli_report_prints_the_claims_table(tmp_path):
    from runners.cli import main

    write_grid(tmp_path, "lrn", lrn_runs(range(3), 1.6, noise_points=0.05), [LRN_CLAIM], target=None)
    result = CliRunner().invoke(main, ["report", "--results", str(tmp_path), "--grid", "lrn", "--dpi", "30"])
    assert result.exit_code == 0, result.output
    assert "same direction, larger" in result.output and "lrn: complete" in result.output
    assert (tmp_path / "report" / "REPORT.md").exists()
    missing = CliRunner().invoke(main, ["report", "--results", str(tmp_path), "--grid", "nope"])
    assert missing.exit_code == 2 and "grids with results: lrn" in missing.output


# ---------------------------------------------------------------- the rules a referee checks

def test_a_claim_resting_on_a_run_at_chance_is_not_testable(tmp_path):
    runs = lrn_runs(range(3), effect_points=19.0, noise_points=0.1)
    runs[1]["learned"] = False  # one run sat at ln(10) for every epoch
    for r in runs:
        r.setdefault("learned", True)
    write_grid(tmp_path, "lrn", runs, [LRN_CLAIM], target=None)
    (r,) = evaluate(load_grid(tmp_path, "lrn"))
    assert r.verdict == NOT_TESTABLE and "1 of 6 runs did not learn" in r.reason and r.regime.startswith("not")
    assert r.ours_text() == "-"  # a difference with a net that predicts nothing is not shown as ours
    assert math.isfinite(r.interval.estimate)  # verdicts.csv still has the number, beside the verdict


def test_a_learning_claim_says_its_nets_learned(tmp_path):
    runs = lrn_runs(range(3), effect_points=1.6, noise_points=0.1)
    for r in runs:
        r["learned"] = True
    write_grid(tmp_path, "lrn", runs, [LRN_CLAIM], target=None)
    (r,) = evaluate(load_grid(tmp_path, "lrn"))
    assert r.regime == "reached: every run learned (none at chance)", r.regime
    runs[0]["learned"] = False
    write_grid(tmp_path / "again", "lrn", runs, [LRN_CLAIM], target=None)
    (r,) = evaluate(load_grid(tmp_path / "again", "lrn"))
    assert r.regime.startswith("not reached") and r.verdict == NOT_TESTABLE


def test_runs_recorded_without_the_learned_flag_are_judged_by_their_training_loss(tmp_path):
    runs = lrn_runs(range(3), effect_points=1.3)
    for r in runs:
        r["train_loss"] = 2.301  # ln 10: every run a constant predictor
    write_grid(tmp_path, "lrn", runs, [LRN_CLAIM], target=None)
    (r,) = evaluate(load_grid(tmp_path, "lrn"))
    assert r.verdict == NOT_TESTABLE and "did not learn" in r.reason


def test_a_run_missing_the_learned_flag_beside_runs_with_it_is_judged_by_its_training_loss(tmp_path):
    runs = lrn_runs(range(3), effect_points=1.3)
    for r in runs:
        r["learned"], r["train_loss"] = True, 0.5
    del runs[2]["learned"]
    runs[2]["train_loss"] = 2.301  # ln 10, recorded without the flag: it did not learn, and must not pass as learned
    write_grid(tmp_path, "lrn", runs, [LRN_CLAIM], target=None)
    (r,) = evaluate(load_grid(tmp_path, "lrn"))
    assert r.verdict == NOT_TESTABLE and "1 of 6 runs did not learn" in r.reason


def test_bounded_intervals_stay_inside_the_metrics_range(tmp_path):
    runs = [{"lrn": False, "seed": 0, "test_error": 0.95}, {"lrn": True, "seed": 0, "test_error": 0.05},
            {"lrn": False, "seed": 1, "test_error": 0.10}, {"lrn": True, "seed": 1, "test_error": 0.15}]
    write_grid(tmp_path, "lrn", runs, [LRN_CLAIM], target=None)
    (r,) = evaluate(load_grid(tmp_path, "lrn"))
    raw = compare(np.array([95.0, 10.0]), np.array([5.0, 15.0]), "difference", True)
    assert raw.lo < -100 and raw.hi > 100  # two seeds, a huge spread: the plain t-interval leaves the range
    assert r.interval.lo == -100 and r.interval.hi == 100 and "clipped" in r.interval.method


def _tuned_grid(tmp_path, confirm_lr_relu=0.1, confirm_lr_tanh=0.01):
    """Selection seeds 0-2 over two rates; confirmation seeds 10-12 at the rates selection picks."""
    runs = relu_runs(range(3), relu=(5.0, 0.3), tanh=(30.0, 1.0))
    rng = np.random.default_rng(5)
    for seed in (10, 11, 12):
        runs.append({"activation": "relu", "lr": confirm_lr_relu, "seed": seed,
                     "epochs_to_target": 5.0 + 0.4 * rng.standard_normal()})
        runs.append({"activation": "tanh", "lr": confirm_lr_tanh, "seed": seed,
                     "epochs_to_target": 30.0 + 2 * rng.standard_normal()})
    for r in runs:
        r["epochs_to_target"] = float(r["epochs_to_target"])
    write_grid(tmp_path, "relu_vs_tanh", runs, [RELU_CLAIM], epochs=60,
               extra_meta={"tune": {"axis": "lr", "metric": "epochs_to_target", "seeds": [0, 1, 2]}})
    return load_grid(tmp_path, "relu_vs_tanh")


def test_a_tuned_claim_chooses_on_selection_seeds_and_estimates_on_confirmation_seeds(tmp_path):
    grid = _tuned_grid(tmp_path)
    (r,) = only(evaluate(grid), "relu-6x")
    runs = grid.runs.set_index("run_id")
    assert set(runs.loc[list(r.runs_a + r.runs_b), "seed"]) == {10, 11, 12}
    assert r.tuned_a == "0.01" and r.tuned_b == "0.1"
    assert "chosen on seeds 0, 1, 2, estimated on seeds 10, 11, 12" in r.selection
    assert r.interval.hi > r.interval.lo and r.verdict == REPRODUCED


def test_a_tuned_claim_waits_for_its_confirmation_runs(tmp_path):
    grid = _tuned_grid(tmp_path, confirm_lr_relu=0.01)  # the confirmation runs sit at a rate selection did not pick
    (r,) = only(evaluate(grid), "relu-6x")
    assert r.verdict == "no data" and "confirmation runs not made yet" in r.reason


def test_censored_against_censored_gives_no_value_and_no_interval(tmp_path):
    runs = [{"activation": a, "seed": s, "epochs_to_target": None} for a in ("relu", "tanh") for s in range(3)]
    write_grid(tmp_path, "relu_vs_tanh", runs, [{**RELU_CLAIM, "tune": None}], epochs=10)
    (r,) = only(evaluate(load_grid(tmp_path, "relu_vs_tanh")), "relu-6x")
    assert r.bound == "mixed" and r.verdict == NOT_TESTABLE and "both sides are censored" in r.reason
    assert "[" not in r.ours_text()


OVERFIT_CLAIM = {"id": "dropout", "paper_claim": "dropout", "title": "Dropout narrows the gap", "metric": "gap",
                 "axis": "dropout", "a": 0.0, "b": 0.5, "effect": "difference", "regime": "overfitting"}


@pytest.mark.parametrize("clean_a, converged, expected", [(0.05, True, MEASURED), (0.25, True, NOT_TESTABLE),
                                                          (0.05, False, NOT_TESTABLE), (0.25, False, NOT_TESTABLE)])
def test_an_overfitting_claim_needs_a_net_that_overfits_and_has_converged(tmp_path, clean_a, converged, expected):
    runs = []
    for seed in range(3):
        runs.append({"dropout": 0.0, "seed": seed, "test_error": 0.30 + 0.01 * seed, "clean_train_error": clean_a,
                     "converged": converged, "learned": True})
        runs.append({"dropout": 0.5, "seed": seed, "test_error": 0.28 + 0.01 * seed, "clean_train_error": 0.20,
                     "converged": converged, "learned": True})
    write_grid(tmp_path, "dropout", runs, [OVERFIT_CLAIM], target=None)
    (r,) = evaluate(load_grid(tmp_path, "dropout"))
    assert r.verdict.startswith(expected), r.reason
    if clean_a == 0.25:
        assert "does not over-fit here" in r.reason and "6.0 points" in r.reason
    if not converged:  # every failed condition is named, with the runs that fail it
        assert "6 of 6 runs had not converged" in r.reason
        assert "dropout=0 seed(s) 0, 1, 2; dropout=0.5 seed(s) 0, 1, 2" in r.reason


def test_a_not_testable_reason_names_the_unconverged_seeds_of_each_side(tmp_path):
    runs = []
    for seed in range(3):
        runs.append({"dropout": 0.0, "seed": seed, "test_error": 0.30, "clean_train_error": 0.0, "converged": True,
                     "learned": True})
        runs.append({"dropout": 0.5, "seed": seed, "test_error": 0.28, "clean_train_error": 0.20,
                     "converged": seed == 0, "learned": True})
    write_grid(tmp_path, "dropout", runs, [OVERFIT_CLAIM], target=None)
    (r,) = evaluate(load_grid(tmp_path, "dropout"))
    assert r.verdict == NOT_TESTABLE and "does not over-fit" not in r.reason
    assert r.reason.endswith("2 of 6 runs had not converged (fewer than two rate drops and validation error still "
                             "moving: dropout=0.5 seed(s) 1, 2)"), r.reason


@pytest.mark.parametrize("spread, testable", [(1.64, True), (1.003, False), (None, False)])
def test_a_normalising_claim_needs_lrn_to_act_in_every_lrn_run(tmp_path, spread, testable):
    runs = lrn_runs(range(3), effect_points=1.4, noise_points=0.05)
    for r in runs:
        r["learned"] = True
        if r["lrn"] and spread is not None:  # the no-LRN side records no factor, as the runner does
            r["lrn_factor_spread"] = spread + 0.01 * r["seed"]
    write_grid(tmp_path, "lrn", runs, [{**LRN_CLAIM, "regime": "normalising"}], target=None)
    (r,) = evaluate(load_grid(tmp_path, "lrn"))
    assert (r.verdict != NOT_TESTABLE) == testable, r.reason
    if spread == 1.64:
        assert r.regime == "reached: LRN factor spread 1.64-1.66x (needs >= 1.1x in every LRN run)"
    elif spread:
        assert "LRN did not normalise in 3 of 3 LRN runs" in r.reason and "near-constant" in r.reason
        assert r.regime.startswith("not reached: LRN factor spread 1.00-1.02x")
    else:
        assert "no LRN factor was recorded" in r.reason


def test_a_claim_names_every_regime_failure_not_only_the_nets_at_chance(tmp_path):
    runs = lrn_runs(range(3), effect_points=1.4, noise_points=0.05)
    for r in runs:
        r["learned"] = not (r["lrn"] and r["seed"] == 1)  # one LRN run at chance
        if r["lrn"]:
            r["lrn_factor_spread"] = 1.0  # and LRN a constant scale: retraining that run would not make it testable
    write_grid(tmp_path, "lrn", runs, [{**LRN_CLAIM, "regime": "normalising"}], target=None)
    (r,) = evaluate(load_grid(tmp_path, "lrn"))
    assert r.verdict == NOT_TESTABLE and r.regime == "not reached: nets at chance", r.regime
    assert r.reason.startswith("1 of 6 runs did not learn") and "; and LRN did not normalise in 3 of 3" in r.reason
    for r_ in runs:
        r_["lrn_factor_spread"] = 1.6 if r_["lrn"] else None
    write_grid(tmp_path / "acting", "lrn", runs, [{**LRN_CLAIM, "regime": "normalising"}], target=None)
    (r,) = evaluate(load_grid(tmp_path / "acting", "lrn"))
    assert r.verdict == NOT_TESTABLE and "did not learn" in r.reason and "normalise" not in r.reason, r.reason


def test_the_fair_gap_is_test_minus_clean_training_error(tmp_path):
    runs = [{"dropout": 0.0, "seed": 0, "test_error": 0.30, "train_error": 0.60, "clean_train_error": 0.10}]
    write_grid(tmp_path, "dropout", runs, [OVERFIT_CLAIM], target=None)
    grid = load_grid(tmp_path, "dropout")
    assert grid.runs.gap.iloc[0] == pytest.approx(0.20)  # the train-mode error (0.60) plays no part


def test_every_verdict_has_a_plain_reason_and_a_power_statement(tmp_path):
    write_grid(tmp_path, "lrn", lrn_runs(range(3), effect_points=0.0, noise_points=1.0, rng_seed=3), [LRN_CLAIM],
               target=None)
    (r,) = evaluate(load_grid(tmp_path, "lrn"))
    assert r.verdict == INCONCLUSIVE and r.verdict in VERDICTS
    assert r.reason.startswith("the interval [") and "includes no effect (0)" in r.reason
    assert "these seeds detect only effects of" in r.reason and "underpowered: about" in r.reason
    assert "seeds would resolve +1.40 pts" in r.reason
    assert "nan" not in r.reason and r.detectable > 1.4 and r.seeds_needed > 3


def test_runs_from_before_the_validation_split_are_not_testable(tmp_path):
    runs = [{**r, "val_fingerprint": None} for r in lrn_runs(range(3), effect_points=1.4, noise_points=0.05)]
    write_grid(tmp_path, "lrn", runs, [LRN_CLAIM], target=None)
    (r,) = evaluate(load_grid(tmp_path, "lrn"))
    assert r.verdict == NOT_TESTABLE and "predate the validation split" in r.reason


def test_report_files_are_replaced_whole_and_stale_ones_removed(tmp_path):
    from reports.output import write_atomic
    from reports.render import render_report
    write_grid(tmp_path / "results", "lrn", lrn_runs(range(3), 1.4), [LRN_CLAIM], target=None)
    out = tmp_path / "out"
    (out / "figures").mkdir(parents=True)
    (out / "figures" / "gone_grid_variants.png").write_bytes(b"old")
    (out / "cells_gone_grid.csv").write_text("old")
    render_report(tmp_path / "results", out, dpi=30)
    assert not (out / "figures" / "gone_grid_variants.png").exists() and not (out / "cells_gone_grid.csv").exists()
    good = (out / "REPORT.md").read_text()

    def dies(f):
        f.write(b"half a rep")
        raise KeyboardInterrupt  # killed mid-write

    with pytest.raises(KeyboardInterrupt):
        write_atomic(out / "REPORT.md", dies)
    assert (out / "REPORT.md").read_text() == good and not list(out.glob(".*tmp*"))


def test_the_readme_claims_block_is_written_by_the_report(tmp_path):
    from reports.render import README_END, README_START, build_report, update_readme
    write_grid(tmp_path / "results", "lrn", lrn_runs(range(3), 1.4, noise_points=0.05), [LRN_CLAIM], target=None)
    readme = tmp_path / "README.md"
    readme.write_text(f"# title\n\n{README_START}\nold table\n{README_END}\n\nmore text\n")
    update_readme(build_report(tmp_path / "results"), readme)
    text = readme.read_text()
    assert "old table" not in text and text.startswith("# title") and text.endswith("more text\n")
    assert "| lrn | +1.40 pts | +1.42 pts [+1.40, +1.44] | same direction, larger | 3 | gpu |" in text
    readme.write_text("no markers")
    with pytest.raises(UserError, match="no claims block"):
        update_readme(build_report(tmp_path / "results"), readme)


def test_the_report_refuses_aggregates_that_disagree_with_the_run_folders(tmp_path):
    gdir = write_grid(tmp_path, "lrn", lrn_runs(range(2), 1.0), [LRN_CLAIM], target=None)
    runs = pd.read_csv(gdir / "runs.csv")
    for rid in runs.run_id:
        (gdir / "runs" / rid).mkdir(parents=True)
        (gdir / "runs" / rid / "summary.json").write_text("{}")
    load_grid(tmp_path, "lrn")  # consistent: fine
    (gdir / "runs" / "extra0000001").mkdir()
    (gdir / "runs" / "extra0000001" / "summary.json").write_text("{}")
    with pytest.raises(UserError, match=r"out of date with its run folders \(1 finished run\(s\) missing"):
        load_grid(tmp_path, "lrn")
    (gdir / "runs" / "extra0000001" / "summary.json").unlink()
    pd.concat([runs, runs.iloc[:1]]).to_csv(gdir / "runs.csv", index=False)
    with pytest.raises(UserError, match="more than once"):
        load_grid(tmp_path, "lrn")


def test_machine_time_counts_each_run_by_its_share_of_the_cores():
    import pandas as pd

    from reports.load import machine_seconds
    runs = pd.DataFrame({"status": ["finished", "finished", "diverged", "failed", "finished", "finished"],
                         "wall_seconds": [100.0, 100.0, 60.0, 500.0, 30.0, 40.0],
                         "threads": [1, 2, 1, 1, 8, 1],
                         "world_size": [1, 1, 1, 1, 1, 2],
                         "device_name": ["Some CPU, 2 CPUs", "Some CPU, 2 CPUs", "Some CPU, 2 CPUs",
                                         "Some CPU, 2 CPUs", "NVIDIA H200", "Some CPU, 2 CPUs"]})
    # two at a time on 2 cores count half; one on both cores counts whole, as one process of two threads or as two
    # DDP processes of one; a failed run is not part of the results
    assert machine_seconds(runs) == pytest.approx(50 + 100 + 30 + 30 + 40)
    assert machine_seconds(runs.drop(columns="world_size").iloc[:5]) == pytest.approx(50 + 100 + 30 + 30)
    assert machine_seconds(runs.iloc[:0]) == 0.0


# ---------------------------------------------------------------- which runs a report reads

def test_defined_run_ids_are_the_grid_files_runs_at_every_tune_value():
    from ablations.grid import defined_run_ids, expand
    from ablations.grid import load_grid as load_grid_file
    relu = load_grid_file("relu_vs_tanh")
    ids = defined_run_ids(relu, "cpu", {}, [0, 1, 2, 10, 11, 12])
    selection = expand(relu, "cpu", {}, chooser=None)  # the sweep on the selection seeds
    assert {s.run_id for s in selection} <= ids
    chosen = expand(relu, "cpu", {}, chooser=lambda specs: dict(specs[-1].axes)["lr_scale"])  # any tune value
    assert {s.run_id for s in chosen} <= ids
    assert not {s.run_id for s in expand(relu, "cpu", {"epochs": 7}, chooser=None)} & ids, "another cap"


def test_a_run_the_grid_file_no_longer_defines_is_left_out(tmp_path):
    write_grid(tmp_path, "lrn", [{"lrn": v, "seed": s} for v in (False, True) for s in (0, 1)], [LRN_CLAIM],
               budget="cpu")
    for i in range(4):  # run folders as the store keeps them; only the first has a spec, an old budget's
        (tmp_path / "lrn" / "runs" / f"lrn{i:04d}").mkdir(parents=True)
    (tmp_path / "lrn" / "runs" / "lrn0000" / "spec.json").write_text("{}")
    grid = load_grid(tmp_path, "lrn")
    assert "lrn0000" not in set(grid.runs.run_id) and len(grid.runs) == 3
    assert any("1 runs made with other settings than the grid file defines" in n for n in grid.notes)


def test_a_grid_still_training_its_first_runs_is_reported_as_no_runs_yet(tmp_path):
    gdir = write_grid(tmp_path, "lrn", lrn_runs(range(2), 1.0), [LRN_CLAIM], target=None)
    (gdir / "runs.csv").unlink()
    (gdir / "epochs.csv").unlink()
    (gdir / "runs" / "abc123").mkdir(parents=True)  # a run in progress: a folder, no summary yet
    (grid,) = load_results(tmp_path)
    assert grid.runs.empty


def test_a_grid_run_with_overrides_names_them_beside_its_budget(tmp_path):
    from reports.render import README_END, README_START, build_report, update_readme, write_report
    runs = [{**r, "precision": "fp32"} for r in lrn_runs(range(3), 1.4, noise_points=0.05)]
    write_grid(tmp_path / "results", "lrn", runs, [LRN_CLAIM], target=None, budget="cpu",
               extra_meta={"overrides": {"precision": "fp32"}})
    report = build_report(tmp_path / "results")
    (r,) = report.results
    assert r.budget == "cpu (precision=fp32)" and r.verdict == LARGER  # the runs are kept, and say how they ran
    readme = tmp_path / "README.md"
    readme.write_text(f"{README_START}\n{README_END}\n")
    update_readme(report, readme)
    assert "| same direction, larger | 3 | cpu (precision=fp32) |" in readme.read_text()
    write_report(report, tmp_path / "report")
    text = (tmp_path / "report" / "REPORT.md").read_text()
    assert "budget: cpu (precision=fp32)" in text and "| lrn | cpu (precision=fp32) | 6 |" in text
