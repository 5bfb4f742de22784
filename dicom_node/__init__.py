"""dicom-node: the DICOM network node (receive, store, complete, route, send, audit) and its CLI.

Only this package touches the network, the storage folder and the database, and only its CLI configures logging.

Exceptions (one root, :class:`NodeError`):

    NodeError
    ├── StorageError        a received instance could not be written (disk full, permissions)
    ├── InvalidInstance     a dataset is unparseable or lacks / misuses its identifying UIDs
    └── SendError           a destination could not be reached or refused every instance
"""

__version__ = "0.1.0"


class NodeError(Exception):
    """Root of this package's exceptions."""


class StorageError(NodeError):
    """A received instance could not be written durably."""


class InvalidInstance(NodeError):
    """A received dataset cannot be stored: unparseable, or its UIDs are missing or malformed."""


class SendError(NodeError):
    """Sending to a destination failed as a whole (no association, or no usable presentation context)."""


__all__ = ["NodeError", "StorageError", "InvalidInstance", "SendError", "__version__"]
