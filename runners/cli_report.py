"""`ablate model` (a model's layers, shapes, parameters and FLOPs) and `ablate report` (verdicts, figures,
REPORT.md, and the README's claims block): they parse, call ablations and reports, and print."""
from __future__ import annotations

import json

import click

from ablations.choices import DROPOUT_AT, POOLINGS
from runners.progress import table_console


@click.command("model")
@click.argument("arch")
@click.option("--lrn/--no-lrn", default=False, show_default=True,
              help="alexnet: the paper's LRN in conv1, conv2; convnet4: layers-18pct same-map rnorm.")
@click.option("--towers", default=1, show_default=True, type=int, help="alexnet: 2 = the paper's two columns.")
@click.option("--half-kernels", is_flag=True, help="alexnet: the paper's one-GPU net (half the conv1-4 kernels).")
@click.option("--dropout", default=0.0, show_default=True, type=float, help="alexnet: p in fc1 and fc2.")
@click.option("--dropout-at", default="outputs", show_default=True, type=click.Choice(DROPOUT_AT),
              help="alexnet: dropout on the outputs of fc1 and fc2 (the paper) or on their inputs (the seed).")
@click.option("--pooling", default="overlap", show_default=True, type=click.Choice(tuple(POOLINGS)),
              help="alexnet: overlap (3x3 s2, the paper), nonoverlap (2x2 s2; the same map sizes) or seed "
                   "(2x2, 2x2, 3x3 s2).")
@click.option("--activation", default="relu", show_default=True, help="relu, tanh, leaky_relu or gelu.")
@click.option("--width", default=1.0, show_default=True, type=float, help="Multiplies conv channels and FC widths.")
@click.option("--classes", "num_classes", default=10, show_default=True, type=int, help="10 or 100.")
@click.option("--init", default="default", show_default=True, help="default (PyTorch) or paper.")
def model_cmd(arch: str, **kw) -> None:
    """Print a model's layers, output shapes, parameters, LRN constants and FLOPs per image."""
    from ablations.models import ModelSpec, describe_model

    click.echo(describe_model(ModelSpec(arch=arch, **kw)))


@click.command("report")
@click.option("--grid", "grids", multiple=True, metavar="NAME", help="Report this grid (repeatable; default: all).")
@click.option("--results", default="results", show_default=True, type=click.Path(), help="Results folder.")
@click.option("--out", default=None, type=click.Path(), help="Report folder  [default: <results>/report]")
@click.option("--dpi", default=150, show_default=True, type=click.IntRange(min=30, max=1200),
              help="PNG resolution.")
@click.option("--json", "as_json", is_flag=True, help="Print the verdicts as JSON (the report is written as ever).")
@click.option("--readme", type=click.Path(dir_okay=False, exists=True), default=None,
              help="Also rewrite the claims block of this README (e.g. README.md) with the claims table.")
def report_cmd(grids: tuple[str, ...], results: str, out: str | None, dpi: int, as_json: bool,
               readme: str | None) -> None:
    """Aggregate results, decide each claim's verdict, write REPORT.md, verdicts.csv and figures."""
    from pathlib import Path

    from reports.render import build_report, claims_table, write_report

    report = build_report(Path(results), list(grids) or None)
    path = write_report(report, Path(out) if out else Path(results) / "report", dpi)
    if readme:
        from reports.render import update_readme
        update_readme(report, Path(readme))
    if as_json:
        rows = [{k: (None if isinstance(v, float) and v != v else v) for k, v in r.row().items()}
                for r in report.results]
        click.echo(json.dumps({"report": str(path), "verdicts": rows, "coverage": report.coverage}, indent=2,
                              default=str))
        return
    table_console().print(claims_table(report))
    for grid, notes in report.coverage.items():
        click.echo(f"{grid}: {'; '.join(notes)}")
    click.echo(f"report written to {path}")
