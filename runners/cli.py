"""The `ablate` command line. Commands only parse, call a library function, and print.

Every UserError becomes one line on stderr and exit code 2; anything unexpected becomes one line and
exit code 1 (with the traceback only under --debug)."""
from __future__ import annotations

import errno
import json
import os
import sys

import click

from ablations.choices import DATASETS, PRECISIONS
from ablations.errors import UserError
from runners.cli_bench import bench_cmd
from runners.cli_data import data
from runners.cli_report import model_cmd, report_cmd
from runners.progress import table_console

EXIT_INTERRUPTED, EXIT_TERMINATED = 130, 143  # Ctrl-C (SIGINT); SIGTERM (Slurm, Kubernetes, docker stop, timeout)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the process is, so it unwinds exactly as Ctrl-C does: the last finished epoch is
    saved, locks are released, nothing half-written is left."""


def _terminate(signum, frame) -> None:
    raise Terminated()


def _interrupted_exit(err: KeyboardInterrupt) -> int:
    return EXIT_TERMINATED if isinstance(err, Terminated) else EXIT_INTERRUPTED


class _Group(click.Group):
    """Turns exceptions into one clear line unless --debug was given."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as err:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {' '.join(str(err).split())}", err=True)  # one line, whatever the message holds
            sys.exit(err.exit_code)
        except KeyboardInterrupt as err:
            click.echo("terminated (SIGTERM)" if isinstance(err, Terminated) else "interrupted", err=True)
            sys.exit(_interrupted_exit(err))
        except click.UsageError as err:  # one line, like every other error, instead of usage + hint + error
            if isinstance(err, getattr(click.exceptions, "NoArgsIsHelpError", ())):
                raise  # `ablate data` alone: the help, as Click shows it
            where = err.ctx.command_path if err.ctx else ctx.command_path
            click.echo(f"error: {' '.join(err.format_message().split())} (see `{where} --help`)", err=True)
            sys.exit(err.exit_code)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException, SystemExit):
            raise
        except Exception as err:  # noqa: BLE001 - the last line of defence for users
            if ctx.obj and ctx.obj.get("debug"):
                raise
            if isinstance(err, OSError) and err.errno == errno.ENOSPC:  # a full disk outside the store's writes
                click.echo(f"error: disk full ({err.filename or err.strerror}); free some space and rerun the same "
                           f"command (finished runs are kept)", err=True)
                sys.exit(UserError.exit_code)
            msg = str(err).strip().splitlines()[0] if str(err).strip() else ""
            click.echo(f"error: {type(err).__name__}: {msg} (rerun with --debug for the traceback)", err=True)
            sys.exit(1)


def _version() -> str:
    """The suite's version and the git commit it runs from (with "+dirty" for uncommitted changes)."""
    from runners.provenance import git_state, suite_version
    commit, dirty = git_state()
    return f"ablate {suite_version() or 'unknown'}" + (f", commit {commit[:12]}{'+dirty' if dirty else ''}"
                                                       if commit else ", no git checkout")


def _print_version(ctx: click.Context, value: bool) -> None:
    if value and not ctx.resilient_parsing:
        click.echo(_version())
        ctx.exit()


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--version", is_flag=True, expose_value=False, is_eager=True,
              callback=lambda ctx, _p, v: _print_version(ctx, v),
              help="Print the version and git commit, then exit.")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Run, report and benchmark ablations of the AlexNet paper's claims on CIFAR."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug
    import signal
    signal.signal(signal.SIGTERM, _terminate)
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:  # started in the background (`cmd &`): make Ctrl-C count
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _parse_seeds(value: str | None) -> list[int] | None:
    """`--seeds 3` means seeds 0,1,2; `--seeds 0,4,7` means exactly those; a comma makes a list of one (`--seeds 5,`
    is seed 5 alone, `--seeds 0,` seed 0)."""
    if value is None:
        return None
    try:
        parts = [int(p) for p in value.split(",") if p.strip()]
    except ValueError:
        raise UserError(f"--seeds {value!r}: give a count (3) or a comma-separated list (0,4,7)") from None
    count = len(parts) == 1 and "," not in value  # a lone number is a count; a comma makes a list
    if not parts or any(p < 0 for p in parts) or (count and parts[0] == 0):
        raise UserError(f"--seeds {value!r}: give a positive count (3) or a list of non-negative seeds (0,4,7; "
                        f"one seed alone as 0,)")
    from ablations.grid import MAX_SEEDS
    if (parts[0] if count else len(parts)) > MAX_SEEDS or max(parts) >= 2 ** 31:
        raise UserError(f"--seeds {value!r}: at most {MAX_SEEDS} seeds, each below 2^31")
    if count:
        return list(range(parts[0]))
    if len(set(parts)) != len(parts):
        raise UserError(f"--seeds {value!r}: a seed is listed twice")
    return parts


