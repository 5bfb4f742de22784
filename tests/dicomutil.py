"""Helpers to compare DICOM files by the bytes that matter."""

from __future__ import annotations

from pathlib import Path

from pydicom import dcmread
from pydicom.filereader import read_preamble, _read_file_meta_info


def dataset_bytes(path: Path) -> bytes:
    """The encoded data set after the file meta information: what a sender actually transmitted."""
    with open(path, "rb") as fp:
        read_preamble(fp, False)
        _read_file_meta_info(fp)
        return fp.read()


def sop_uid(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def transfer_syntax(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
