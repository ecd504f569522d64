"""Subject metrics (fluxlora/subject_metrics.py) with tiny random CLIP and DINOv2 models built from configs
(no download): the numbers equal a direct computation, and a run logs them at every sample step."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from conftest import tiny_config


@pytest.fixture(scope="module")
def scorers(tmp_path_factory):
    """(dino dir, clip dir): tiny random models saved with their processors; CLIP uses the toy's offline tokenizer."""
    from transformers import (BitImageProcessor, CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor,
                              CLIPTokenizer, Dinov2Config, Dinov2Model)

    from fluxlora.toy import base_model_dir

    root = tmp_path_factory.mktemp("scorers")
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                             num_attention_heads=2)).save_pretrained(root / "dino")
    BitImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(root / "dino")
    tokenizer = CLIPTokenizer.from_pretrained(base_model_dir() / "tokenizer")
    config = CLIPConfig(
        text_config=dict(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id),
        vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                           num_attention_heads=2), projection_dim=16)
    CLIPModel(config).save_pretrained(root / "clip")
    processor = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    CLIPProcessor(image_processor=processor, tokenizer=tokenizer).save_pretrained(root / "clip")
    return str(root / "dino"), str(root / "clip")


def pictures(n: int, seed: int) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)) for _ in range(n)]


def test_scores_equal_a_direct_computation(scorers):
    from transformers import AutoImageProcessor, AutoModel, CLIPModel, CLIPProcessor

    from fluxlora.subject_metrics import SubjectMetrics

    instance, samples, prompts = pictures(3, 0), pictures(2, 1), ["a zxq emblem", "a red circle"]
    got = SubjectMetrics(*scorers, instance, torch.device("cpu")).score(samples, prompts)
    dino, dproc = AutoModel.from_pretrained(scorers[0]).eval(), AutoImageProcessor.from_pretrained(scorers[0])
    clip, cproc = CLIPModel.from_pretrained(scorers[1]).eval(), CLIPProcessor.from_pretrained(scorers[1])
    with torch.no_grad():
        def d(imgs):
            return F.normalize(dino(**dproc(images=imgs, return_tensors="pt")).last_hidden_state[:, 0], dim=-1)

        def ci(imgs):
            px = cproc(images=imgs, return_tensors="pt")["pixel_values"]
            return F.normalize(clip.visual_projection(clip.vision_model(pixel_values=px).pooler_output), dim=-1)

        tok = cproc(text=prompts, return_tensors="pt", padding=True)
        ct = F.normalize(clip.text_projection(clip.text_model(**tok).pooler_output), dim=-1)
        expect = {"dino": float((d(samples) @ d(instance).T).mean()),
                  "clip_i": float((ci(samples) @ ci(instance).T).mean()),
                  "clip_t": float((ci(samples) * ct).sum(-1).mean())}
    assert got == pytest.approx(expect, rel=1e-5, abs=1e-6)
    assert -1.0 <= got["dino"] <= 1.0 and got["dino"] != got["clip_i"]


def test_a_run_logs_the_subject_metrics_at_every_sample_step(tmp_path, tiny_flux, subject_dir, scorers):
    from fluxlora.runner import run

    cfg = tiny_config(tmp_path, tiny_flux, subject_dir, metrics={"subject": True, "dino": scorers[0],
                                                                 "clip": scorers[1]},
                      train={"steps": 2}, sample={"every": 1, "steps": 2, "seeds": [0, 1], "prompts": ["a zxq emblem"]})
    (result,) = run(cfg, warn=lambda m: None)
    records = [json.loads(line) for line in (tmp_path / "runs" / "tiny" / "lora" / "metrics.jsonl").read_text().splitlines()]
    scored = [r for r in records if "dino" in r]
    assert [r["step"] for r in scored] == [0, 1, 2] and all({"clip_i", "clip_t"} <= set(r) for r in scored)
    assert result["final_metrics"]["dino"] == scored[-1]["dino"]


def test_a_model_that_cannot_load_is_named(tmp_path, tiny_flux, subject_dir):
    from fluxlora.errors import ModelLoadError
    from fluxlora.subject_metrics import SubjectMetrics

    with pytest.raises(ModelLoadError, match="metrics.dino"):
        SubjectMetrics(str(tmp_path / "nothing"), str(tmp_path / "nothing"), pictures(1, 0), torch.device("cpu"))


def test_a_missing_local_scorer_is_named_before_any_model_loads(tmp_path, tiny_flux, subject_dir, scorers):
    from fluxlora import preflight
    from fluxlora.config import ConfigError

    cfg = tiny_config(tmp_path, tiny_flux, subject_dir, metrics={"subject": True, "dino": str(tmp_path / "nope"),
                                                                 "clip": scorers[1]})
    with pytest.raises(ConfigError) as err:
        preflight.check(cfg)
    assert [p.where for p in err.value.problems] == ["metrics.dino"]
    hub = tiny_config(tmp_path, tiny_flux, subject_dir, metrics={"subject": True})  # hub ids pass the check
    preflight.check(hub)
