"""Routing rules: each operator, `continue`, unrouted series, explanations, and precise config errors."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from config.node import ConfigError, NodeConfig, parse_config
from config.rules import parse_rules
from pipeline.routing import SeriesFacts, check_rules, explain, route

REPO = Path(__file__).resolve().parents[1]
NODE = parse_config({"destinations": {"tps": {"ae_title": "TPS", "host": "127.0.0.1", "port": 104},
                                      "pacs": {"ae_title": "PACS", "host": "127.0.0.1", "port": 105}}})
CT = SeriesFacts({"Modality": "CT", "BodyPartExamined": "HEADNECK", "SeriesDescription": "Planning CT 2mm",
                  "SliceThickness": "2.5", "PatientAge": "061Y", "ContrastBolusAgent": ""},
                 calling_ae="TPS", called_ae="DICOMNODE", instances=128, has_structure_set=False)


def _rules(*rules, **extra):
    return parse_rules({"rules": list(rules), **extra}, NODE)


def _rule(name="r", **match):
    return {"name": name, "match": match, "run": [{"pipeline": "body"}]}


@pytest.mark.parametrize(("condition", "matches"), [
    ({"Modality": "CT"}, True),
    ({"Modality": "MR"}, False),
    ({"BodyPartExamined": {"in": ["HEAD", "HEADNECK"]}}, True),
    ({"BodyPartExamined": {"in": ["CHEST"]}}, False),
    ({"SeriesDescription": {"regex": "(?i)plan"}}, True),
    ({"SeriesDescription": {"regex": "^CBCT"}}, False),
    ({"SliceThickness": {"min": 2, "max": 3}}, True),
    ({"SliceThickness": {"max": 2}}, False),
    ({"SeriesDescription": {"present": True}}, True),
    ({"ContrastBolusAgent": {"present": False}}, True),
    ({"ContrastBolusAgent": {"present": True}}, False),
    ({"AccessionNumber": {"present": False}}, True),
    ({"calling_ae": "TPS"}, True),
    ({"calling_ae": {"in": ["PACS"]}}, False),
    ({"called_ae": "DICOMNODE"}, True),
    ({"instances": {"min": 100}}, True),
    ({"instances": {"max": 50}}, False),
    ({"has_structure_set": True}, False),
    ({"has_structure_set": False}, True),
])
def test_each_operator(condition, matches):
    assert bool(route(CT, _rules(_rule(**condition)))) is matches


def test_all_conditions_must_hold_and_reasons_name_each_failure():
    rules = _rules(_rule(Modality="MR", instances={"max": 10}, SeriesDescription={"regex": "^CBCT"}))
    (verdict,) = explain(CT, rules)
    assert not verdict.matched
    assert verdict.reasons == ("Modality is 'CT', not 'MR'", "instances is 128, above 10",
                               "SeriesDescription is 'Planning CT 2mm', does not match /^CBCT/")


def test_first_match_wins_unless_continue():
    first, second, third = _rule("a", Modality="CT"), _rule("b", Modality="CT"), _rule("c", Modality="CT")
    assert [r.name for r in route(CT, _rules(first, second))] == ["a"]
    first["continue"] = True
    assert [r.name for r in route(CT, _rules(first, second, third))] == ["a", "b"]
    verdicts = explain(CT, _rules(first, second, third))
    assert [(v.matched, v.applied) for v in verdicts] == [(True, True), (True, True), (True, False)]


def test_unrouted_series_matches_nothing():
    rules = _rules(_rule(Modality="MR"), unrouted={"forward": ["pacs"]})
    assert route(CT, rules) == [] and rules.unrouted.forward == ["pacs"]


def test_output_both_means_rtstruct_and_seg():
    rule = _rules({**_rule(), "output": ["both"]}).rules[0]
    assert rule.formats == ["rtstruct", "seg"]


def test_schema_and_semantic_errors_name_the_rule_and_key():
    with pytest.raises(ConfigError) as info:
        _rules(
            {"name": "bad regex", "match": {"SeriesDescription": {"regex": "(unclosed"}}},
            {"name": "bad key", "match": {"ModalityTypo": "CT"}},
            {"name": "empty cond", "match": {"Modality": {}}},
            {"name": "bad output", "output": ["rtstruct", "pdf"]},
        )
    text = "\n".join(info.value.problems)
    assert "rules.0.match.SeriesDescription.regex (rule 'bad regex'): invalid regular expression" in text
    assert "rules.1.match (rule 'bad key'): 'ModalityTypo' is neither a DICOM keyword" in text
    assert "rules.2.match.Modality (rule 'empty cond'): a condition needs at least one of" in text
    assert "rules.3.output.1 (rule 'bad output')" in text
    with pytest.raises(ConfigError) as info:
        _rules({"name": "x", "send": ["reply", "nowhere"], "forward": ["pacs"]}, unrouted={"forward": ["gone"]})
    assert info.value.problems == [
        "rules.0.send.1 (rule 'x'): unknown destination 'nowhere'; known: pacs, tps, or reply",
        "unrouted.forward.0: unknown destination 'gone'; known: pacs, tps"]
    with pytest.raises(ConfigError) as info:
        _rules({"name": "a"}, {"name": "a"})
    assert "repeated: ['a']" in str(info.value)


def test_pipeline_names_and_params_are_checked():
    rules = _rules({"name": "x", "run": [{"pipeline": "organz"}, {"pipeline": "body", "params": {"levl": 1}}]})
    problems = check_rules(rules)
    assert problems[0].startswith("rules.0.run.0 (rule 'x'): unknown pipeline 'organz'; registered pipelines:")
    assert "body" in problems[0]
    assert problems[1].startswith("rules.0.run.1 (rule 'x'): pipeline 'body' params: levl: unknown parameter")


def test_rules_cli_check_and_dry_run(openkbp_series, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text(
        "rules:\n"
        "  - {name: mr only, match: {Modality: MR}, run: [{pipeline: body}]}\n"
        "  - name: hn\n    match: {Modality: CT, BodyPartExamined: {in: [HEADNECK]}, calling_ae: TPS}\n"
        "    run: [{pipeline: body}]\n    output: [both]\n    send: [reply]\n")
    node = tmp_path / "node.yaml"
    node.write_text("destinations: {tps: {ae_title: TPS, host: 127.0.0.1, port: 104}}\nrules: rules.yaml\n")
    cli = [sys.executable, "-m", "dicom_node.cli", "rules"]
    ok = subprocess.run(cli + ["check", "--config", str(node)], capture_output=True, text=True)
    assert ok.returncode == 0 and "OK (2 rule(s): mr only, hn)" in ok.stdout
    dry = subprocess.run(cli + ["test", "--config", str(node), str(openkbp_series[0].parent)],
                         capture_output=True, text=True)
    assert dry.returncode == 0, dry.stderr
    assert "no       mr only: Modality is 'CT', not 'MR'" in dry.stdout
    assert "MATCH    hn" in dry.stdout and "run body  -> rtstruct, seg" in dry.stdout
    assert "send to reply -> tps (TPS@127.0.0.1:104)" in dry.stdout
    other = subprocess.run(cli + ["test", "--config", str(node), "--calling-ae", "PACS",
                                  str(openkbp_series[0].parent)], capture_output=True, text=True)
    assert "no       hn: calling_ae is 'PACS', not 'TPS'" in other.stdout and "UNROUTED: recorded only" in other.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules: [{name: x, run: [{pipeline: nope}]}]\n")
    refused = subprocess.run(cli + ["check", "--config", str(node), str(bad)], capture_output=True, text=True)
    assert refused.returncode == 1 and "unknown pipeline 'nope'" in refused.stderr


def test_example_rules_are_valid():
    from config.node import load_node_config
    from dicom_node.runtime import load_checked_rules

    cfg = load_node_config(REPO / "config" / "node.example.yaml")
    rules = load_checked_rules(cfg.rules, cfg)
    assert [r.name for r in rules.rules] == ["head-and-neck external", "thorax lungs", "seeded tumour"]
    assert isinstance(cfg, NodeConfig)


def test_series_facts_are_not_looked_up_as_dicom_keywords():
    """A rule matching calling_ae once made the node ask pydicom for a keyword 'calling_ae' (a warning, which
    stopped routing); facts are supplied by the node, never read from the dataset."""
    import warnings

    from pydicom import Dataset

    from pipeline.routing import attributes_of

    ds = Dataset()
    ds.Modality = "CT"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert attributes_of(ds, ["Modality", "calling_ae", "called_ae", "instances", "has_structure_set"]) == {
            "Modality": "CT"}
