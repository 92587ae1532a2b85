"""The bench's pure parts: ratio and efficiency maths, the verdict rule, interleaving, CSV columns, targets; the
reference data export; the conv layer whose backward the bench made faster. Fast: no timing of real models."""
import dataclasses
import json
import math
import time

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn

from ablations.errors import UserError
from ablations.models import Conv2d, build_model, paper_lrn, train_flops_per_image
from runners import bench
from runners.bench import CSV_COLUMNS, Workload, verdict


def test_median_and_ratio():
    assert bench.median([3.0, 1.0, 2.0]) == 2.0
    assert bench.median([4.0, 1.0, 2.0, 3.0]) == 2.5
    assert math.isnan(bench.median([]))
    assert bench.ratio(6.0, 3.0) == 2.0
    for a, b in ((1.0, 0.0), (1.0, -2.0), (float("nan"), 1.0), (1.0, float("nan"))):
        assert math.isnan(bench.ratio(a, b)), (a, b)


def test_efficiency_normalised_and_overhead_match_their_formulas():
    # 100 images/s x 1 GFLOP/image = 0.1 TFLOP/s; over a 2 TFLOP/s ceiling that is 5 %
    assert bench.achieved_flops(100.0, 1e9) == 1e11
    assert bench.efficiency(100.0, 1e9, 2e12) == pytest.approx(0.05)
    assert math.isnan(bench.efficiency(100.0, 1e9, float("nan")))
    assert bench.normalised(100.0, 2e12) == pytest.approx(50.0)  # images/s per TFLOP/s
    assert bench.overhead(1.0, 0.95) == pytest.approx(0.05)
    assert bench.overhead(2.0, 2.0) == 0.0


def test_verdict_fails_only_beyond_the_tolerance():
    base = {"a": 10.0, "b": 10.0}
    assert verdict({"a": 6.5, "b": 20.0}, base, 0.35).ok, "a drop of exactly the tolerance passes; faster passes"
    v = verdict({"a": 6.49, "b": 10.0}, base, 0.35)
    assert not v.ok and [c.case for c in v.cases if not c.ok] == ["a"]
    assert v.cases[0].change == pytest.approx(-0.351)
    assert "REGRESSION" in "\n".join(v.lines())
    missing = verdict({"a": 10.0, "extra": 1.0}, base, 0.35)
    assert not missing.ok and [c.case for c in missing.cases if not c.ok] == ["b"], "unmeasured case fails"
    assert [c.case for c in missing.cases] == ["a", "b"], "cases only measured now are ignored"
    with pytest.raises(UserError, match="tolerance"):
        verdict({}, base, 1.5)


def test_compare_measures_again_before_failing_and_keeps_each_cases_best(tmp_path, monkeypatch):
    import json

    path = tmp_path / "baseline.json"
    path.write_text(json.dumps({"tolerance": 0.35, "cases": {"alexnet-w0.25-bf16": {"normalised": 10.0},
                                                             "convnet4-bf16": {"normalised": 10.0}}}))
    readings = iter([{"alexnet-w0.25-bf16": 6.0, "convnet4-bf16": 9.0},  # a burst: alexnet reads -40 %
                     {"alexnet-w0.25-bf16": 9.5, "convnet4-bf16": 5.0},  # gone; convnet4 now in a burst
                     {"alexnet-w0.25-bf16": 6.0, "convnet4-bf16": 9.0}, {"alexnet-w0.25-bf16": 6.1}])
    calls = []

    def fake_measure(cases, **kw):
        calls.append([c.name for c in cases])
        return bench.GateMeasurement(next(readings), {}, 1.0)

    monkeypatch.setattr(bench.baseline, "measure_gate", fake_measure)
    v, _ = bench.compare_to_baseline(path)
    assert v.ok and len(calls) == 2, "the second reading clears alexnet; convnet4 keeps its first (better) one"
    v, _ = bench.compare_to_baseline(path)
    assert not v.ok and [c.case for c in v.cases if not c.ok] == ["alexnet-w0.25-bf16"], "-40 % twice is real"
    assert len(calls) == 4 and calls[0] == ["alexnet-w0.25-bf16", "convnet4-bf16"]
    assert bench.best_of({"a": 1.0, "b": 5.0}, {"a": 2.0}) == {"a": 2.0, "b": 5.0}


