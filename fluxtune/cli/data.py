"""`fluxtune data check|prepare|sample`: check a JSONL, build its latent cache, write the sample dataset.

`check` and `sample` never import torch or ray; `prepare` starts a local Ray (or joins `--address`).
"""

from __future__ import annotations

from typing import Optional

import typer

from fluxtune.cli.console import console
from fluxtune.cli.errors import error_boundary
from fluxtune.cli.options import AddressOption
from fluxtune.flux.presets import PRESET_NAMES

app = typer.Typer(no_args_is_help=True, help="Check, prepare (latent cache) and generate training data.")


def _model_spec(model: str, seed: int) -> dict:
    return {"preset": model, "seed": seed} if model in PRESET_NAMES else {"path": model}


BUCKETS_HELP = "aspect-ratio buckets: 'auto' or sizes like 80x48,64x64,48x80 (as data.buckets)"


def _buckets_option(buckets: str | None, resolution: int) -> list[tuple[int, int]] | None:
    """`--buckets` as sizes (None: off); InputError naming the option when it does not parse or fit."""
    from fluxtune.config.errors import InputError
    from fluxtune.data.buckets import resolve_buckets

    if buckets is None:
        return None
    try:
        setting = buckets if buckets == "auto" else [[int(v) for v in size.lower().split("x")]
                                                     for size in buckets.split(",")]
        return resolve_buckets(setting, resolution)
    except ValueError as error:
        raise InputError.single("<command line>", f"--buckets {buckets}: {error}") from None


@app.command()
def check(
    jsonl: str = typer.Argument(..., help="dataset JSONL (rows: user_input.image, user_input.mask, output)"),
    skip: bool = typer.Option(False, "--skip", help="report bad rows but succeed when some rows are good"),
    buckets: Optional[str] = typer.Option(None, help=BUCKETS_HELP + "; prints how many rows go to each"),
    resolution: Optional[int] = typer.Option(None, help="training resolution (as data.resolution): masks whose "
                                                        "hole the training crop cuts away are bad rows; buckets are "
                                                        "sized for it (default 64)"),
    mask_threshold: float = typer.Option(0.5, help="mask grey level at or above which pixels are inpainted"),
) -> None:
    """Check every row (JSON, keys, files, decoding, sizes, masks) and report all problems with line numbers."""
    from fluxtune.data.selection import select_rows

    with error_boundary():
        _check_settings(resolution, mask_threshold)
        sizes = _buckets_option(buckets, resolution or 64)
        selection = select_rows(jsonl, {"on_bad_rows": "skip" if skip else "fail", "resolution": resolution,
                                        "buckets": sizes, "mask_threshold": mask_threshold})
    for problem in selection.skipped:
        typer.echo(f"skipped: {problem}", err=True)
    skipped = f", {len(selection.skipped)} problems in skipped rows" if selection.skipped else ""
    console.print(f"{jsonl}: {len(selection.rows)} good rows{skipped}", markup=False, highlight=False)
    if sizes:
        from fluxtune.data.buckets import bucket_histogram, format_size
        from fluxtune.data.images import image_size

        histogram = bucket_histogram((image_size(row.image) for row in selection.rows), sizes)
        for size, count in histogram.items():
            console.print(f"  bucket {format_size(size)}: {count} rows")


def _check_settings(resolution: int | None, mask_threshold: float) -> None:
    from fluxtune.config.errors import InputError
    from fluxtune.data.images import check_mask_threshold, check_resolution

    try:
        if resolution is not None:
            check_resolution(resolution)
        check_mask_threshold(mask_threshold)
    except ValueError as error:
        raise InputError.single("<command line>", str(error)) from None


@app.command()
def prepare(
    jsonl: str = typer.Argument(..., help="dataset JSONL to encode"),
    resolution: int = typer.Option(64, help="square training resolution, a multiple of 16"),
    model: str = typer.Option("tiny-fill", help=f"a preset ({', '.join(PRESET_NAMES)}) or a local FLUX.1-Fill-dev diffusers folder"),
    seed: int = typer.Option(0, help="initialisation seed of a preset"),
    mask_threshold: float = typer.Option(0.5, help="mask grey level at or above which pixels are inpainted"),
    val_jsonl: Optional[str] = typer.Option(None, help="explicit validation JSONL (cached with the rows)"),
    skip: bool = typer.Option(False, "--skip", help="drop bad rows instead of failing (as on_bad_rows: skip)"),
    buckets: Optional[str] = typer.Option(None, help=BUCKETS_HELP),
    cache_dir: Optional[str] = typer.Option(None, help="cache home, a folder or a URI (as data.cache_dir)"),
    address: AddressOption = None,
) -> None:
    """Encode latents, masks and prompt embeddings once into a Parquet cache that training then reuses."""
    from fluxtune.data.latent_cache import Preprocessing
    from fluxtune.data.selection import select_rows

    with error_boundary():
        sizes = _buckets_option(buckets, resolution)
    data = {"resolution": resolution, "mask_threshold": mask_threshold, "val_jsonl": val_jsonl,
            "on_bad_rows": "skip" if skip else "fail", "buckets": sizes, "cache_dir": cache_dir}
    with error_boundary():
        try:
            Preprocessing(resolution=resolution, mask_threshold=mask_threshold)
        except ValueError as error:
            from fluxtune.config.errors import InputError

            raise InputError.single("<command line>", str(error)) from None
        if model not in PRESET_NAMES:  # a folder that is no FLUX.1-Fill fails here, not inside a Ray task
            from fluxtune.config.errors import InputError
            from fluxtune.flux.layout import fill_transformer_config

            try:
                fill_transformer_config(model)
            except ValueError as error:
                raise InputError.single("--model", str(error)) from None
        select_rows(jsonl, data)  # every problem reported before Ray starts

    from fluxtune.train.datasets import prepare_sweep_data

    if address:
        from fluxtune.train.cluster import start_ray

        start_ray(address, 0)
    with error_boundary():
        prepared = prepare_sweep_data(jsonl, {"data": data, "model": _model_spec(model, seed)})
    console.print(f"{jsonl}: {prepared.summary()}")


@app.command()
def sample(
    n: int = typer.Option(64, "--n", help="number of examples"),
    out: str = typer.Option(..., "--out", help="folder to write data.jsonl and images/ into"),
    resolution: int = typer.Option(64, help="image size, a multiple of 16, at least 32"),
    seed: int = typer.Option(0, help="generator seed: same arguments, same bytes"),
) -> None:
    """Write the generated sample dataset (the one `data: {jsonl: sample}` uses)."""
    from fluxtune.config.errors import InputError
    from fluxtune.data.sample import write_sample_dataset

    with error_boundary():
        try:
            jsonl = write_sample_dataset(out, n=n, resolution=resolution, seed=seed)
        except ValueError as error:
            raise InputError.single("<command line>", str(error)) from None
    console.print(f"wrote {n} examples: {jsonl}")
