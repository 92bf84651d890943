"""The `epd-ray` command line: parse, call one function per command, print where results went.

A mistake the user can fix (unknown preset or key, value out of range, missing folder, an output folder
that holds something else) is one line on stderr and exit code 2, with nothing written.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
import yaml

from epd_ray.config import ConfigError, load_config, preset_names

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="EPD-Net face de-identification, trained and tuned with Ray.")
data_app = typer.Typer(no_args_is_help=True, help="Prepare face data sets as Parquet shards.")
app.add_typer(data_app, name="data")

USER_ERRORS = (ConfigError, FileNotFoundError, NotADirectoryError)


def fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


def parse_overrides(pairs: list[str]) -> dict[str, object]:
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            fail(f"--set {pair}: expected KEY=VALUE, for example train.epochs=3")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides


@app.command()
def tune(
    config: Optional[str] = typer.Option(None, "--config", "-c",
                                         help=f"preset ({', '.join(preset_names())}) or YAML file; default quick"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="run folder; default runs/<name>-<time>"),
    address: Optional[str] = typer.Option(None, "--address", help="join this Ray cluster ('auto' for the local one)"),
    data: Optional[Path] = typer.Option(None, "--data", help="a folder made by `epd-ray data prepare`"),
    set_: list[str] = typer.Option([], "--set", help="override a config key, e.g. --set train.epochs=3"),
) -> None:
    """Search EPD-Net's loss weights with Ray Tune; save the best model and a report."""
    from epd_ray.experiment import OutputError, default_output, run_tune

    overrides = parse_overrides(set_)
    if address:
        overrides["ray.address"] = address
    try:
        exp = load_config(config, overrides)
        if data is not None and not (data / "dataset.json").is_file():
            raise FileNotFoundError(f"{data}: no prepared data set here (dataset.json missing); "
                                    "run `epd-ray data prepare --out DIR` first")
        run = run_tune(exp, output or default_output(exp), prepared_dir=data)
    except (*USER_ERRORS, OutputError) as exc:
        fail(str(exc))
    typer.echo(f"done: best model in {run.best_dir}, report in {run.report_dir}")


@data_app.command("prepare")
def data_prepare(
    out: Path = typer.Option(..., "--out", help="folder to write the shards and dataset.json to"),
    config: Optional[str] = typer.Option(None, "--config", "-c", help="take the data section of this preset/file"),
    set_: list[str] = typer.Option([], "--set", help="override a data key, e.g. --set data.image_size=64"),
) -> None:
    """Write Parquet shards and dataset.json (classes, splits, counts, content hash)."""
    from epd_ray.data.prepare import prepare_dataset

    try:
        exp = load_config(config, parse_overrides(set_))
        prepared = prepare_dataset(exp.data, out)
    except USER_ERRORS as exc:
        fail(str(exc))
    m = prepared.manifest
    counts = ", ".join(f"{s} {m['splits'][s]['images']}" for s in ("train", "val", "test"))
    typer.echo(f"{'reused' if prepared.reused else 'prepared'} {m['num_images']} images ({counts}), "
               f"content hash {m['content_hash']} -> {prepared.path}")


def main() -> None:
    app()