def test_units_per_call():
    assert bench.units_per_call(0.1, 0.3, 100) == 3
    assert bench.units_per_call(1.0, 0.3, 100) == 1
    assert bench.units_per_call(1e-6, 0.3, 50) == 50
    assert bench.units_per_call(0.0, 0.3, 7) == 7


def test_time_interleaved_rotates_rounds_and_leaves_setup_untimed():
    calls = []

    def load(name: str, setup: float = 0.0) -> Workload:
        return Workload(name, "x", lambda: calls.append(name), 1.0, threads=1,
                        before=(lambda: time.sleep(setup)) if setup else None)

    loads = [load("A", setup=0.05), load("B"), load("C")]
    times = bench.time_interleaved(loads, 2, torch.device("cpu"))
    assert calls == ["A", "B", "C", "B", "C", "A"]
    assert {k: len(v) for k, v in times.items()} == {"A": 2, "B": 2, "C": 2}
    assert max(times["A"]) < 0.04, "before() is not part of the timed call"


def test_calibrate_sizes_calls_and_reports_the_first_call():
    made = []

    def make(k: int):
        made.append(k)
        return lambda: time.sleep(0.02 * k)

    run, k, first, warm = bench.calibrate(make, torch.device("cpu"), 0.1, 100, threads=1)
    assert made == [1, k] and k == bench.units_per_call(warm, 0.1, 100)
    assert 2 <= k <= 5 and warm >= 0.02 and first >= 0.02, "one unit sleeps 20 ms: 2-5 units reach 0.1 s"


def _fake_rows() -> pd.DataFrame:
    def w(name, section, items, precision="fp32", threads=1, flops=0.0, base="", model="", switch="", compiled=False):
        return Workload(name, section, lambda: None, items, threads, precision=precision, flops_per_item=flops,
                        base=base, model=model, switch=switch, unit="FLOP/s" if section == "ceiling" else "images/s",
                        compiled=compiled)

    seed = bench.model_label(bench.SEED_ALEXNET)
    loads = [w("g32", "ceiling", 1e12), w("g16", "ceiling", 4e12, "bf16"), w("g16b", "ceiling", 2e12, "bf16"),
             w("ref", "reference", 100.0, flops=1e9), w("ref1", "reference", 50.0, flops=1e9),
             w("ax", "alexnet", 300.0, "bf16", flops=1e9, model=seed),
             w("ax32", "alexnet", 150.0, flops=1e9, base="ax", model=seed),
             w("ax-pca", "alexnet", 900.0, "bf16", flops=1e9, base="ax", model=seed, switch="PCA lighting"),
             w("c4", "convnet4", 1000.0, "bf16", flops=1e8),
             w("pipe", "pipeline", 30_000.0), w("pipe-c", "pipeline", 60_000.0, compiled=True),
             w(bench.LOOP_RUN, "loop", 100.0, base=bench.LOOP_BARE_EVAL), w(bench.LOOP_BARE, "loop", 125.0),
             w(bench.LOOP_BARE_EVAL, "loop", 105.0)]
    times = {x.name: [1.0, 2.0, 1.0] for x in loads}  # median rate = items / 1 s; min = items / 2 s
    return bench.summarise(loads, times, {"batch": 128, "device": "cpu", "data": "synthetic data"})


