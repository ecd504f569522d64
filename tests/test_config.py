"""Config: strict schema, every problem at once with path/value/fix, safe YAML, overrides."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from PIL import Image

from fluxlora.config import ConfigError, config_hash, dump_config, load_config, parse_config

ROOT = Path(__file__).resolve().parents[1]
MINIMAL = {"name": "t", "model": {"path": "toy"}, "data": {"instance_dir": "d"}}


def problems_of(data=None, overrides=(), text=None, tmp_path=None):
    with pytest.raises(ConfigError) as e:
        if text is not None:
            p = tmp_path / "c.yaml"
            p.write_text(text)
            load_config(p, overrides)
        else:
            parse_config(data, overrides)
    return e.value.problems


def test_defaults_and_round_trip(tmp_path):
    cfg = parse_config(MINIMAL)
    assert cfg.adapter.arms == ["lora"] and cfg.adapter.effective_alpha == 16.0
    assert cfg.train.optimizer == "adamw" and cfg.sample.seeds == [0]
    p = tmp_path / "c.yaml"
    p.write_text(dump_config(cfg))
    assert load_config(p) == cfg


def test_all_problems_reported_together_with_path_value_and_fix():
    probs = problems_of({"name": "bad name", "model": {"path": "toy", "famly": "flux"},
                         "data": {"instance_dir": "d", "resolution": 50},
                         "adapter": {"rnak": 4, "init": ["lora", "nope"]}, "train": {"lr": 5.0}})
    where = {p.where: p for p in probs}
    assert set(where) == {"name", "model.famly", "data.resolution", "adapter.rnak", "adapter.init", "train.lr"}
    assert "did you mean `family`" in where["model.famly"].fix
    assert "did you mean `rank`" in where["adapter.rnak"].fix
    assert where["data.resolution"].value == "50" and "multiple of 16" in where["data.resolution"].fix
    assert "valid: lora" in where["adapter.init"].message
    assert all(p.fix for p in probs)


def test_missing_required_sections():
    probs = problems_of({"name": "x"})
    assert {p.where for p in probs} == {"model", "data"}


@pytest.mark.parametrize("section,key,value", [
    ("train", "steps", "ten"), ("train", "steps", 1.5), ("adapter", "rank", [8]), ("adapter", "rank", 0),
    ("train", "gradient_checkpointing", "yes"), ("data", "resolution", 8), ("train", "lr", 0),
])
def test_wrong_types_and_ranges(section, key, value):
    data = {**MINIMAL, section: {**MINIMAL.get(section, {}), key: value}}
    assert [p.where for p in problems_of(data)] == [f"{section}.{key}"]


def test_numeric_strings_accepted_for_floats():
    cfg = parse_config({**MINIMAL, "train": {"lr": "1e-4"}})
    assert cfg.train.lr == pytest.approx(1e-4)


def test_init_list_and_duplicates():
    assert parse_config({**MINIMAL, "adapter": {"init": ["lora", "pissa", "loram"]}}).adapter.arms == \
        ["lora", "pissa", "loram"]
    assert "twice" in problems_of({**MINIMAL, "adapter": {"init": ["lora", "lora"]}})[0].message
    assert "empty" in problems_of({**MINIMAL, "adapter": {"init": []}})[0].message


def test_cross_field_checks():
    probs = problems_of({**MINIMAL, "data": {"instance_dir": "d", "class_dir": "c"}})
    assert "class_prompt" in probs[0].message
    probs = problems_of({**MINIMAL, "train": {"steps": 10, "warmup_steps": 10}})
    assert "warmup_steps" in probs[0].message


def test_overrides_types_nesting_and_unknown_paths():
    cfg = parse_config(MINIMAL, ["train.steps=10", "adapter.init=[lora,pissa]", "train.lr=1e-4",
                                 "model.quantize=int8", "sample.prompts=[a b, c]"])
    assert cfg.train.steps == 10 and cfg.adapter.arms == ["lora", "pissa"]
    assert cfg.train.lr == pytest.approx(1e-4) and cfg.model.quantize == "int8"
    assert cfg.sample.prompts == ["a b", "c"]
    probs = problems_of(MINIMAL, ["train.stepz=3", "nonsense"])
    assert "did you mean `steps`" in probs[0].fix and "key.path=value" in probs[1].message


def test_yaml_duplicate_key_with_line(tmp_path):
    probs = problems_of(text="name: a\nname: b\n", tmp_path=tmp_path)
    assert "duplicate key 'name'" in probs[0].message and probs[0].where.endswith(":2:1")


@pytest.mark.parametrize("text,line,column,what", [
    ("name: x\nmodel: {path: toy\ndata: {instance_dir: d}\n", 3, 5, "expected ',' or '}'"),  # unclosed {
    ("name: x\nmodel:\n  path: toy\n   dtype: fp32\n", 4, 9, "mapping values are not allowed"),  # indent
    ("name: x\nmodel:\n\tpath: toy\n", 3, 1, "'\\t'"),  # a tab
    ("name: 'x\nmodel: {path: toy}\n", 3, 1, "end of stream"),  # unclosed quote
])
def test_yaml_syntax_error_has_line_and_column(tmp_path, text, line, column, what):
    (p,) = problems_of(text=text, tmp_path=tmp_path)
    assert p.where == f"{tmp_path / 'c.yaml'}:{line}:{column}"
    assert p.message.startswith("YAML syntax error") and what in p.message and "position" in p.fix


@pytest.mark.parametrize("tag", ["!!python/object/apply:os.mkdir", "!!python/name:os.mkdir", "!!binary"])
def test_python_tags_refused(tmp_path, tag):
    target = tmp_path / "created"
    (p,) = problems_of(text=f"name: t\nmodel: {{path: {tag} ['{target}']}}\n", tmp_path=tmp_path)
    assert "unsupported YAML tag" in p.message and p.where.endswith("c.yaml:2:15")
    assert "remove the !!tag" in p.fix
    assert not target.exists()  # nothing was constructed, let alone called


def test_alias_bomb_fails_fast(tmp_path):
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for i in range(1, 9):
        prev, cur = chr(ord("a") + i - 1), chr(ord("a") + i)
        lines.append(f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    t0 = time.perf_counter()
    probs = problems_of(text="\n".join(lines) + "\n", tmp_path=tmp_path)
    assert time.perf_counter() - t0 < 1.0
    assert "alias" in probs[0].message


def test_too_many_aliases_refused_with_position(tmp_path):
    text = "name: &n x\nlist: [" + ", ".join(["*n"] * 101) + "]\n"
    (p,) = problems_of(text=text, tmp_path=tmp_path)
    assert "more than 100 YAML aliases" in p.message and p.where.endswith(f"c.yaml:2:{8 + 4 * 100}")
    assert "write the values out" in p.fix


@pytest.mark.parametrize("text,kind", [("- a\n- b\n", "list"), ("", "empty"), ("42\n", "int"),
                                       ("just a sentence\n", "str"), ("# only a comment\n", "empty")])
def test_non_mapping_documents(tmp_path, text, kind):
    (p,) = problems_of(text=text, tmp_path=tmp_path)
    assert p.where == "(document)" and p.message.endswith(f"got {kind}") and "`name:`" in p.fix


@pytest.mark.parametrize("section,key,value,bounds", [
    ("adapter", "rank", 0, ">= 1, <= 1024"), ("adapter", "rank", 2048, ">= 1, <= 1024"),
    ("train", "lr", 0, "> 0, < 1"), ("train", "lr", 1.5, "> 0, < 1"), ("train", "lr", -0.0001, "> 0, < 1"),
    ("train", "steps", 0, ">= 1"), ("train", "steps", -5, ">= 1"),
    ("data", "resolution", 8, ">= 16, <= 4096, a multiple of 16"),
    ("data", "resolution", 500, ">= 16, <= 4096, a multiple of 16"),
    ("data", "resolution", 8192, ">= 16, <= 4096, a multiple of 16"),
])
def test_out_of_range_names_field_value_and_every_limit(section, key, value, bounds):
    data = {**MINIMAL, section: {**MINIMAL.get(section, {}), key: value}}
    (p,) = problems_of(data)
    assert (p.where, p.value) == (f"{section}.{key}", repr(value))
    assert p.fix.startswith(f"use a value {bounds}")


def test_unknown_family_and_method_list_the_valid_ones():
    probs = problems_of({**MINIMAL, "model": {"path": "toy", "family": "fluxx"},
                         "adapter": {"init": ["lora", "dora"]}})
    where = {p.where: p for p in probs}
    assert set(where) == {"model.family", "adapter.init"}
    assert "unknown family 'fluxx'" in where["model.family"].message and "flux" in where["model.family"].message
    assert "['dora']" in where["adapter.init"].message and "pissa" in where["adapter.init"].message


def test_missing_file():
    with pytest.raises(ConfigError, match="not found"):
        load_config("/nonexistent/x.yaml")


def test_config_hash_ignores_key_order():
    a = parse_config({"name": "t", "model": {"path": "toy", "dtype": "bf16"}, "data": {"instance_dir": "d"}})
    b = parse_config({"data": {"instance_dir": "d"}, "model": {"dtype": "bf16", "path": "toy"}, "name": "t"})
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash(parse_config(MINIMAL))


@pytest.mark.parametrize("path", sorted((ROOT / "train_configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load_and_name_their_command(path):
    cfg = load_config(path)
    first = path.read_text().splitlines()[0]
    assert first == f"# fluxlora train train_configs/{path.name}"
    assert cfg.name


def test_a_bare_no_for_mixed_precision_is_the_word_not_false(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: t\nmodel: {path: toy}\ndata: {instance_dir: d}\ntrain: {mixed_precision: no}\n")
    assert load_config(p).train.mixed_precision == "no"
    assert load_config(p, ["train.mixed_precision=no"]).train.mixed_precision == "no"
    with pytest.raises(ConfigError, match="mixed_precision"):
        load_config(p, ["train.mixed_precision=yes"])


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "train_configs").glob("*.yaml") if p.stem != "toy_subject"))
def test_each_example_config_trains_a_step_on_its_familys_tiny_pipeline(name, tmp_path, tiny_flux, tiny_pipelines,
                                                                        subject_dir):
    """The example's own settings (objective, shift, guidance, validation, arms) with only the model, data,
    size and length swapped for tiny ones."""
    from fluxlora.runner import run

    family = load_config(ROOT / "train_configs" / f"{name}.yaml").model.family
    pipe = tiny_flux if family == "flux" else tiny_pipelines(family)
    cfg = load_config(ROOT / "train_configs" / f"{name}.yaml", [
        f"model.path={pipe}", "model.dtype=fp32", "model.quantize=none", "model.max_sequence_length=24",
        f"data.instance_dir={subject_dir}", "data.resolution=32", f"output_dir={tmp_path}", "train.steps=1",
        "train.mixed_precision=no", "sample.steps=2", "sample.seeds=[0]"])
    results = run(cfg, warn=lambda m: None)
    assert [r["arm"] for r in results] == cfg.adapter.arms and all("error" not in r for r in results), results


def test_cli_reports_config_errors_with_exit_code_2_and_no_traceback(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: t\nmodel: {path: toy}\ndata: {instance_dir: d}\nadapter: {rnak: 4}\n")
    r = subprocess.run([sys.executable, "-m", "fluxlora.cli", "train", str(p), "train.stepz=1"],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2
    assert "Traceback" not in r.stderr
    assert "adapter.rnak" in r.stderr and "train.stepz" in r.stderr and "did you mean" in r.stderr


def test_preflight_reports_data_model_and_output_problems_together(tmp_path):
    from fluxlora.runner import run

    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    cfg = parse_config({"name": "t", "output_dir": str(ro / "runs"), "model": {"path": "./missing/pipe"},
                        "data": {"instance_dir": str(tmp_path / "nope")}})
    with pytest.raises(ConfigError) as e:
        run(cfg, warn=lambda m: None)
    where = [p.where for p in e.value.problems]
    import os

    expected = ["data.instance_dir", "model.path"] + ([] if os.geteuid() == 0 else ["output_dir"])
    assert where == expected  # root can write anywhere: the output check is exercised below
    assert not (ro / "runs").exists()


def test_preflight_output_dir_not_writable(tmp_path, monkeypatch):
    import tempfile

    from fluxlora import preflight

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    cfg = parse_config({"name": "t", "output_dir": str(tmp_path / "runs"), "model": {"path": "toy"},
                        "data": {"instance_dir": str(tmp_path)}})
    problems = preflight._output_problems(cfg)
    assert problems[0].where == "output_dir" and "Permission denied" in problems[0].message


# ----- through the command line: exit code 2, every problem named with its fix, no traceback ----------

BOMB = "\n".join(['a: &a ["x","x","x","x","x","x","x","x","x"]'] + [
    f"{chr(98 + i)}: &{chr(98 + i)} [" + ",".join([f"*{chr(97 + i)}"] * 9) + "]" for i in range(8)]) + "\n"
GOOD = "name: t\nmodel: {path: toy}\ndata: {instance_dir: DATA}\n"


@pytest.mark.parametrize("text,expected", [
    ("name: x\nmodel: {path: toy\ndata: {instance_dir: d}\n", ["c.yaml:3:5", "YAML syntax error"]),
    ("- name: t\n", ["(document)", "got list"]),
    (BOMB, ["c.yaml", "alias bomb", "write the values out"]),
    ("name: !!python/object/apply:os.getcwd []\n", ["c.yaml:1:7", "unsupported YAML tag"]),
    (GOOD + "train: {steps: ten}\n", ["train.steps = 'ten'", "valid integer"]),
    (GOOD + "adapter: {rank: 0}\n", ["adapter.rank = 0", ">= 1, <= 1024"]),
    (GOOD + "train: {lr: 2}\n", ["train.lr = 2", "> 0, < 1"]),
    (GOOD.replace("DATA}", "DATA, resolution: 500}"), ["data.resolution = 500", "multiple of 16"]),
    (GOOD.replace("{path: toy}", "{path: toy, family: fluxx}"), ["model.family = 'fluxx'", "valid: flux"]),
    (GOOD + "adapter: {init: dora}\n", ["adapter.init = 'dora'", "valid: lora"]),
    (GOOD.replace("DATA", "DATA/nope"), ["data.instance_dir", "data folder does not exist", "DATA/nope"]),
    (GOOD.replace("toy", "./nope/pipe"), ["model.path = './nope/pipe'", "does not exist"]),
    (GOOD.replace("DATA}", "DATA, class_dir: ./nope, class_prompt: a dog}"), ["data.class_dir", "does not exist"]),
    (GOOD + "adapter: {init_from: ./nope.safetensors}\n", ["adapter.init_from", "file does not exist"]),
])
def test_cli_bad_config_kinds_exit_2_with_field_and_fix(tmp_path, capsys, text, expected):
    from fluxlora import cli

    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (64, 64), (200, 30, 30)).save(images / "a.png")
    config = tmp_path / "c.yaml"
    config.write_text(text.replace("DATA", str(images)))
    code = cli.main(["train", str(config), f"output_dir={tmp_path / 'runs'}"])
    err = capsys.readouterr().err
    assert code == 2 and "Traceback" not in err, err
    expected = [e.replace("DATA", str(images)) for e in expected]
    assert all(e in err for e in expected), err
    assert str(config) in err.splitlines()[0], err  # the file is named, also by the pre-run checks
    lines = [line for line in err.splitlines() if line.startswith("  - ")]
    assert lines and all(" -> fix: " in line and line.count("-> fix:") == 1 for line in lines), err
    assert not (tmp_path / "runs").exists()  # refused before the run folder is made


def test_cli_missing_config_file_and_debug_traceback(tmp_path, capsys):
    from fluxlora import cli

    missing = tmp_path / "nope.yaml"
    assert cli.main(["train", str(missing)]) == 2
    err = capsys.readouterr().err
    assert f"{missing}: config file not found -> fix:" in err and "Traceback" not in err
    with pytest.raises(ConfigError, match="config file not found"):  # --debug: the exception propagates
        cli.main(["--debug", "train", str(missing)])


def test_bad_data_refused_before_any_model_loads(tmp_path, monkeypatch):
    from fluxlora import modelpath
    from fluxlora.runner import run

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded before the checks")

    monkeypatch.setattr(modelpath, "load_base", no_loading)
    images = tmp_path / "images"
    images.mkdir()
    (images / "empty.png").write_bytes(b"")
    (images / "notes.jpg").write_text("not a picture")
    cfg = parse_config({"name": "t", "output_dir": str(tmp_path / "runs"), "model": {"path": "toy"},
                        "data": {"instance_dir": str(images), "instance_prompt": "a sks dog"}})
    with pytest.raises(ConfigError) as e:
        run(cfg, warn=lambda m: None)
    (p,) = e.value.problems
    assert p.where == "data.instance_dir" and "empty.png" in p.message and "notes.jpg" in p.message
    assert p.fix == "replace or repair the files listed above"


def test_lora_sb_refuses_scale_overrides_it_would_ignore():
    with pytest.raises(ConfigError, match=r"overrides.lora_sb sets \['alpha'\]"):
        parse_config({"name": "t", "model": {"path": "toy"}, "data": {"instance_dir": "."},
                      "adapter": {"init": ["lora", "lora_sb"], "overrides": {"lora_sb": {"alpha": 4}}}})
    cfg = parse_config({"name": "t", "model": {"path": "toy"}, "data": {"instance_dir": "."},
                        "adapter": {"init": ["lora", "lora_sb"], "overrides": {"lora_sb": {"rank": 4, "lr": 1e-4}}}})
    assert cfg.adapter.overrides["lora_sb"].rank == 4
