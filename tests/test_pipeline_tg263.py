"""The TG-263 structure table: valid, cross-referenced, synonyms resolve; errors name the key path."""

from __future__ import annotations

import pytest
from pydicom.sr.codedict import codes

from config.node import ConfigError
from config.structures import load_structure_table, normalize_label, parse_structure_table
from models.types import RoiType
from pipeline.builtin import BodyPipeline, BonesPipeline, LungsPipeline


def test_synonyms_and_pipeline_labels_resolve_to_tg263_names():
    table = load_structure_table()
    cases = {"BODY": "External", "left lung": "Lung_L", "Lung-Right": "Lung_R", "RightParotid": "Parotid_R",
             "LeftParotid": "Parotid_L", "mandible": "Bone_Mandible", "spinal cord": "SpinalCord",
             "Brain Stem": "Brainstem", "ptv_70": "PTV70", "oesophagus": "Esophagus"}
    for label, name in cases.items():
        assert table.resolve(label)[0] == name, label
    assert table.resolve("Flux capacitor") is None
    assert normalize_label(" Lung_L.") == "lungl"


def test_every_entry_is_usable_by_the_writers():
    table = load_structure_table()
    for name, spec in table.structures.items():
        RoiType(spec.roi_type)
        assert len(name) <= 16 and " " not in name  # TG-263: at most 16 characters, no spaces
        for key in filter(None, (spec.category, spec.type, spec.modifier)):
            assert table.code(key).scheme == "SCT"
    assert table.code("lung").value == codes.SCT.Lung.value
    assert table.code("spinal_cord").value == codes.SCT.SpinalCord.value


def test_builtin_pipeline_names_are_in_the_table():
    table = load_structure_table()
    for name in ("External", "Lung_L", "Lung_R", "Lungs", "Bones"):
        assert table.resolve(name)[0] == name
    assert {BodyPipeline.name, LungsPipeline.name, BonesPipeline.name} == {"body", "lungs", "bones"}


def _table(**structure):
    return {"codes": {"organ": {"scheme": "SCT", "value": "91772007", "meaning": "Organ"}},
            "structures": {"Heart": {"color": [255, 0, 0], "roi_type": "ORGAN", "category": "organ", "type": "organ",
                                     **structure}}}


@pytest.mark.parametrize(("change", "message"), [
    ({"type": "hart"}, "structures.Heart.type: unknown code 'hart'"),
    ({"roi_type": "OAR"}, "structures.Heart.roi_type: Input should be 'EXTERNAL'"),
    ({"color": [255, 0, 300]}, "color values must be 0-255"),
    ({"colour": [1, 2, 3]}, "structures.Heart.colour: unknown key"),
])
def test_invalid_tables_name_the_key_path(change, message):
    with pytest.raises(ConfigError) as caught:
        parse_structure_table(_table(**change), "tg263.yaml")
    assert any(message in p for p in caught.value.problems), caught.value.problems


def test_a_synonym_may_not_map_to_two_names():
    data = _table()
    data["structures"]["Cor"] = dict(data["structures"]["Heart"], synonyms=["heart"])
    with pytest.raises(ConfigError, match="'heart' already maps to 'Heart'"):
        parse_structure_table(data)
