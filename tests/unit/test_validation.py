"""The training-side rules that make a verdict trustworthy: a fixed stratified validation split that decides while
the test split only reports, the fair (eval-mode) over-fitting gap, the running-error trace of Figure 1, the
chance guard, weights-only decay and the LRN activity diagnostic."""
import dataclasses
import json
import math

import pytest
import torch

from ablations.errors import UserError
from ablations.models import ModelSpec
from ablations.spec import RunSpec
from runners.data import make_synthetic
from runners.device_data import select_data, validation_split
from runners.evaluate import lrn_activity
from runners.metrics import CHANCE_LOSS, learned, target_time, trace_rows, trace_segments
from runners.train import make_optimizer, train_run


@pytest.fixture(scope="module")
def data():
    return make_synthetic("cifar10", n_train=400, n_test=120, seed=3)


def _spec(**kw) -> RunSpec:
    base = dict(model=ModelSpec(width=0.125), epochs=3, batch_size=32, subset=200, test_subset=100, val_size=100,
                lr=0.02, precision="fp32", schedule="plateau", plateau_patience=0, grid="val")
    return RunSpec(**{**base, **kw})


def test_validation_split_is_stratified_fixed_and_disjoint_from_training(data):
    val = validation_split(data.train_y, 100)
    assert len(val) == 100 == len(set(val.tolist()))
    assert torch.bincount(data.train_y[val], minlength=10).tolist() == [10] * 10  # stratified
    assert torch.equal(val, validation_split(data.train_y, 100))  # the same for every run
    dd = select_data(_spec(), data, torch.device("cpu"))
    train_rows = {tuple(x.flatten()[:64].tolist()) for x in dd.train_x}
    assert not any(tuple(x.flatten()[:64].tolist()) in train_rows for x in dd.val_x)
    assert len(dd.train_y) == 200 and len(dd.val_y) == 100 and len(dd.clean_y) == 200
    assert len(dd.val_fingerprint) == 12
    with pytest.raises(UserError, match="val_size"):
        select_data(_spec(val_size=400), data, torch.device("cpu"))


