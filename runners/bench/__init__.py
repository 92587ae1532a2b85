"""`ablate bench`: how fast the suite trains, and whether a change made it slower.

- harness: the timer (device-synchronised, interleaved, warm-up apart) and the pure maths of a bench row.
- workloads: what is timed, built on the suite's own code: GEMM ceilings, the seed chapter's reference
  pipeline, training steps, evaluation, conv passes, the input pipeline.
- loop: the run loop (train_run) against a bare script of the same run, on a real cpu-budget epoch.
- suite: the full bench (`ablate bench`): plan, summary, targets, CSV and table.
- paired: the regression gate (`ablate bench --against REV`): this tree against REV, in alternating fresh
  processes on one machine (worker.py is what each process runs).
- baseline: the secondary check against a committed baseline of this processor model and
  instruction set (`--compare`).
"""
from runners.bench.baseline import (GATE_CASES, GATE_TOLERANCE, GATE_UNIT, CaseVerdict, GateCase, GateMeasurement,
                                    Verdict, best_of, compare_to_baseline, default_baseline, gate_cases_for,
                                    here_key, load_baseline, machine_key, measure_gate, processor_key, update_baseline,
                                    verdict)
from runners.bench.harness import (Workload, achieved_flops, calibrate, efficiency, median, normalised, overhead,
                                   ratio, time_interleaved, timed, units_per_call, using_threads)
from runners.bench.suite import (BenchConfig, BenchResult, Target, bench_table, check_targets, read_results, run_bench,
                                 summarise, target_lines, write_results)
from runners.bench.loop import LOOP_BARE, LOOP_BARE_EVAL, LOOP_RUN, loop_spec, loop_workloads
from runners.bench.workloads import (CONVNET4, CSV_COLUMNS, SEED_ALEXNET, SUITE_ALEXNET, TRAIN_AUGMENT, DeviceSet,
                                     conv_pass_workloads, eval_workload, forward_flops_per_image, gemm_workload,
                                     kernel_bound, model_label, pipeline_calls, pipeline_workload,
                                     reference_flops_per_image, train_calls, train_workload)
from runners.devices import device_name, pick_device

__all__ = ["BenchConfig", "BenchResult", "CONVNET4", "CSV_COLUMNS", "CaseVerdict", "DeviceSet", "GATE_CASES",
           "GATE_TOLERANCE", "GATE_UNIT", "GateCase", "GateMeasurement", "LOOP_BARE", "LOOP_BARE_EVAL", "LOOP_RUN",
           "SEED_ALEXNET", "SUITE_ALEXNET", "TRAIN_AUGMENT", "Target", "Verdict", "Workload", "achieved_flops",
           "bench_table", "best_of", "calibrate", "check_targets", "compare_to_baseline", "conv_pass_workloads",
           "default_baseline", "device_name", "efficiency", "eval_workload", "forward_flops_per_image",
           "gate_cases_for", "gemm_workload", "here_key", "kernel_bound", "load_baseline", "loop_spec",
           "loop_workloads", "machine_key", "measure_gate",
           "median", "model_label", "normalised", "overhead", "pick_device", "pipeline_calls", "pipeline_workload",
           "processor_key", "ratio", "read_results", "reference_flops_per_image", "run_bench", "summarise",
           "target_lines", "time_interleaved", "timed", "train_calls", "train_workload", "units_per_call",
           "update_baseline", "using_threads", "verdict", "write_results"]
