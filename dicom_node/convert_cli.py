"""The ``dicom-node convert`` command (registered in ``dicom_node.cli``); the work is in ``dicom_node.convert``."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

__all__ = ["convert", "SECRET_ENV"]

SECRET_ENV = "DICOM_NODE_CONVERT_SECRET"


def _secret(secret_file: Path | None, keep_identifiers: bool) -> bytes | None:
    if keep_identifiers:
        return None
    if secret_file is not None:
        try:
            secret = secret_file.read_bytes().strip()
        except OSError as exc:
            typer.echo(f"--secret-file {secret_file}: cannot read: {exc.strerror}", err=True)
            raise typer.Exit(2) from None
    else:
        secret = os.environ.get(SECRET_ENV, "").encode()
    if len(secret) < 8:
        typer.echo("pseudonymisation needs a secret of at least 8 characters: give --secret-file FILE or set "
                   f"{SECRET_ENV} (keep it: the same secret gives the same pseudonyms), or --keep-identifiers for "
                   "data that is already anonymous", err=True)
        raise typer.Exit(2)
    return secret


def _window(text: str) -> tuple[float, float]:
    try:
        level, width = (float(v) for v in text.split(","))
    except ValueError:
        typer.echo(f"--window must be LEVEL,WIDTH in HU (e.g. 40,400), got {text!r}", err=True)
        raise typer.Exit(2) from None
    return level, width


def convert(
    inputs: Annotated[list[Path], typer.Argument(help="Folders (searched recursively) or files.", exists=True)],
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder (for nnunet: the DatasetNNN_Name folder).")],
    fmt: Annotated[str, typer.Option("--format", help="npz | medsam | nnunet.")] = "npz",
    structure_set: Annotated[str, typer.Option(help="latest | all | a regex on the structure set label.")] = "latest",
    structures: Annotated[Optional[str], typer.Option(
        help="Comma-separated TG-263 names to export (and, for nnunet/medsam, their label order).")] = None,
    mapping: Annotated[Optional[Path], typer.Option(
        help="Structure name mapping YAML (default: config/structure_map.yaml).")] = None,
    secret_file: Annotated[Optional[Path], typer.Option(
        help=f"File holding the pseudonymisation secret (or set {SECRET_ENV}).")] = None,
    key_file: Annotated[Optional[Path], typer.Option(
        help="Write the pseudonym -> original identifiers table here (keep it apart from the data).")] = None,
    keep_identifiers: Annotated[bool, typer.Option(help="Do not pseudonymise (data already anonymous).")] = False,
    label_map: Annotated[bool, typer.Option(
        help="npz: one 'labels' map instead of mask_<name> arrays when structures do not overlap.")] = False,
    window: Annotated[str, typer.Option(help="medsam: CT window LEVEL,WIDTH in HU.")] = "40,400",
    compression: Annotated[int, typer.Option(help="NPZ zlib level 0-9 (0: uncompressed).")] = 1,
    workers: Annotated[int, typer.Option(min=1, help="Worker processes.")] = 1,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Convert DICOM images with their RTSTRUCT/SEG into training data (NPZ, MedSAM NPZ or nnU-Net); exit 1 if any
    case failed. The report is OUT/report.csv."""
    from config.node import ConfigError
    from config.structure_map import DEFAULT_MAP
    from dicom_node.convert import ConvertOptions, convert_inputs

    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(levelname)-7s %(name)s: %(message)s")
    if not verbose:  # pydicom logs decoder tracebacks; the report row already says why the case failed
        logging.getLogger("pydicom").setLevel(logging.CRITICAL)
    options = ConvertOptions(
        out=out, format=fmt, selection=structure_set,
        structures=tuple(s.strip() for s in structures.split(",") if s.strip()) if structures else None,
        mapping=mapping or DEFAULT_MAP, secret=_secret(secret_file, keep_identifiers), as_label_map=label_map,
        window=_window(window), compression=compression,
    )
    try:
        summary = convert_inputs(inputs, options, workers=workers, key_file=key_file, progress=sys.stderr.isatty())
    except ConfigError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    except ValueError as exc:
        typer.echo(str(exc), err=True)
        raise typer.Exit(2) from None
    counts = ", ".join(f"{summary.count(s)} {s}" for s in ("converted", "unchanged", "skipped", "failed"))
    typer.echo(f"{counts} ({summary.files} files, {summary.not_dicom} not DICOM); report: {out / 'report.csv'}")
    for row in summary.rows:
        if row["status"] == "failed":
            typer.echo(f"FAILED {row['case'] or '-'}: {row['reason']}", err=True)
    raise typer.Exit(1 if summary.failed else 0)