def test_changed_test_labels_leave_training_bit_identical(tmp_path, data):
    """The test split reports and never decides: a plateau schedule that stepped on test error would train
    differently once the test labels change."""
    spec = _spec(epochs=4)
    shuffled = dataclasses.replace(data, test_y=data.test_y[torch.randperm(len(data.test_y),
                                                                          generator=torch.Generator().manual_seed(1))])
    a = train_run(spec, data, tmp_path / "a", "cpu")
    b = train_run(spec, shuffled, tmp_path / "b", "cpu")
    keys = ["epoch", "lr", "train_loss", "train_error", "val_error", "clean_train_error"]
    assert [[r[k] for k in keys] for r in a.rows] == [[r[k] for k in keys] for r in b.rows]
    assert [r["test_error"] for r in a.rows] != [r["test_error"] for r in b.rows]  # the test split did change
    wa, wb = (torch.load(d / "model.pt", weights_only=True) for d in (tmp_path / "a", tmp_path / "b"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_the_plateau_schedule_steps_on_validation_error(tmp_path, data):
    """patience 0: the rate is divided by 10 after every epoch whose validation error did not improve on the best
    so far (ReduceLROnPlateau's relative threshold 1e-4), at most max_lr_drops times."""
    spec = _spec(epochs=6, lr=0.5)
    rows = train_run(spec, data, tmp_path, "cpu").rows
    lr, best, floor = spec.lr, math.inf, spec.lr * 0.1 ** spec.max_lr_drops * 0.999
    for row in rows:
        assert row["lr"] == pytest.approx(lr)
        if row["val_error"] < best * (1 - 1e-4):
            best = row["val_error"]
        else:
            lr = max(lr * 0.1, floor)
    assert any(r["lr"] < spec.lr for r in rows)  # the schedule did fire


def test_a_plateau_schedule_without_a_validation_split_is_refused():
    from ablations.grid import check_consistent
    with pytest.raises(UserError, match="val_size"):
        check_consistent(_spec(val_size=0))


def test_the_fair_gap_ignores_what_dropout_does_to_the_training_batches(data):
    """A regulariser that only raises the train-mode error leaves the clean error (eval mode, no augmentation),
    and so the gap test - clean, unchanged: the same weights with and without dropout give the same clean error."""
    from ablations.models import build_model
    from runners.augment import BatchAugmenter, compute_input_stats
    from runners.evaluate import evaluate_split
    cpu = torch.device("cpu")
    spec = _spec(model=ModelSpec(width=0.125, dropout=0.9))
    dd = select_data(spec, data, cpu)
    aug = BatchAugmenter(compute_input_stats(dd.train_x), spec.preprocess, spec.augment)
    nets = {}
    for p in (0.0, 0.9):  # dropout has no weights: the same seed builds the same weights
        torch.manual_seed(0)
        nets[p] = build_model(dataclasses.replace(spec.model, dropout=p))
    clean = {p: evaluate_split(net, dd.clean_x, dd.clean_y, aug, spec, cpu) for p, net in nets.items()}
    assert clean[0.0] == clean[0.9]
    x = aug.eval(dd.clean_x)
    with torch.no_grad():
        running = {p: (net.train()(x).argmax(1) != dd.clean_y).float().mean().item() for p, net in nets.items()}
    assert running[0.9] != running[0.0]  # the train-mode error moves with the dropout masks


def test_trace_segments_cover_an_epoch_in_tenths():
    seg, ends = trace_segments(25)
    assert len(ends) == 10 and ends[-1] == 1.0 and seg[0] == 0 and seg[-1] == 9
    assert sorted(seg.count(k) for k in range(10)) == [2] * 5 + [3] * 5 and seg == sorted(seg)
    seg, ends = trace_segments(3)  # fewer steps than points: one segment per step
    assert seg == [0, 1, 2] and ends == [1 / 3, 2 / 3, 1.0]


def test_the_running_error_is_a_trailing_one_epoch_window():
    ends = [0.5, 1.0]
    first = trace_rows(1, [[50, 100.0, 100], [30, 80.0, 100]], ends, [])
    assert [r["window_error"] for r in first] == [0.5, 0.4]
    second = trace_rows(2, [[10, 50.0, 100], [20, 60.0, 100]], ends, first)
    assert [r["epoch"] for r in second] == [1.5, 2.0]
    assert second[0]["window_error"] == pytest.approx((30 + 10) / 200)  # the last epoch's worth of batches
    assert second[1]["window_error"] == pytest.approx((10 + 20) / 200)


def test_time_to_target_is_resolved_within_an_epoch():
    spec = _spec(early_stop_metric="train_error", early_stop_below=0.25)
    rows = [dict(epoch=1, cum_seconds=10.0, epoch_seconds=10.0), dict(epoch=2, cum_seconds=20.0, epoch_seconds=10.0)]
    trace = [dict(epoch=e, window_error=w, window_loss=1.0) for e, w in
             [(0.5, 0.6), (1.0, 0.4), (1.5, 0.3), (2.0, 0.2)]]
    assert target_time(spec, rows, trace) == (2.0, 20.0)
    trace[2]["window_error"] = 0.24
    assert target_time(spec, rows, trace) == (1.5, 15.0)
    assert target_time(spec, rows, trace[:2]) is None


def test_an_early_stopped_run_records_a_fractional_crossing(tmp_path, data):
    spec = _spec(model=ModelSpec(arch="convnet4"), epochs=8, schedule="constant", lr=0.01,
                 early_stop_metric="train_error", early_stop_below=0.5)
    result = train_run(spec, data, tmp_path, "cpu")
    m = result.summary["metrics"]
    assert result.stop_reason == "early_stop" and m["reached_target"]
    assert m["epochs_run"] - 1 < m["epochs_to_target"] < m["epochs_run"]  # mid-epoch, not rounded up to its end
    trace = (tmp_path / "trace.csv").read_text().splitlines()
    assert len(trace) - 1 == 7 * m["epochs_run"]  # 200 images in batches of 32: 7 steps, a point each


def test_a_run_at_chance_is_marked_as_not_learned():
    spec = _spec()
    ln10 = math.log(10)
    assert not learned(spec, {"clean_train_loss": ln10, "predicted_classes": 4})
    assert not learned(spec, {"clean_train_loss": 0.5, "predicted_classes": 1})  # a constant predictor
    assert not learned(spec, {"clean_train_loss": math.nan, "predicted_classes": 5})
    assert learned(spec, {"clean_train_loss": CHANCE_LOSS * ln10 - 0.01, "predicted_classes": 3})


def test_a_net_that_cannot_learn_is_recorded_as_such(tmp_path, data):
    spec = _spec(epochs=1, lr=1e-9, schedule="constant")
    metrics = train_run(spec, data, tmp_path, "cpu").summary["metrics"]
    assert metrics["learned"] is False
    assert json.loads((tmp_path / "summary.json").read_text())["metrics"]["learned"] is False


def test_weight_decay_on_weights_only_leaves_biases_alone():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3))
    for decay_on, bias_decay in (("weights", 0.0), ("all", 0.1)):
        opt = make_optimizer(model, _spec(weight_decay=0.1, decay_on=decay_on))
        seen = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
        assert seen[id(model[0].weight)] == 0.1 and seen[id(model[0].bias)] == bias_decay
    # one plain SGD step with zero gradients: only decayed parameters move
    with torch.no_grad():
        model[0].bias.fill_(1.0)
    opt = make_optimizer(model, _spec(weight_decay=0.1, decay_on="weights", lr=1.0, momentum=0.0))
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    w = model[0].weight.detach().clone()
    opt.step()
    assert torch.equal(model[0].bias.detach(), torch.ones(3))
    assert torch.allclose(model[0].weight.detach(), w * 0.9)


