import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from netutil import free_port  # noqa: E402


@pytest.fixture
def make_node(tmp_path):
    """Start real nodes in-process on free loopback ports; every node started is stopped at teardown."""
    from config.node import parse_config
    from dicom_node.runtime import Node

    started = []

    def factory(*, accept=({"ae_title": "TPS"},), destinations=None, forward=(), stable=1.0, storage=None,
                outbox=None, database=None, rules=None, workers=None, **node_settings):
        data = {
            "node": {"ae_title": "DICOMNODE", "host": "127.0.0.1", "port": free_port(),
                     "storage": str(storage or tmp_path / "storage"),
                     "database": database or f"sqlite:///{tmp_path}/node.db",
                     "series_stable_seconds": stable, **node_settings},
            "accept": list(accept),
            "destinations": destinations or {},
            "forward": list(forward),
            "outbox": outbox or {"backoff_seconds": 0.5, "backoff_max_seconds": 2, "poll_seconds": 0.2},
            "rules": rules,
            "workers": workers or {},
        }
        node = Node(parse_config(data))
        node.start()
        started.append(node)
        return node

    yield factory
    for node in started:
        node.stop()


@pytest.fixture(scope="session")
def openkbp_series(tmp_path_factory):
    """A real 128-slice OpenKBP CT written as DICOM files (Explicit VR LE), shared read-only by tests."""
    from factories import ct_series, load_openkbp, write_series

    case = load_openkbp("validation", 0)
    folder = tmp_path_factory.mktemp("openkbp-ct")
    return write_series(ct_series(case.ct, case.spacing_zyx), folder)