def _overrides(**kw) -> dict:
    return {k: v for k, v in kw.items() if v is not None}


def _resolve_budget(budget: str, grid: str, device: str) -> str:
    """`auto`: the gpu budget on a CUDA device, the grid's cpu budget otherwise (when it has one)."""
    if budget != "auto":
        return budget
    from ablations.grid import load_grid
    from runners.train import pick_device
    if pick_device(device).type == "cuda":
        return "gpu"
    return "cpu" if "cpu" in load_grid(grid).budgets else "gpu"


_run_options = [
    click.option("--budget", type=click.Choice(["auto", "gpu", "cpu"]), default="auto", show_default=True,
                 help="Budget preset from the grid file: gpu (the claim's full size), cpu (sized for a 2-core CPU), "
                      "or auto: gpu on a CUDA device, cpu otherwise."),
    click.option("--dataset", type=click.Choice(list(DATASETS)), help="Override the data set."),
    click.option("--epochs", type=int, help="Override the epoch cap of every run."),
    click.option("--seeds", help="A count (3: seeds 0, 1, 2) or a list (0,4,7; one seed alone: 0,); default: the "
                                 "grid's seeds."),
    click.option("--width", type=float, help="Override the width multiplier of the model."),
    click.option("--subset", type=int, help="Train on this many images (a fixed shuffle; 0 = all)."),
    click.option("--test-subset", type=int, help="Evaluate on this many test images (0 = all)."),
    click.option("--batch-size", type=int, help="Override the global batch size."),
    click.option("--precision", type=click.Choice(PRECISIONS), help="Override the precision."),
]

RUN_OVERRIDES = ("dataset", "epochs", "width", "subset", "test_subset", "batch_size", "precision")  # as run keys


def _with_run_options(f):
    for opt in reversed(_run_options):
        f = opt(f)
    return f


@main.command("list")
@click.option("--results", "results", default="results", show_default=True, type=click.Path(),
              help="Results folder (to count finished runs).")
@click.option("--json", "as_json", is_flag=True, help="Print the grids as JSON.")
def list_cmd(results: str, as_json: bool) -> None:
    """List the grids, the claims each tests, and their run counts."""
    from pathlib import Path

    from rich.table import Table

    from ablations.grid import expand, grid_names, load_grid
    from runners.store import Store

    table = Table(title="Grids (ablations/grids/*.toml)")
    for col in ("grid", "title", "claims", "runs (gpu)", "runs (cpu)", "done"):
        table.add_column(col)
    store = Store(Path(results))
    grids = []
    for name in grid_names():
        grid = load_grid(name)
        specs = expand(grid)
        cpu_specs = expand(grid, "cpu") if "cpu" in grid.budgets else []
        done = sum(store.is_done(name, s.run_id) for s in [*specs, *cpu_specs])
        grids.append({"grid": name, "title": grid.title, "claims": [c["id"] for c in grid.claims],
                      "tests_paper": grid.tests_paper, "runs_gpu": len(specs),
                      "runs_cpu": len(cpu_specs) if "cpu" in grid.budgets else None, "done": done})
        table.add_row(name, grid.title, ", ".join(c["id"] for c in grid.claims) or "-", str(len(specs)),
                      str(len(cpu_specs)) if "cpu" in grid.budgets else "-", str(done))
    if as_json:
        click.echo(json.dumps(grids, indent=2))
        return
    table_console().print(table)


