"""`fluxlora train CONFIG --dry-run [--dump-dataset DIR]`: every model-free check, the image list, and the
images exactly as the trainer preprocesses them, without loading any weights."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import yaml
from PIL import Image

from conftest import tiny_config
from fluxlora import modelpath
from fluxlora.cli import main


@pytest.fixture
def no_model(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the dry run loaded a model")
    monkeypatch.setattr(modelpath, "load_base", refuse)


def write(tmp_path, cfg) -> str:
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    return str(path)


def test_dry_run_lists_and_dumps_what_training_sees(tmp_path, tiny_flux, subject_dir, no_model, capsys):
    from fluxlora import buckets, data
    from fluxlora.prepare import encode_groups

    cfg = tiny_config(tmp_path, tiny_flux, subject_dir, data={"center_crop": False, "random_flip": True,
                                                              "resolution": 16})
    out = tmp_path / "seen"
    assert main(["train", write(tmp_path, cfg), "--dry-run", "--dump-dataset", str(out)]) == 0
    text = capsys.readouterr().out
    assert "3 training images" in text and "00.png" in text and "dry run: every check" in text
    assert not (tmp_path / "runs").exists()  # nothing of a run is written
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest) == 6 and manifest[1]["file"].endswith("_flip.png")
    # The trainer's own preprocessing (encode_groups) with an identity "VAE": the same crops and mirrors.
    samples = data.load_samples(subject_dir, None, warn=lambda m: None)
    fam = types.SimpleNamespace(encode_images=lambda pipe, pix: pix)
    layout = buckets.for_run(cfg.model, cfg.data, [s.image.size for s in samples])
    (group,) = encode_groups(fam, None, samples, layout, False, True, cfg.train.seed)
    pixels = group.latents  # [N, 2, 3, 16, 16]
    for k, entry in enumerate(manifest):
        dumped = np.asarray(Image.open(out / entry["file"])).astype(np.float32) / 127.5 - 1.0
        trained = pixels[k // 2, k % 2].permute(1, 2, 0).numpy()
        assert np.abs(dumped - trained).max() <= 1.0 / 127.5 + 1e-6, entry["file"]
        assert (out / entry["file"]).with_suffix(".txt").read_text().strip() == entry["caption"]


def test_dry_run_exits_2_when_a_run_would_not_start(tmp_path, tiny_flux, subject_dir, no_model, capsys):
    raw = tiny_config(tmp_path, tiny_flux, subject_dir).model_dump(mode="json")
    raw["adapter"].update(init=["lora", "loram"], rank=1)
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(raw))
    assert main(["train", str(tmp_path / "bad.yaml"), "--dry-run"]) == 2
    assert "too small for loram" in capsys.readouterr().err
    ok = tiny_config(tmp_path, tiny_flux, subject_dir)
    (tmp_path / "runs" / "tiny").mkdir(parents=True)
    (tmp_path / "runs" / "tiny" / "group.json").write_text("{}")  # an existing run, no --resume
    assert main(["train", write(tmp_path, ok), "--dry-run"]) == 2
    assert "already holds a run" in capsys.readouterr().err
    assert main(["train", write(tmp_path, ok), "--dry-run", "--resume"]) == 0
