"""The typed config: defaults, clear errors, and the workflow schema generated from it."""

import json
import logging
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from cryovae.cli import RESOURCE_LINE, VERBS, build_parser, main
from cryovae.config import GLOBAL_KEYS, Config, json_schema, load_config, stage_config_json, validate_config
from cryovae.errors import InputError

REPO = Path(__file__).resolve().parents[1]
MINIMAL = {"structures": {"a": "demo:globule_a", "b": "demo:rod_a"}}


def test_shipped_schema_is_generated_from_the_typed_config():
    shipped = json.loads((REPO / "workflow/schemas/config.schema.json").read_text())
    assert shipped == json_schema(), "run: cryovae schema --output workflow/schemas/config.schema.json"


@pytest.mark.parametrize("name", ["config.yaml", "config/shrec2021.yaml", "config/suits.yaml",
                                  "config/alphanumeric.yaml", "tests/configs/tiny.yaml",
                                  "tests/configs/tiny_images.yaml"])
def test_shipped_configs_validate_both_ways(name):
    data = yaml.safe_load((REPO / name).read_text())
    jsonschema.validate(data, json_schema())
    cfg = validate_config(data)
    assert cfg.box_size % 2 == 0 and len(cfg.seen_classes) >= 2


def test_default_config_sets_every_key():
    """Every key of the typed config is set, in its own section, in the embedded default."""
    data = yaml.safe_load((REPO / "config.yaml").read_text())
    assert set(data) == set(Config.model_fields)
    for section, field in Config.model_fields.items():
        keys = getattr(field.annotation, "model_fields", None)
        if keys is not None:
            assert set(data[section]) == set(keys), section


def test_defaults_fill_in_and_resolve_soap_parameters():
    cfg = validate_config(MINIMAL)
    assert cfg.output_dir == "results" and cfg.seed == 0
    assert cfg.affinity.resolved() == {"r_cut": 6.0, "n_max": 6, "l_max": 6, "sigma": 1.0}
    cg = validate_config({**MINIMAL, "affinity": {"mode": "coarse_grained", "r_cut": 9}})
    assert cg.affinity.resolved() == {"r_cut": 9.0, "n_max": 4, "l_max": 4, "sigma": 2.0}


@pytest.mark.parametrize(
    "patch, key, expected",
    [
        ({"box_size": 33}, "box_size", "even"),
        ({"training": {"epochs": 0}}, "training.epochs", "greater than or equal to 1"),
        ({"training": {"decoder": "gan"}}, "training.decoder", "'cnn' or 'splat'"),
        ({"simulation": {"snr": -1}}, "simulation.snr", "greater than 0"),
        ({"simualtion": {}}, "simualtion", "Extra inputs are not permitted"),
        ({"unseen": ["zzz"]}, "(top level)", "unseen class 'zzz'"),
        ({"simulation": {"tilt_range_deg": [60, -60]}}, "simulation.tilt_range_deg", "min < max"),
        ({"extraction": {"tomograms": {"test": {"tomogram": "t.mrc", "coordinates": "c.csv"}}}},
         "extraction.tomograms", "not train/val/test"),
    ],
)
def test_bad_config_names_key_and_expectation(patch, key, expected):
    with pytest.raises(InputError) as err:
        validate_config({**MINIMAL, **patch}, "my.yaml")
    message = str(err.value)
    assert "my.yaml" in message and key in message and expected in message


def test_load_config_from_file_and_inline_json(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({**MINIMAL, "seed": 7}))
    assert load_config(path).seed == 7
    assert load_config(json.dumps({**MINIMAL, "seed": 3})).seed == 3
    with pytest.raises(InputError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_cli_bad_config_exits_2_with_one_message(tmp_path, capsys):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({**MINIMAL, "box_size": 31}))
    code = main(["provenance", "--config", str(path), "--output", str(tmp_path / "p.json")])
    assert code == 2
    assert "box_size" in capsys.readouterr().err
    assert not (tmp_path / "p.json").exists()