def test_lrn_activity_tells_a_constant_rescaling_from_normalisation():
    from ablations.models import paper_lrn
    net = torch.nn.Sequential(paper_lrn())
    small = lrn_activity(net, torch.randn(8, 16, 6, 6) * 0.5)  # standard inputs: alpha sum a^2 << k
    big = lrn_activity(net, torch.randn(8, 16, 6, 6) * 200)  # the paper's 0-255 scale
    assert small["lrn_factor_spread"] < 1.01 and small["lrn_factor_p50"] == pytest.approx(2 ** -0.75, rel=1e-3)
    assert big["lrn_factor_spread"] > 1.5 and big["lrn_factor_p05"] < 0.5
    assert lrn_activity(torch.nn.Sequential(torch.nn.Identity()), torch.randn(2, 3, 4, 4)) == {}


def test_convergence_needs_two_rate_drops_or_a_flat_validation_error():
    from runners.metrics import converged
    rows = lambda lrs, vals: [dict(lr=l, val_error=v) for l, v in zip(lrs, vals)]  # noqa: E731
    assert converged(rows([1, 0.1, 0.01], [0.5, 0.4, 0.3]))
    assert not converged(rows([1, 0.1, 0.1], [0.5, 0.4, 0.3]))
    assert converged(rows([1] * 6, [0.5, 0.3, 0.301, 0.305, 0.299, 0.302]))
    assert not converged(rows([1] * 6, [0.5, 0.3, 0.28, 0.26, 0.24, 0.22]))