@main.command("show")
@click.argument("grid", required=False)
@click.argument("settings", nargs=-1, metavar="[KEY=VALUE]...")
@click.option("--all", "all_grids", is_flag=True,
              help="Every paper grid (the whole reproduction): runs, done, pending, estimated and measured time.")
@click.option("--json", "as_json", is_flag=True, help="Print the runs and estimates as JSON.")
@_with_run_options
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N] for the probe.")
@click.option("--probe/--no-probe", default=True, show_default=True,
              help="Time a few training steps per distinct model to estimate the cost.")
@click.option("--results", default="results", show_default=True, type=click.Path())
def show_cmd(grid: str | None, settings: tuple[str, ...], all_grids: bool, budget: str, seeds: str | None,
             device: str, probe: bool, results: str, as_json: bool, **kw) -> None:
    """Show a grid's expanded runs and an estimated cost (FLOPs and a quick throughput probe); with --all, the
    whole reproduction, one line per paper grid."""
    from pathlib import Path

    from ablations.grid import parse_overrides
    from runners.cost import busy_note, estimate_rows, estimate_table

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0  # read before the probe adds its own
    busy = busy_note(load, os.cpu_count() or 1) if probe else ""
    if grid and "=" in grid:  # `ablate show --all lr=0.02`: the first setting lands in GRID
        settings, grid = (grid, *settings), None
    overrides = {**_overrides(**kw), **parse_overrides(settings)}
    if all_grids and grid is not None:
        raise UserError("give either a grid name or --all, not both")
    if not all_grids and grid is None:
        raise UserError("give one grid name (see `ablate list`) or --all for every paper grid")
    if all_grids:
        from runners.cost import paper_grids, reproduction_rows, reproduction_table
        from runners.train import pick_device
        budgets = {name: _resolve_budget(budget, name, device) for name in paper_grids()}
        rows = reproduction_rows(budgets, overrides, _parse_seeds(seeds), device, probe, Path(results))
        if as_json:
            click.echo(json.dumps(rows, indent=2))
            return
        table_console().print(reproduction_table(rows, str(pick_device(device))))
        if busy:
            click.echo(busy)
        return
    budget = _resolve_budget(budget, grid, device)
    if as_json:
        click.echo(json.dumps(estimate_rows(grid, budget, overrides, _parse_seeds(seeds), device, probe,
                                            Path(results)), indent=2, default=str))
        return
    table_console().print(estimate_table(grid, budget, overrides, _parse_seeds(seeds), device, probe, Path(results)))
    if busy:
        click.echo(busy)


@main.command("run")
@click.option("--grid", "grid", help="Grid name (see `ablate list`).")
@click.option("--all", "all_grids", is_flag=True,
              help="Every paper grid in turn (the whole reproduction; `ablate show --all` estimates it first).")
@click.argument("settings", nargs=-1, metavar="[KEY=VALUE]...")
@_with_run_options
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when present), cpu, or cuda[:N].")
@click.option("--out", "results", default="results", show_default=True, type=click.Path(),
              help="Results folder.")
@click.option("--data-dir", type=click.Path(),
              help="Data cache folder (default: $ABLATE_DATA or ~/.cache/ablate/data).")
@click.option("--dry-run", is_flag=True, help="Print the runs that would be trained, train nothing.")
@click.option("--plain", is_flag=True, help="Plain progress lines even on a terminal.")
@click.option("--no-wait", is_flag=True,
              help="Leave runs that another process is training to it instead of waiting (exit code 75).")
@click.option("--jobs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Train this many runs at once on this machine (processes sharing the grid, cores/jobs threads "
                   "each).")
@click.option("--executor", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="local: this machine; ray: every run as a Ray task (pip install -e '.[ray]').")
@click.option("--address", help="Ray cluster address HOST:PORT for --executor ray (default: a local Ray instance).")
@click.option("--nnodes", type=click.IntRange(min=1), default=1, show_default=True, envvar="ABLATE_NNODES",
              show_envvar=True, help="Nodes sharing each multi-device (DDP) run; run the same command on each.")
