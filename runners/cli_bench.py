"""`ablate bench`: the throughput bench, the committed-baseline check and the head-against-base gate. It parses,
calls runners.bench, and prints; the bench itself loads only when the command runs."""
from __future__ import annotations

import json
import sys

import click

from ablations.choices import ARCH_NAMES
from runners.progress import table_console


@click.command("bench")
@click.option("--model", type=click.Choice(["all", *ARCH_NAMES]), default="all", show_default=True,
              help="Which model family to time (the reference is timed with alexnet).")
@click.option("--batch-size", default=128, show_default=True, type=int, help="Training batch (reference too).")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when present), cpu, or cuda[:N].")
@click.option("--repeats", default=None, type=int, help="Interleaved rounds (default 5; 3 with --quick).")
@click.option("--quick", is_flag=True,
              help="A sub-minute subset: the suite at 1 thread only; no fp32, switch, eval or compile rows.")
@click.option("--compile/--no-compile", "compile_", default=None,
              help="Time torch.compile rows (default: on, off with --quick).")
@click.option("--threads", type=int, help="The many-threads count timed beside 1 thread (default: torch's).")
@click.option("--out", default="results/bench", show_default=True, type=click.Path(file_okay=False),
              help="Folder for <device>-<date>.csv, <device>-latest.csv and the baseline.")
@click.option("--data-dir", type=click.Path(file_okay=False), help="Data cache folder.")
@click.option("--compare", "baseline", type=click.Path(dir_okay=False),
              help="Only run the regression gate against this baseline JSON; exit 3 on a regression.")
@click.option("--against", "rev", metavar="REV",
              help="The regression gate: time this tree against git revision REV (checked out in a temporary "
                   "worktree), in alternating fresh processes; exit 3 when a case is slower than the tolerance, "
                   "5 when too noisy to tell.")
@click.option("--tolerance", type=float,
              help="Gate tolerance: for --against the time ratio a case may exceed 1 by (default 0.05); for "
                   "--compare the drop below the baseline (default: the baseline's).")
@click.option("--case", "cases", multiple=True, metavar="NAME",
              help="With --against: only this case (repeatable; default: all, see `ablate bench --list-cases`).")
@click.option("--list-cases", is_flag=True, help="Print the --against gate's cases and exit.")
@click.option("--pairs", type=click.IntRange(min=6), default=16, show_default=True,
              help="With --against: head/base pairs of processes per case at the first look (the interval "
                   "narrows with the square root of the pairs, the check's time grows with them).")
@click.option("--recheck-pairs", type=click.IntRange(min=0), default=16, show_default=True,
              help="With --against: pairs more at the second look, of only the cases the first left undecided "
                   "(0: one look).")
@click.option("--inject-slowdown", type=click.FloatRange(0, 1), default=0.0, metavar="FRACTION",
              help="With --against: make this tree's measurements slower by FRACTION (a busy-wait after each "
                   "timed call), to show what the gate catches.")
@click.option("--update-baseline", is_flag=True,
              help="Re-measure the gate and write <out>/baseline-cpu-<processor>-<instruction set>.json for this "
                   "machine.")
@click.option("--show", "saved", type=click.Path(dir_okay=False),
              help="Measure nothing: print the table and targets of a saved bench CSV.")
@click.option("--json", "as_json", is_flag=True, help="Print the rows as JSON instead of a table.")
def bench_cmd(model: str, batch_size: int, device: str, repeats: int | None, quick: bool, compile_: bool | None,
              threads: int | None, out: str, data_dir: str | None, baseline: str | None, rev: str | None,
              tolerance: float | None, cases: tuple[str, ...], list_cases: bool, pairs: int,
              recheck_pairs: int, inject_slowdown: float,
              update_baseline: bool, saved: str | None, as_json: bool) -> None:
    """Training throughput of the seed chapter's reference and the suite side by side, the data pipeline, the
    run loop's overhead and the machine's GEMM ceilings, measured interleaved in one process; or, with
    --against REV, the regression gate of this tree against REV.

    Exit codes: 0 done (or the gate passed), 2 bad input, 3 the gate found a regression, 5 the gate could not
    tell (too noisy: re-run)."""
    from pathlib import Path

    from rich.console import Console

    from runners import bench

    console = Console(stderr=True)
    if list_cases:
        from runners.bench import paired
        default, why = paired.machine_cases()
        click.echo("\n".join([*default, *(c for c in paired.worker.CASES if c not in default)]))
        click.echo(f"the first {len(default)} are timed by default here" + (f": {why}" if why else ""), err=True)
        return
    if rev:
        _bench_against(rev, tolerance, cases, pairs, recheck_pairs, inject_slowdown, as_json, console)
        return
    if update_baseline:
        path = Path(out) / bench.default_baseline("cpu").name
        base = bench.update_baseline(path)
        for name, c in base["cases"].items():
            click.echo(f"{name:<26} {c['normalised']:9.2f} {bench.GATE_UNIT.split(' (')[0]}  "
                       f"(rounds {', '.join(f'{v:.2f}' for v in c['rounds'])})")
        click.echo(f"baseline written to {path}")
        return
    if saved:
        result = bench.read_results(Path(saved))
        if as_json:
            click.echo(result.rows.to_json(orient="records", indent=2))
            return
        table_console().print(bench.bench_table(result))
        click.echo("\n".join(bench.target_lines(bench.check_targets(result.rows))))
        return
    if baseline:
        result, base = bench.compare_to_baseline(Path(baseline), tolerance)
        if result is None:
            here = bench.here_key(base.get("device", "cpu"))[1]
            there = bench.machine_key(base["device_name"], base.get("cpu_capability") or "")
            click.echo(f"no baseline for this processor ({here}): {baseline} was measured on {there}; rates are "
                       "compared like with like only (make one here with `ablate bench --update-baseline`)")
            return
        click.echo("\n".join(result.lines()))
        sys.exit(0 if result.ok else 3)
    cfg = bench.BenchConfig(model=model, batch_size=batch_size, device=device, quick=quick, compile=compile_,
                            repeats=repeats or (3 if quick else 5), threads=threads,
                            data_dir=Path(data_dir) if data_dir else None)
    result = bench.run_bench(cfg, say=lambda msg: console.print(f"[dim]{msg}[/dim]"))
    if as_json:
        click.echo(result.rows.to_json(orient="records", indent=2))
    else:
        table_console().print(bench.bench_table(result))
    for line in bench.target_lines(bench.check_targets(result.rows)):
        click.echo(line)
    path, latest = bench.write_results(result, Path(out))
    click.echo(f"results written to {path} (and {latest.name})")


def _bench_against(rev: str, tolerance: float | None, cases: tuple[str, ...], pairs: int, recheck_pairs: int,
                   inject: float,
                   as_json: bool, console) -> None:
    import dataclasses

    from runners.bench import paired

    default, why = paired.machine_cases()
    if why and not cases:
        click.echo(why, err=True)
    cfg = paired.PairedConfig(rev=rev, tolerance=paired.TOLERANCE if tolerance is None else tolerance,
                              cases=tuple(cases) or default, pairs=pairs, recheck_pairs=recheck_pairs,
                              stall=inject)
    result = paired.against(cfg, say=lambda msg: console.print(f"[dim]{msg}[/dim]"))
    if as_json:
        click.echo(json.dumps({**dataclasses.asdict(result), "verdict": result.verdict}, indent=2))
    else:
        click.echo("\n".join(paired.result_lines(result)))
    sys.exit(result.exit_code)