def test_bf16_runs_on_a_cpu_without_native_bf16_are_named_in_one_line(monkeypatch):
    """bf16 is emulated there, an order of magnitude slower than fp32: `ablate run` says so as the grid starts."""
    import runners.devices as devices
    from ablations.grid import expand, load_grid
    specs, cpu = expand(load_grid("smoke")), torch.device("cpu")
    monkeypatch.setattr(devices, "native_bf16", lambda device_type="cpu": False)
    note = devices.emulated_bf16_note(specs, cpu, "smoke")
    assert note.startswith("note: 8 bf16 runs of grid smoke") and "--precision fp32" in note and "\n" not in note
    fp32 = [dataclasses.replace(s, precision="fp32") for s in specs]
    assert devices.emulated_bf16_note(fp32, cpu, "smoke") == ""
    monkeypatch.setattr(devices, "native_bf16", lambda device_type="cpu": True)
    assert devices.emulated_bf16_note(specs, cpu, "smoke") == ""


def test_native_bf16_takes_the_instructions_not_onednns_word_on_x86(monkeypatch):
    """oneDNN says it supports bf16 on plain AVX512, where bf16 trains slower than fp32: native takes AVX512-BF16
    or AMX on x86; on Arm, oneDNN's answer stands."""
    import runners.devices as devices
    check = devices.native_bf16.__wrapped__  # uncached
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True, raising=False)
    flags = {"avx512_bf16": False, "amx": False}
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: flags["avx512_bf16"])
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: flags["amx"])
    monkeypatch.setattr(devices.platform, "machine", lambda: "x86_64")
    assert check("cpu") is False  # AVX512 and VNNI only: emulated
    flags["amx"] = True
    assert check("cpu") is True
    flags.update(amx=False, avx512_bf16=True)
    assert check("cpu") is True
    flags["avx512_bf16"] = False
    monkeypatch.setattr(devices.platform, "machine", lambda: "aarch64")
    assert check("cpu") is True


def test_the_gate_times_fp32_forms_of_every_case_where_bf16_is_emulated():
    from runners.bench import worker
    native, emulated = worker.default_cases(True), worker.default_cases(False)
    assert all(worker.CASES[c][3] == "fp32" for c in emulated)
    kinds = lambda cases: sorted(worker.CASES[c][0] for c in cases)  # noqa: E731
    assert set(kinds(emulated)) == set(kinds(native)) == {"train", "pipeline", "eval", "loop"}
    assert "eval alexnet-w0.25 fp32 10-crop" in emulated and "run loop convnet4 fp32" in emulated
    assert "eval alexnet-w0.25 bf16 10-crop" in native and not set(worker.FP32_FORMS) & set(native)


def test_a_ten_crop_run_also_reads_its_net_on_the_plain_view(tmp_path, data):
    """The 10-crop level's runs give both readings of one net: test_error_1view equals, epoch by epoch, what the
    same training tested on the plain view records, and training itself does not change. A plain-view run's
    epochs.csv keeps exactly the standard columns."""
    from runners.store import EPOCH_COLUMNS
    one = train_run(_spec(augment="crop_flip", test_subset=40), data, tmp_path / "one", "cpu")
    ten = train_run(_spec(augment="crop_flip", test_subset=40, test_crops=10), data, tmp_path / "ten", "cpu")
    keys = ["lr", "train_loss", "train_error", "val_error", "clean_train_error"]
    assert [[r[k] for k in keys] for r in one.rows] == [[r[k] for k in keys] for r in ten.rows]
    assert [r["test_error"] for r in one.rows] == [r["test_error_1view"] for r in ten.rows]
    assert [r["test_loss"] for r in one.rows] == [r["test_loss_1view"] for r in ten.rows]
    assert [r["test_loss"] for r in one.rows] != [r["test_loss"] for r in ten.rows]  # ten views do differ
    assert ten.summary["metrics"]["test_error_1view"] == one.summary["metrics"]["test_error"]
    assert "test_error_1view" not in one.summary["metrics"]
    assert (tmp_path / "one" / "epochs.csv").read_text().splitlines()[0].split(",") == EPOCH_COLUMNS
    header = (tmp_path / "ten" / "epochs.csv").read_text().splitlines()[0].split(",")
    assert header[header.index("test_error_top5") + 1:][:2] == ["test_loss_1view", "test_error_1view"]
