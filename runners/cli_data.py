"""`ablate data`: import a CIFAR source into the local cache once, and list what the cache holds."""
from __future__ import annotations

import click

from ablations.choices import DATASETS
from runners.progress import table_console


@click.group()
def data() -> None:
    """Import and list data sets (CIFAR-10/100) in the local cache."""


_data_dir_option = click.option("--data-dir", type=click.Path(file_okay=False),
                                help="Data cache folder (default: $ABLATE_DATA or ~/.cache/ablate/data).")


@data.command("import")
@click.argument("name", type=click.Choice(list(DATASETS)))
@click.argument("source")
@_data_dir_option
@click.option("--force", is_flag=True, help="Import again even when the cache already holds this archive.")
def data_import_cmd(name: str, source: str, data_dir: str | None, force: bool) -> None:
    """Convert SOURCE once into the cache: an official cifar-10/100-python archive or its folder, a torchvision
    root, an image-folder tree or archive (train/<class>/*.png|jpg, test/...), or `download`."""
    import time

    from runners.data import cached_from, import_dataset, resolve_data_dir

    start = time.perf_counter()
    if not force and (meta := cached_from(name, source, resolve_data_dir(data_dir))) is not None:
        click.echo(f"{meta['label']} is already cached from {source} (sha256 {meta['sha256'][:12]}) in "
                   f"{resolve_data_dir(data_dir) / name}; nothing to do (--force imports it again)")
        return
    meta = import_dataset(name, source, resolve_data_dir(data_dir))
    counts = meta["counts"]
    click.echo(f"imported {meta['label']}: {counts['train']} train + {counts['test']} test images, "
               f"{meta['num_classes']} classes, sha256 {meta['sha256'][:12]} -> "
               f"{resolve_data_dir(data_dir) / name} ({time.perf_counter() - start:.1f} s)")
    if meta["lossy"]:
        click.echo(f"note: a lossy copy; results measured on it are labelled '{meta['label']}'")


@data.command("list")
@_data_dir_option
def data_list_cmd(data_dir: str | None) -> None:
    """Show the cached data sets."""
    from rich.table import Table

    from runners.data import list_datasets, resolve_data_dir

    root = resolve_data_dir(data_dir)
    found = list_datasets(root)
    if not found:
        click.echo(f"no data sets in {root}: run `ablate data import cifar10 SOURCE`")
        return
    table = Table(title=f"data sets in {root}")
    for col in ("name", "label", "train", "test", "classes", "source", "sha256"):
        table.add_column(col, justify="right" if col in ("train", "test", "classes") else "left",
                         no_wrap=col in ("name", "sha256"), overflow="fold",
                         min_width=12 if col == "source" else None)
    for m in found:
        if "error" in m:
            table.add_row(m["name"], f"[red]{m['error']}[/red]", "", "", "", "", "")
            continue
        table.add_row(m["name"], m["label"], str(m["counts"]["train"]), str(m["counts"]["test"]),
                      str(m["num_classes"]), m["source"], m["sha256"][:8])
    table_console().print(table)