def test_summarise_ratios_ceilings_and_columns():
    rows = _fake_rows().set_index("name")
    assert list(_fake_rows().columns) == list(CSV_COLUMNS)
    assert rows.loc["ax", "rate"] == 300.0 and rows.loc["ax", "rate_min"] == 150.0
    assert rows.loc["ax", "vs_reference"] == pytest.approx(3.0), "vs the faster reference row"
    assert rows.loc["ax", "ceiling_flops"] == 4e12, "the best GEMM of the row's precision"
    assert rows.loc["ax", "efficiency"] == pytest.approx(300 * 1e9 / 4e12)
    assert rows.loc["ax32", "efficiency"] == pytest.approx(150 * 1e9 / 1e12)
    assert rows.loc["ax32", "vs_base"] == pytest.approx(0.5)
    assert rows.loc["pipe", "base"] == "c4" and rows.loc["pipe", "vs_base"] == pytest.approx(30.0)
    assert math.isnan(rows.loc["c4", "vs_reference"]) and math.isnan(rows.loc["pipe", "efficiency"])
    assert rows.loc["g16", "data"] == "synthetic data"


def test_a_ceiling_is_the_best_timing_at_the_rows_threads_or_fewer():
    """Neighbours only ever slow a GEMM, and 2 threads can do what 1 does: a flaky 2-thread GEMM whose median sits
    below the 1-thread one must not flatter a 2-thread row's efficiency."""
    def w(name, section, items, threads, flops=0.0):
        return Workload(name, section, lambda: None, items, threads, precision="bf16", flops_per_item=flops,
                        unit="FLOP/s" if section == "ceiling" else "images/s")

    loads = [w("g1", "ceiling", 1e12, 1), w("g2", "ceiling", 1e12, 2),
             w("m1", "alexnet", 100.0, 1, 1e9), w("m2", "alexnet", 100.0, 2, 1e9)]
    times = {"g1": [1.0, 1.0, 1.0], "g2": [2.0, 2.0, 0.8], "m1": [1.0] * 3, "m2": [0.5] * 3}
    rows = bench.summarise(loads, times, {}).set_index("name")
    assert rows.loc["m1", "ceiling_flops"] == pytest.approx(1e12), "1-thread rows never use the 2-thread GEMM"
    assert rows.loc["m2", "ceiling_flops"] == pytest.approx(1.25e12), "the best 2-thread timing, not its median 0.5"
    times["g2"] = [2.0, 2.0, 2.0]  # 2 threads never beat 1: the 1-thread rate is still attainable
    assert bench.summarise(loads, times, {}).set_index("name").loc["m2", "ceiling_flops"] == pytest.approx(1e12)


def test_check_targets_reads_the_rows():
    targets = {t.key: t for t in bench.check_targets(_fake_rows())}
    ref, share = targets["vs-reference"], targets["bf16-gemm-share"]
    assert ref.value == pytest.approx(3.0) and ref.met, "main rows only, not the switch rows"
    assert share.value == pytest.approx(0.075) and not share.met and "bf16 GEMM ceiling" in share.title
    alexnet, fastest = targets["pipeline-headroom-alexnet"], targets["pipeline-headroom"]
    assert alexnet.value == pytest.approx(100.0) and alexnet.met, "vs the faster AlexNet row"
    assert fastest.value == pytest.approx(30.0) and fastest.met, "vs the fastest training row (c4)"
    compiled = targets["pipeline-headroom-compiled"]
    assert compiled.value == pytest.approx(60.0) and "pipe-c" in compiled.detail
    loop = targets["loop-overhead"]
    assert loop.value == pytest.approx(1 - 100 / 105) and loop.met and loop.goal == 0.05, "the smoke run: 5 %"
    assert "20.0%" in loop.detail, "overhead vs bare train steps only: 1 - 100/125"
    rows = _fake_rows()
    rows.loc[rows.section == "loop", "note"] = "dropout spec: 10000 images x 1 epoch(s), batch 128, bf16"
    real = {t.key: t for t in bench.check_targets(rows)}["loop-overhead"]
    assert real.goal == 0.01 and not real.met and "one cpu-budget epoch" in real.title, "a real epoch: at most 1 %"
    lines = bench.target_lines(list(targets.values()))
    assert len(lines) == 6 and "NOT met" in lines[1]


