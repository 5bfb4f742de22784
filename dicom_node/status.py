"""DIMSE status codes we answer with, by name (PS3.4 Annex B and C)."""

from enum import IntEnum


class Status(IntEnum):
    SUCCESS = 0x0000
    OUT_OF_RESOURCES = 0xA700  # storage: the sender keeps the data and retries
    DATASET_MISMATCH = 0xA900  # data set does not match SOP class
    CANNOT_UNDERSTAND = 0xC000  # storage: unparseable, or required identifiers missing/invalid
    PROCESSING_FAILURE = 0x0110


class RejectReason(IntEnum):
    """A-ASSOCIATE-RJ diagnostics with source 'service user' (PS3.8 9.3.4)."""

    NO_REASON = 0x01
    CALLING_AE_NOT_RECOGNISED = 0x03
    CALLED_AE_NOT_RECOGNISED = 0x07
