"""Config validation: every problem reported with its key path; the example is valid; README documents every key."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

from config.node import ConfigError, NodeConfig, load_node_config, parse_config, parse_peer

REPO = Path(__file__).resolve().parents[1]


def test_example_config_is_valid():
    cfg = load_node_config(REPO / "config" / "node.example.yaml")
    assert cfg.node.ae_title == "DICOMNODE" and cfg.forward == [] and cfg.rules.name == "rules.example.yaml"
    assert cfg.node.storage.is_absolute() and cfg.node.storage.is_relative_to(REPO / "config")


def test_every_problem_is_reported_with_its_key_path():
    with pytest.raises(ConfigError) as info:
        parse_config({
            "node": {"port": 70000, "ae_title": "A" * 17, "series_stable_seconds": 0, "colour": "red",
                     "database": "mysql://x"},
            "accept": [{"ae_title": "OK"}, {"ae_title": "BAD\\AE"}],
            "destinations": {"pacs": {"ae_title": "PACS", "host": "10.0.0.1"}},
            "forward": ["pacs", "nowhere"],
        })
    problems = "\n".join(info.value.problems)
    for expected in [
        "node.port: Input should be less than or equal to 65535 (got 70000)",
        "node.ae_title: String should have at most 16 characters",
        "node.series_stable_seconds: Input should be greater than 0",
        "node.colour: unknown key",
        "node.database: must be a sqlite:/// or postgresql:// URL, got 'mysql://x'",
        "accept.1.ae_title: must be 1-16 printable characters without backslash",
        "destinations.pacs.port: Field required",
        "forward.1: unknown destination 'nowhere'; known: pacs",
    ]:
        assert expected in problems, (expected, problems)
    assert len(info.value.problems) == 8


def test_relative_paths_are_taken_from_the_config_folder(tmp_path):
    path = tmp_path / "site" / "node.yaml"
    path.parent.mkdir()
    path.write_text("node: {storage: ./data, database: 'sqlite:///./state.db'}\n")
    cfg = load_node_config(path)
    assert cfg.node.storage == (tmp_path / "site" / "data").resolve()
    assert cfg.node.database == f"sqlite:///{(tmp_path / 'site').resolve()}/state.db"


@pytest.mark.parametrize("text,problem", [
    ("node: [1, 2", "(yaml)"),
    ("- just\n- a list\n", "must be a mapping"),
])
def test_unreadable_yaml_is_a_config_error(tmp_path, text, problem):
    path = tmp_path / "node.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_node_config(path)
    assert problem in str(info.value)


def test_peer_syntax():
    peer = parse_peer("PACS@127.0.0.1:4242")
    assert (peer.ae_title, peer.host, peer.port) == ("PACS", "127.0.0.1", 4242)
    assert parse_peer("tps") is None


def test_cli_config_check_exit_codes(tmp_path):
    good = subprocess.run([sys.executable, "-m", "dicom_node.cli", "config", "check",
                           str(REPO / "config" / "node.example.yaml")], capture_output=True, text=True)
    assert good.returncode == 0 and "OK" in good.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("node: {port: 0}\nforward: [x]\n")
    result = subprocess.run([sys.executable, "-m", "dicom_node.cli", "config", "check", str(bad)],
                            capture_output=True, text=True)
    assert result.returncode == 1
    assert "node.port: Input should be greater than or equal to 1 (got 0)" in result.stderr
    assert "forward.0: unknown destination 'x'" in result.stderr


def test_serve_refuses_a_bad_config(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("accept: [{ae_title: ''}]\n")
    result = subprocess.run([sys.executable, "-m", "dicom_node.cli", "serve", "--config", str(bad)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 1 and "accept.0.ae_title" in result.stderr


def _fields(model: type[BaseModel], prefix: str = "") -> list[str]:
    out = []
    for name, field in model.model_fields.items():
        assert field.description, f"{prefix}{name} has no description"
        out.append(prefix + name)
        annotation = field.annotation
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            out += _fields(annotation, prefix + name + ".")
    return out


def test_readme_documents_every_setting():
    readme = (REPO / "README.md").read_text()
    from config.node import AcceptEntry, Destination

    keys = _fields(NodeConfig) + _fields(AcceptEntry, "accept[].") + _fields(Destination, "destinations.NAME.")
    missing = [k for k in keys if f"`{k}`" not in readme]
    assert missing == [], f"README does not document: {missing}"