def test_write_results_csv_and_latest_copy(tmp_path):
    result = bench.BenchResult(_fake_rows(), "synthetic data")
    path, latest = bench.write_results(result, tmp_path / "bench")
    assert path.name.startswith("cpu-") and latest.name == "cpu-latest.csv"
    back = pd.read_csv(path)
    assert list(back.columns) == list(CSV_COLUMNS) and len(back) == len(result.rows)
    assert path.read_text() == latest.read_text()


def test_reference_export_reads_back_through_torchvision_and_the_importer(tmp_path):
    from runners.data import import_dataset, load_dataset, make_synthetic
    from runners.reference import ExportedCIFAR10, export_cifar10

    data = make_synthetic("cifar10", 50, 10, seed=3)
    export_cifar10(data, tmp_path / "ref")
    ds = ExportedCIFAR10(str(tmp_path / "ref"), train=True, transform=None)
    img, label = ds[17]
    assert len(ds) == 50 and ds.classes == list(data.classes) and label == int(data.train_y[17])
    assert torch.equal(torch.from_numpy(np.array(img)).permute(2, 0, 1), data.train_x[17])
    import_dataset("cifar10", tmp_path / "ref", data_dir=tmp_path / "cache")  # the suite's strict reader agrees
    back = load_dataset("cifar10", tmp_path / "cache")
    assert torch.equal(back.train_x, data.train_x) and torch.equal(back.test_y, data.test_y)


def test_reference_alexnet_has_the_seed_layouts_flops():
    from runners.reference import AlexNet

    out = AlexNet()(torch.zeros(2, 3, 32, 32))
    assert out.shape == (2, 10)
    assert bench.reference_flops_per_image() == train_flops_per_image(bench.SEED_ALEXNET), \
        "the same convs, FCs and pools"
    assert train_flops_per_image(bench.SUITE_ALEXNET) == train_flops_per_image(bench.SEED_ALEXNET), \
        "the pools give the same map sizes, so the suite's overlapping net costs what the seed's does"


@pytest.mark.parametrize("groups,bf16", [(1, False), (1, True), (2, True)])
def test_conv2d_with_apart_bias_gradient_matches_nn_conv2d(groups, bf16):
    torch.manual_seed(0)
    ref, mine = nn.Conv2d(4, 6, 3, padding=2, groups=groups), Conv2d(4, 6, 3, padding=2, groups=groups)
    mine.load_state_dict(ref.state_dict())
    x = torch.randn(3, 4, 7, 7).contiguous(memory_format=torch.channels_last)
    got = []
    for m in (ref, mine):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = m(xi)
        (y.float() ** 2).sum().backward()
        got.append((y, xi.grad, m.weight.grad, m.bias.grad))
    tol = dict(rtol=2e-2, atol=2e-2) if bf16 else dict(rtol=1e-5, atol=1e-5)
    for a, b in zip(*got):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a.float(), b.float(), **tol)
    assert got[1][0].dtype == (torch.bfloat16 if bf16 else torch.float32), "stays in the autocast dtype"


