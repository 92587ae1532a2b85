"""The interval and power maths against their formulas."""
import math

import numpy as np
import pandas as pd
import pytest

from reports.stats import Interval, cell_summary, clip, detectable, seeds_needed, t_critical


def test_clip_keeps_an_interval_inside_the_metrics_range_and_says_so():
    iv = Interval(82.1, -8.5, 172.6, 2, "t")
    c = clip(iv, 0.0, 100.0)
    assert (c.estimate, c.lo, c.hi) == (82.1, 0.0, 100.0) and "clipped" in c.method
    inside = Interval(5.0, 1.0, 9.0, 3, "t")
    assert clip(inside, 0.0, 100.0) is inside


def test_cell_summary_keeps_each_metrics_interval_inside_its_range():
    runs = pd.DataFrame({"cell": ["a"] * 3 + ["b"] * 3,
                         "clean_train_error": [0.0, 0.0, 0.012, 0.40, 0.42, 0.44],
                         "gap": [-0.02, -0.03, 0.05, 0.30, 0.31, 0.32]})
    cells = cell_summary(runs, ["cell"], ["clean_train_error", "gap"]).set_index("cell")
    half = t_critical(0.95, 2) * np.std([0.0, 0.0, 0.012], ddof=1) / math.sqrt(3)  # 0.0172: reaches below 0
    assert cells.loc["a", "clean_train_error"] == pytest.approx(0.004)
    assert (cells.loc["a", "clean_train_error_lo"], cells.loc["a", "clean_train_error_hi"]) == \
        (0.0, pytest.approx(0.004 + half))
    assert cells.loc["a", "gap_lo"] < 0  # a gap may be negative: only [-1, 1] bounds it
    half_b = t_critical(0.95, 2) * 0.02 / math.sqrt(3)  # inside the range: the plain t-interval
    assert (cells.loc["b", "clean_train_error_lo"], cells.loc["b", "clean_train_error_hi"]) == \
        (pytest.approx(0.42 - half_b), pytest.approx(0.42 + half_b))


def test_detectable_effect_is_the_power_formula():
    sd, n = 2.0, 5
    t975, t80 = t_critical(0.95, n - 1), t_critical(0.60, n - 1)  # two-sided 95%; one-sided 80% = two-sided 60%
    assert t80 == pytest.approx(0.9410, abs=1e-3)  # tables: t_0.80 with 4 df
    assert detectable(sd, n) == pytest.approx((t975 + t80) * sd / math.sqrt(n))
    assert math.isnan(detectable(sd, 1))


def test_seeds_needed_is_the_first_n_that_resolves_the_effect():
    sd, effect = 2.0, 1.5
    n = seeds_needed(sd, effect)
    assert detectable(sd, n) <= effect < detectable(sd, n - 1)
    assert seeds_needed(0.0, 1.0) == 2 and seeds_needed(100.0, 0.01) is None


def test_a_simulated_paired_test_has_about_the_stated_power():
    """Draw many experiments with a true effect equal to the detectable one: ~80% of t-intervals exclude 0."""
    rng = np.random.default_rng(0)
    sd, n = 1.0, 6
    effect = detectable(sd, n)
    hits = 0
    for _ in range(4000):
        d = effect + sd * rng.standard_normal(n)
        half = t_critical(0.95, n - 1) * d.std(ddof=1) / math.sqrt(n)
        hits += abs(d.mean()) > half
    assert 0.76 < hits / 4000 < 0.84
