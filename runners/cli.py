"""The `ablate` command line. Commands only parse, call a library function, and print.

Every UserError becomes one line on stderr and exit code 2; anything unexpected becomes one line and
exit code 1 (with the traceback only under --debug)."""
from __future__ import annotations

import sys

import click

from ablations.errors import UserError


class _Group(click.Group):
    """Turns exceptions into one clear line unless --debug was given."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except UserError as err:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            click.echo(f"error: {err}", err=True)
            sys.exit(err.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            sys.exit(130)
        except (click.exceptions.Exit, click.exceptions.Abort, click.ClickException, SystemExit):
            raise
        except Exception as err:  # noqa: BLE001 - the last line of defence for users
            if ctx.obj and ctx.obj.get("debug"):
                raise
            msg = str(err).strip().splitlines()[0] if str(err).strip() else ""
            click.echo(f"error: {type(err).__name__}: {msg} (rerun with --debug for the traceback)", err=True)
            sys.exit(1)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Run, report and benchmark ablations of the AlexNet paper's claims on CIFAR."""
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


@main.group()
def data() -> None:
    """Import and list data sets (CIFAR-10/100) in the local cache."""


if __name__ == "__main__":
    main()