@pytest.mark.parametrize("channels_last,bf16", [(False, False), (True, False), (True, True)])
def test_band_matmul_lrn_matches_torchs_lrn_values_and_gradients(channels_last, bf16):
    torch.manual_seed(0)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = (torch.randn(2, 12, 5, 5) * 30).relu().contiguous(memory_format=fmt)  # large enough for the window to matter
    torch_lrn = nn.LocalResponseNorm(5, alpha=5e-4, beta=0.75, k=2.0)
    got = []
    for m in (torch_lrn, paper_lrn()):
        xi = (x.bfloat16() if bf16 else x).clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = m(xi.float() if m is torch_lrn and bf16 else xi)  # torch's LRN has no bf16 kernel: give it fp32
        (y.float() * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        got.append((y.float(), xi.grad.float()))
    tol = dict(rtol=5e-3, atol=1e-2) if bf16 else dict(rtol=1e-5, atol=1e-6)  # bf16: the window sum in bf16
    torch.testing.assert_close(got[1][0], got[0][0], **tol)
    torch.testing.assert_close(got[1][1], got[0][1], **tol)
    assert not torch.allclose(got[0][0], x), "the constants make the normalisation visible"


def test_baseline_errors_are_one_line_user_errors(tmp_path):
    with pytest.raises(UserError, match="--update-baseline"):
        bench.load_baseline(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{")
    with pytest.raises(UserError, match="unreadable"):
        bench.load_baseline(tmp_path / "bad.json")
    with pytest.raises(UserError, match="unknown gate case"):
        bench.gate_cases_for(["alexnet-w0.25-bf16", "nope"])
    assert len({c.name for c in bench.GATE_CASES}) == len(bench.GATE_CASES)


def test_loop_overhead_compares_the_fastest_calls():
    """Target d from each loop row's fastest call: a disturbed median must not hide (or invent) overhead."""
    def w(name, base=""):
        return Workload(name, "loop", lambda: None, 100.0, 1, base=base)

    loads = [w(bench.LOOP_RUN, bench.LOOP_BARE_EVAL), w(bench.LOOP_BARE), w(bench.LOOP_BARE_EVAL)]
    times = {bench.LOOP_RUN: [2.0, 1.1, 2.0], bench.LOOP_BARE: [0.8, 0.8, 0.8], bench.LOOP_BARE_EVAL: [1.0, 3.0, 3.0]}
    [d] = [t for t in bench.check_targets(bench.summarise(loads, times, {})) if t.key == "loop-overhead"]
    assert d.value == pytest.approx(1 - 1.0 / 1.1) and not d.met  # the medians would say 1 - 3/2 = -50%
    assert "-50.0% from the medians" in d.detail and "27.3% vs the steps alone" in d.detail


def test_show_reprints_a_saved_csv_and_refuses_other_files(tmp_path):
    from click.testing import CliRunner

    from runners.cli import main
    rows = _fake_rows()
    path, _ = bench.write_results(bench.BenchResult(rows, "synthetic data"), tmp_path)
    back = bench.read_results(path)
    assert [t.value for t in bench.check_targets(back.rows)] == [t.value for t in bench.check_targets(rows)]
    shown = CliRunner().invoke(main, ["bench", "--show", str(path)], env={"COLUMNS": "250"})
    assert shown.exit_code == 0 and "target (vs-reference)" in shown.output and "target (loop-overhead)" in shown.output
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    for bad in (tmp_path / "other.csv", tmp_path / "missing.csv"):
        result = CliRunner().invoke(main, ["bench", "--show", str(bad)])
        assert result.exit_code == 2 and result.output.count("\n") == 1 and "ablate bench" in result.output


def test_conv_passes_cover_the_training_steps_conv_flops_and_bound_it():
    """The kernel rows are every conv pass a training step runs (no input gradient for conv1): their FLOPs plus
    the FC layers' make the model's training FLOPs, and kernel_bound is those FLOPs over the passes' time."""
    spec = dataclasses.replace(bench.SEED_ALEXNET, width=0.25)
    loads = bench.conv_pass_workloads(spec, 4, torch.device("cpu"), 0.001)
    assert len(loads) == 3 * 5 - 1 and not any(w.name.startswith("conv1 input grad") for w in loads)
    model = build_model(spec)
    fc = sum(3 * 2 * m.in_features * m.out_features for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert sum(w.flops_per_item for w in loads) / 4 + fc == pytest.approx(train_flops_per_image(spec), rel=1e-6)

    gemm = Workload("g", "ceiling", lambda: None, 1e12, 1, precision="bf16", unit="FLOP/s")
    times = {"g": [1.0], **{w.name: [w.items / 2.0] for w in loads}}  # every pass: 2 per second
    rows = bench.summarise([gemm, *loads], times, {"batch": 4})
    assert bench.kernel_bound(rows, 1e9, 4) == pytest.approx(4e9 / (len(loads) * 0.5) / 1e12)
    assert math.isnan(bench.kernel_bound(rows[rows.section != "kernels"], 1e9, 4))


def test_calls_per_round_gives_a_workload_more_samples():
    calls = []
    loads = [Workload("a", "loop", lambda: calls.append("a"), 1.0, 1, calls_per_round=3),
             Workload("b", "loop", lambda: calls.append("b"), 1.0, 1)]
    times = bench.time_interleaved(loads, 2, torch.device("cpu"))
    assert len(times["a"]) == 6 and len(times["b"]) == 2
    assert calls == ["a", "a", "a", "b", "b", "a", "a", "a"], "each round rotates; a's calls stay together"


def test_a_baseline_of_another_processor_is_refused_not_compared(tmp_path, monkeypatch):
    assert bench.processor_key("Intel(R) Xeon(R) Processor, 2 CPUs") == "intel-r-xeon-r-processor"
    assert bench.processor_key("AMD EPYC 7763 64-Core Processor, 2 CPUs") == "amd-epyc-7763-64-core-processor"
    path = tmp_path / "baseline.json"
    path.write_text(json.dumps({"tolerance": 0.35, "device": "cpu", "device_name": "Some Other CPU, 64 CPUs",
                                "cases": {"convnet4-bf16": {"normalised": 10.0}}}))
    monkeypatch.setattr(bench.baseline, "measure_gate", lambda *a, **k: pytest.fail("must not measure"))
    v, base = bench.compare_to_baseline(path)
    assert v is None and base["device_name"] == "Some Other CPU, 64 CPUs"


def test_a_baseline_of_the_same_model_name_with_another_instruction_set_is_refused(tmp_path, monkeypatch):
    from click.testing import CliRunner

    from runners.cli import main
    # two cloud runners that both say "AMD EPYC": a Zen 3 (AVX2, bf16 emulated) and a Zen 4 (AVX512, native bf16)
    assert bench.machine_key("AMD EPYC, 2 CPUs", "AVX2") == "amd-epyc-avx2"
    assert bench.machine_key("AMD EPYC, 2 CPUs", "AVX512") == "amd-epyc-avx512"
    assert bench.machine_key("AMD EPYC, 2 CPUs") == "amd-epyc"
    monkeypatch.setattr(bench.baseline, "device_name", lambda dev: "AMD EPYC, 2 CPUs")
    monkeypatch.setattr(bench.baseline, "cpu_capability", lambda: "AVX2")
    assert bench.default_baseline("cpu").name == "baseline-cpu-amd-epyc-avx2.json"
    monkeypatch.setattr(bench.baseline, "measure_gate", lambda *a, **k: pytest.fail("must not measure"))
    path = tmp_path / "baseline.json"
    path.write_text(json.dumps({"tolerance": 0.35, "device": "cpu", "device_name": "AMD EPYC, 2 CPUs",
                                "cpu_capability": "AVX512", "cases": {"convnet4-bf16": {"normalised": 10.0}}}))
    v, base = bench.compare_to_baseline(path)
    assert v is None and base["cpu_capability"] == "AVX512"
    refused = CliRunner().invoke(main, ["bench", "--compare", str(path)])
    assert refused.exit_code == 0 and refused.output.startswith(
        "no baseline for this processor (amd-epyc-avx2): ") and "measured on amd-epyc-avx512" in refused.output
    # the same machine is compared: the rule runs (here on a measurement handed in)
    path.write_text(json.dumps({"tolerance": 0.35, "device": "cpu", "device_name": "AMD EPYC, 2 CPUs",
                                "cpu_capability": "AVX2", "cases": {"convnet4-bf16": {"normalised": 10.0}}}))
    measured = bench.GateMeasurement(normalised={"convnet4-bf16": 9.0}, rates={}, gemm_flops=1.0)
    v, _ = bench.compare_to_baseline(path, first=measured)
    assert v is not None and v.ok


def test_every_committed_baseline_names_its_instruction_set_in_its_file_name():
    from pathlib import Path
    folder = Path(__file__).resolve().parents[2] / "results" / "bench"
    found = sorted(folder.glob("baseline-*.json"))
    assert found
    for path in found:
        base = json.loads(path.read_text())
        key = bench.machine_key(base["device_name"], base["cpu_capability"])
        assert path.name == f"baseline-{base['device']}-{key}.json", path