def test_a_verb_ends_its_log_with_its_wall_time_cpu_time_and_peak_memory(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    assert main(["provenance", "--config", json.dumps(MINIMAL), "--output", str(tmp_path / "p.json")]) == 0
    match = RESOURCE_LINE.fullmatch(caplog.records[-1].getMessage())
    assert match is not None, caplog.records[-1].getMessage()
    assert match["verb"] == "provenance"
    wall, cpu, peak = float(match["wall_s"]), float(match["cpu_s"]), float(match["peak_mib"])
    # the process has run this test session's imports: CPU and memory are those of a python
    assert 0 < wall and 0 < cpu and 20 < peak < 64 * 1024


def test_provenance_records_version_and_config(tmp_path):
    out = tmp_path / "p.json"
    assert main(["provenance", "--config", json.dumps(MINIMAL), "--output", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["config"]["structures"] == MINIMAL["structures"]
    assert record["cryovae_version"].startswith("0.")


def test_every_verb_and_argument_has_help_and_the_example_parses():
    """All verbs of the CLI (VERBS and schema): help on every argument; the example is a valid call."""
    parser = build_parser()
    verbs = parser._subparsers._group_actions[0].choices
    assert sorted(verbs) == sorted([*VERBS, "schema"])
    for verb, sub in verbs.items():
        for action in sub._actions:
            assert action.help, (verb, action.option_strings)
        example = sub.epilog.split("example:\n", 1)[1].strip()
        words = shlex.split(example)
        assert words[:2] == ["cryovae", verb], example
        assert parser.parse_args(words[1:]).verb == verb


def _leaves(tree, prefix=""):
    """(dotted key, value) of every leaf of a nested mapping."""
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


# The embedded default's own choices, which no other config should inherit: its demo
# classes (structures has no default) and the class it holds out.
DEMO_CHOICES = {"unseen"}


def test_embedded_default_equals_the_typed_defaults_value_for_value():
    data = yaml.safe_load((REPO / "config.yaml").read_text())
    embedded = dict(_leaves(validate_config(data).model_dump(mode="json")))
    typed = dict(_leaves(validate_config({"structures": data["structures"]}).model_dump(mode="json")))
    assert embedded.keys() == typed.keys()
    differences = {k: (embedded[k], typed[k]) for k in embedded if k not in DEMO_CHOICES and embedded[k] != typed[k]}
    assert differences == {}, f"config.yaml vs Config defaults (yaml, typed): {differences}"
    # and every value written in config.yaml is the validated one (no key left for a default to fill)
    written = dict(_leaves(data))
    assert {k: v for k, v in written.items() if k in embedded and embedded[k] != v} == {}


def test_stage_slices_of_a_config_without_matching_validate():
    data = {**MINIMAL, "matching": {"enabled": False},
            "classification": {"features": ["latent"], "unknown_features": ["latent"]}}
    cfg = validate_config(data)
    for sections in [(s,) for s in Config.model_fields if s not in GLOBAL_KEYS] + [("matching", "simulation")]:
        part = load_config(stage_config_json(cfg, *sections))
        assert part.matching.enabled is False if "matching" in sections else True
    # the whole config still checks the two sections together
    with pytest.raises(InputError, match=r"lists \['fit', 'template'\] but matching.enabled is false"):
        validate_config({**MINIMAL, "matching": {"enabled": False}})


def test_batch_larger_than_the_training_split_names_both_numbers():
    data = {**MINIMAL, "simulation": {"particles_per_class": 20}, "training": {"batch_size": 41}}
    with pytest.raises(InputError, match=r"training.batch_size 41 is larger than the training split, 40 particles"):
        validate_config(data, "my.yaml")
    assert validate_config({**data, "training": {"batch_size": 40}}).training.batch_size == 40


def test_input_files_that_do_not_exist_fail_validation(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.pdb").write_text("")
    (tmp_path / "ts.mrc").write_text("")
    data = {
        "structures": {"a": "a.pdb", "b": "1bxn", "c": "demo:rod_a", "d": "missing/d.cif"},
        "maps": {"files": {"b": "maps/b.mrc"}},
        "extraction": {"tomograms": {"ts": {"tomogram": "ts.mrc", "coordinates": "ts.star"}}},
    }
    with pytest.raises(InputError) as err:
        validate_config(data, "my.yaml")
    lines = str(err.value).splitlines()
    assert lines[0] == f"invalid config my.yaml: no such file (relative paths are taken from {tmp_path}):"
    assert lines[1:4] == ["  structures.d: missing/d.cif", "  maps.files.b: maps/b.mrc",
                          "  extraction.tomograms.ts.coordinates: ts.star"]
    for name in ("missing/d.cif", "maps/b.mrc", "ts.star"):
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_text("")
    assert validate_config(data).structures["b"] == "1bxn"   # PDB ids and demo names are not files
    # a stage's slice is cut from a whole config that was checked when the workflow parsed it
    slice_json = stage_config_json(validate_config(data), "structure_options")
    (tmp_path / "a.pdb").unlink()
    assert load_config(slice_json).structures["a"] == "a.pdb"


def test_a_class_slice_holds_that_class_alone():
    data = {"structures": {"a": "demo:globule_a", "b": "demo:rod_a", "c": "demo:ring_a"}, "unseen": ["c"],
            "maps": {"files": {"b": "b.mrc"}}, "alignment": {"symmetry": {"a": "C2", "b": "D2"}}}
    cfg = Config.model_validate(data)   # (no file check: b.mrc is a name here)
    part = load_config(stage_config_json(cfg, "maps", "alignment", class_name="b"))
    assert part.structures == {"b": "demo:rod_a"} and part.unseen == []
    assert part.maps.files == {"b": "b.mrc"} and part.alignment.symmetry == {"b": "D2"}
    # the slice of one class does not change when another class does
    other = Config.model_validate({**data, "structures": {**data["structures"], "a": "demo:globule_b"},
                                   "unseen": ["a"], "maps": {"files": {"a": "x.mrc", "b": "b.mrc"}}})
    for name, same in (("b", True), ("a", False)):
        for sections in (("structure_options",), ("maps",), ("affinity",)):
            assert (stage_config_json(cfg, *sections, class_name=name)
                    == stage_config_json(other, *sections, class_name=name)) is same, (name, sections)
    with pytest.raises(InputError, match="structures: expected at least 2 classes, got 1"):
        validate_config({"structures": {"a": "demo:rod_a"}})
