"""`fcclass data pack | ls | verify`: datasets packed once into versioned shards on a folder or an S3 bucket."""

from __future__ import annotations

from typing import Any, Optional

import typer
from rich.markup import escape
from rich.table import Table

from fcclass.cli.common import JsonOpt, _check_json_target, _emit_json, _handle_errors, _human_console, app
from fcclass.errors import DataError

data_app = typer.Typer(help="Pack a dataset once into versioned shards on a folder or an S3 bucket (`pack`), list its versions "
                            "(`ls`), check its shards (`verify`); train from it with data.dataset: shards.",
                       no_args_is_help=True, rich_markup_mode=None)
app.add_typer(data_app, name="data")


def _progress(console: Any) -> Any:
    from fcclass.training.callbacks import DecodeProgress

    return DecodeProgress(console)


def _mb(n: float) -> str:
    from fcclass.memory import human

    return human(n)


@data_app.command("pack")
@_handle_errors
def pack(
    source: str = typer.Argument(..., help="An image folder (one sub-folder per label, or train/ and test/ with one per label) "
                                 "or a built-in dataset (fashion_mnist, mnist, kmnist, cifar10, cifar100)."),
    out: str = typer.Option(..., "--out", "-o", help="Where: a folder, or s3://bucket/prefix (credentials and endpoint from "
                            "AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL)."),
    shard_mb: float = typer.Option(64.0, "--shard-mb", help="Target size of a shard in MB (a fraction is fine, e.g. 0.25)."),
    data_root: str = typer.Option("data", "--data-root", help="Where built-in datasets are (data.root)."),
    skip_unreadable: bool = typer.Option(False, "--skip-unreadable", help="Leave out files that cannot be read as images "
                                         "(they are named) rather than stop."),
    json_out: Optional[str] = JsonOpt,
) -> None:
    """Pack SOURCE into --out as a new version: only images the newest version lacks are written (packing the same
    images again writes nothing and returns the same version)."""
    from fcclass.data.shards.pack import pack as run_pack

    _check_json_target(json_out)
    console = _human_console(json_out)
    result = run_pack(source, out, shard_mb, data_root, _progress(console), skip_unreadable)
    for note in result.notes:
        console.print(f"[yellow]{escape(note)}[/yellow]", highlight=False)
    if result.reused and result.bytes_written:
        line = (f"Version [bold]{result.version}[/bold] holds these {result.images:,} images; its missing or truncated shards "
                f"were written again ({_mb(result.bytes_written)}).")
    elif result.reused:
        line = f"Version [bold]{result.version}[/bold] already holds these {result.images:,} images: nothing written."
    else:
        line = (f"Packed version [bold]{result.version}[/bold]: {result.images:,} images ({result.new_images:,} new) in "
                f"{result.shards} shards, {_mb(result.bytes_total)}; wrote {_mb(result.bytes_written)}"
                + (f" (parent {result.parent})." if result.parent else "."))
    console.print(line, highlight=False)
    if json_out != "-":
        console.print(f"Train from it: data: {{dataset: shards, path: {escape(result.dest)}}}", highlight=False)
    _emit_json(json_out, result.to_dict())


@data_app.command("ls")
@_handle_errors
def ls(
    dest: str = typer.Argument(..., help="The folder or s3://bucket/prefix `fcclass data pack` wrote."),
    json_out: Optional[str] = JsonOpt,
) -> None:
    """List the versions of a packed dataset: id, created, images per split and label, size, parent."""
    from fcclass.data.shards.store import open_store
    from fcclass.data.shards.versions import check_dataset, describe, read_versions

    _check_json_target(json_out)
    store = open_store(dest)
    check_dataset(store)
    versions = [describe(m) for m in read_versions(store)]
    if json_out != "-":
        console = _human_console(json_out)
        console.print(_versions_table(store.url, versions))
        if not versions:
            console.print("No version yet (a pack was interrupted before writing its manifest): pack again.", highlight=False)
    _emit_json(json_out, {"dest": store.url, "versions": versions})


def _versions_table(url: str, versions: list[dict[str, Any]]) -> Table:
    table = Table(title=f"Versions of {escape(url)} (newest last)", title_justify="left")
    for col, justify in (("Version", "left"), ("Created", "left"), ("Images", "right"), ("Train", "right"), ("Val", "right"),
                         ("Test", "right"), ("Labels", "right"), ("Shards", "right"), ("Size", "right"), ("Parent", "left")):
        table.add_column(col, justify=justify)  # type: ignore[arg-type]
    for v in versions:
        splits = v["splits"]
        table.add_row(v["id"], v["created"][:19].replace("T", " "), f"{v['images']:,}",
                      *(f"{splits.get(s, 0):,}" for s in ("train", "val", "test")),
                      str(len(next(iter(v["labels"].values()), {}))), str(v["shards"]), _mb(v["bytes"]), v["parent"] or "")
    return table


@data_app.command("verify")
@_handle_errors
def verify(
    dest: str = typer.Argument(..., help="The folder or s3://bucket/prefix `fcclass data pack` wrote."),
    version: Optional[str] = typer.Option(None, "--version", help="The version to check (default: the newest)."),
    json_out: Optional[str] = JsonOpt,
) -> None:
    """Re-hash every shard of a version; names each missing, truncated or damaged one (non-zero exit if any)."""
    from fcclass.data.shards.store import open_store
    from fcclass.data.shards.versions import resolve
    from fcclass.data.shards.versions import verify as run_verify

    _check_json_target(json_out)
    console = _human_console(json_out)
    store = open_store(dest)
    m = resolve(store, version)
    bad = run_verify(store, m, _progress(console))
    _emit_json(json_out, {"dest": store.url, "version": m.id, "shards": len(m.shards), "bad": [{"shard": s, "problem": p} for s, p in bad]})
    if bad:
        lines = "\n".join(f"  {s}: {p}" for s, p in bad)
        raise DataError(f"{len(bad)} of the {len(m.shards)} shards of version {m.id} are bad:\n{lines}\nDelete those shard files, "
                        f"then pack the source images again into {store.url}: the shards the newest version lacks are written again.")
    console.print(f"Version [bold]{m.id}[/bold]: all {len(m.shards)} shards ({_mb(m.nbytes)}) match their hashes.", highlight=False)