@click.option("--node-rank", type=click.IntRange(min=0), default=0, show_default=True, envvar="ABLATE_NODE_RANK",
              show_envvar=True, help="This node's rank; node 0 trains the grid and writes the results.")
@click.option("--rdzv", default="", envvar="ABLATE_RDZV", show_envvar=True,
              help="HOST:PORT on node 0 where the nodes of a DDP run meet (needed with --nnodes > 1).")
@click.option("--yes", "-y", is_flag=True,
              help="Start even when the estimated time is over an hour (without it such a run stops with the "
                   "estimate).")
@click.option("--checkpoint-every", type=click.FloatRange(min=0), envvar="ABLATE_CHECKPOINT_SECONDS",
              show_envvar=True, metavar="SECONDS",
              help="Checkpoint after the first epoch that ends this long after the last checkpoint; 0: after "
                   "every epoch.  [default: 30]")
@click.pass_context
def run_cmd(ctx, grid: str | None, all_grids: bool, **options) -> None:
    """Train every pending run of a grid; finished runs are skipped, interrupted ones resumed.

    KEY=VALUE overrides any run setting (lr=0.02, augment=none) or a Cartesian axis's values
    (axes.lrn=[true]), in TOML syntax; they are checked like the grid file and recorded in every run's spec.

    Exit codes: 0 all runs done (finished or diverged), 2 bad input, 3 some runs failed,
    75 some runs are being trained by another process, 130 interrupted (Ctrl-C), 143 terminated (SIGTERM);
    after 130 or 143 rerun the same command to resume from the last finished epoch. With --all, the worst of
    the grids' codes (3 before 75 before 0)."""
    if all_grids and grid is not None:
        raise UserError("give either --grid NAME or --all, not both")
    if not all_grids and grid is None:
        raise UserError("Missing option '--grid': give --grid NAME (see `ablate list`) or --all for every paper grid")
    if not all_grids:
        sys.exit(_run_grid(grid, **options))
    from runners.cost import HOUR, paper_grids, reproduction_rows
    names = paper_grids()
    if not options["yes"] and not options["dry_run"] and options["node_rank"] == 0:
        from pathlib import Path

        from ablations.grid import parse_overrides
        budgets = {n: _resolve_budget(options["budget"], n, options["device"]) for n in names}
        overrides = {**_overrides(**{k: options[k] for k in RUN_OVERRIDES}), **parse_overrides(options["settings"])}
        rows = reproduction_rows(budgets, overrides, _parse_seeds(options["seeds"]), options["device"], True,
                                 Path(options["results"]))
        pending = sum(r["estimated_pending_seconds"] for r in rows)
        if pending > HOUR:
            raise UserError(f"the reproduction's pending runs ({sum(r['pending'] for r in rows)}) are estimated at "
                            f"up to {pending / HOUR:.1f} h on this machine (at the epoch caps; early stops make it "
                            f"shorter); add --yes to start, or see `ablate show --all`")
    codes = []
    for name in names:
        click.echo(f"== grid {name}")
        codes.append(_run_grid(name, **{**options, "yes": True}))
    sys.exit(max(codes, key=lambda c: {3: 2, 75: 1}.get(c, 0 if c == 0 else 3)))


def _run_grid(grid: str, settings: tuple[str, ...], budget: str, seeds: str | None, device: str, results: str,
              data_dir: str | None, dry_run: bool, plain: bool, no_wait: bool, jobs: int, executor: str,
              address: str | None, nnodes: int, node_rank: int, rdzv: str, yes: bool,
              checkpoint_every: float | None, **kw) -> int:
    """One grid of `ablate run`; returns its exit code."""
    from pathlib import Path

    from runners.execute import run_grid
    from runners.launch import GridRequest, plan
    from runners.progress import make_reporter
    from runners.store import Store

    from ablations.grid import parse_overrides

    overrides = {**_overrides(**kw), **parse_overrides(settings)}
    seed_list = _parse_seeds(seeds)
    budget = _resolve_budget(budget, grid, device)
    if checkpoint_every is not None and not checkpoint_every < float("inf"):  # FloatRange lets nan, inf through
        raise UserError(f"--checkpoint-every (or ABLATE_CHECKPOINT_SECONDS) must be a number of seconds >= 0, got "
                        f"{checkpoint_every}")
    from runners.train import CHECKPOINT_SECONDS, TrainOptions
    options = TrainOptions(CHECKPOINT_SECONDS if checkpoint_every is None else checkpoint_every, nnodes, node_rank,
                           rdzv)  # passed to every launcher and worker process as an argument
    if dry_run:
        store = Store(Path(results))
        g, specs = plan(grid, budget, overrides, seed_list, store)
        for s in specs:
            state = store.run_state(g.name, s.run_id)
            axes = " ".join(f"{k}={v}" for k, v in s.axes if k != "epochs")  # printed after the seed
            click.echo(f"{s.run_id}  {state:7s}  {axes} seed={s.seed} epochs={s.epochs}")
        from ablations.grid import confirmation_count, expand
        later = confirmation_count(g, budget, seed_list) - (len(specs) - len(expand(g, budget, overrides, seed_list)))
        click.echo(f"{len(specs)} runs" + (f" (+ {later} confirmation runs at the chosen {g.tune['axis']} once the "
                                           f"selection runs are done)" if later > 0 else ""))
        return 0
    if executor == "ray" and (jobs > 1 or nnodes > 1):
        raise UserError("--executor ray schedules the runs itself (a run's ranks share one node): drop --jobs "
                        "and --nnodes")
    if address and executor != "ray":
        raise UserError("--address is a Ray cluster's address: use it with --executor ray")
    if jobs > 1 and nnodes > 1:
        raise UserError("--jobs and --nnodes do not mix: a multi-node grid trains one run at a time")
    data_path = Path(data_dir) if data_dir else None
    if node_rank == 0 and not yes:
        from runners.cost import check_cost
        Store(Path(results)).check_writable()
        check_cost(grid, budget, overrides, seed_list, device, Path(results))
    request = GridRequest(grid, Path(results), budget, overrides, seed_list, data_path, device, not no_wait, options)
    reporter = None
    try:
        if nnodes > 1:
            from runners.ddp import Nodes, follow_grid
            Nodes.of(options)  # a bad --rdzv: one error before anything starts
            if node_rank > 0:
                outcome = follow_grid(request, say=click.echo)
                click.echo(f"node {node_rank}: joined every multi-device run; {len(outcome.failed)} failed on this "
                           f"node")
                return outcome.exit_code
        if jobs > 1:
            from runners.executors import run_jobs
            return run_jobs(request, jobs, say=click.echo).exit_code
        reporter = make_reporter(None if not plain and executor == "local" else False)  # Ray relays plain lines
        if executor == "ray":
            from runners.executors import run_grid_ray
            outcome = run_grid_ray(request, reporter, address)
        else:
            outcome = run_grid(request, reporter)
    except KeyboardInterrupt as err:
        if reporter is not None:
            reporter.close()
        what = "terminated (SIGTERM)" if isinstance(err, Terminated) else "interrupted"
        click.echo(f"{what}: every finished epoch is saved and the run locks are released; rerun the same command "
                   f"to resume", err=True)
        sys.exit(_interrupted_exit(err))
    reused = f"{len(outcome.reused)} reused from other grids, " if outcome.reused else ""
    click.echo(f"grid {outcome.grid}: {len(outcome.trained)} trained, {len(outcome.skipped)} already done, {reused}"
               f"{len(outcome.diverged)} diverged, {len(outcome.failed)} failed, {len(outcome.busy)} busy; "
               f"results in {Path(results) / outcome.grid}")
    if outcome.busy:
        click.echo("some runs are being trained by another process; rerun later to pick up what is left",
                   err=True)
    return outcome.exit_code


for command in (data, bench_cmd, model_cmd, report_cmd):
    main.add_command(command)

if __name__ == "__main__":
    main()
