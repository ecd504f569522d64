"""The comfyui (kohya) file read back by diffusers' own kohya converter gives our trained model's output.

diffusers' reader (``_convert_kohya_flux_lora_to_diffusers``) hard-codes FLUX.1's sizes when it splits a
single block's ``linear1`` (3072, 3072, 3072, 12288), so the model here has FLUX.1's width (24 heads of
128) and block structure with one double and one single block: 531M parameters, ~1 min on 2 CPU cores.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from family_helpers import FLUX, flux_predict, generate_one
from conftest import tiny_config
from fluxlora import adapters, export, kohya
from fluxlora.families import flux
from fluxlora.formats import FORMATS
from fluxlora.rundir import GroupDir
from fluxlora.runner import run
from test_train import weights_hash

pytestmark = pytest.mark.slow
WIDE = dict(attention_head_dim=128, num_attention_heads=24, axes_dims_rope=(16, 56, 56))


@pytest.fixture(scope="module")
def wide_flux(tmp_path_factory):
    """The tiny pipeline's text encoders and VAE around a FLUX.1-width transformer (1 double + 1 single)."""
    from diffusers import FluxTransformer2DModel

    from fluxlora.toy.tiny import TINY_TRANSFORMER, build_tiny_flux

    out = build_tiny_flux(tmp_path_factory.mktemp("wide") / "pipe")
    torch.manual_seed(1)
    FluxTransformer2DModel(**{**TINY_TRANSFORMER, **WIDE}).save_pretrained(out / "transformer")
    return out


def diffusers_pipe(path):
    pipe = FLUX.load(str(path))
    return pipe, weights_hash(pipe.transformer)


def test_comfyui_and_diffusers_files_reload_exactly_in_diffusers(tmp_path, wide_flux, subject_dir):
    # The "wide" preset less the final proj_out (see the next test for layers outside the blocks): fused
    # qkv of both streams, linear1 from q, k, v and proj_mlp, the MLPs and linear2.
    modules = [m for m in FLUX.target_presets["wide"] if m != "proj_out"] + ["single_transformer_blocks.0.proj_out"]
    cfg = tiny_config(tmp_path, wide_flux, subject_dir, adapter={"init": ["lora", "loram"], "rank": 2,
                                                                  "target_modules": modules},
                      train={"steps": 2, "lr": 3.0e-2})
    assert all("error" not in r for r in run(cfg, warn=lambda m: None))
    group = GroupDir(tmp_path / "runs" / "tiny")
    pipe, base_hash = diffusers_pipe(wide_flux)
    for method in ("lora", "loram"):
        arm = group.arm(method)
        trained = np.asarray(Image.open(arm.samples_dir / "step-000002" / "00.png")).astype(int)
        untrained = np.asarray(Image.open(arm.samples_dir / "step-000000" / "00.png")).astype(int)
        assert np.abs(trained - untrained).max() > 4  # the adapter changes the image: the check has teeth
        for fmt in FORMATS:
            pipe.load_lora_weights(str(arm.export_file(fmt)), adapter_name=f"{method}_{fmt}")
            img = generate_one(FLUX, pipe, cfg.sample.prompts[0], 24)
            assert np.abs(np.asarray(img).astype(int) - trained).max() <= 1, (method, fmt)
            pipe.unload_lora_weights()
            assert weights_hash(pipe.transformer) == base_hash


def test_every_linear_module_maps_through_diffusers_kohya_reader(tmp_path, wide_flux):
    """All 50 kinds of Linear (embedders, modulations, fused qkv/linear1, the final layer with its swapped
    halves) adapted at once with random factors: diffusers' reading of our file computes our output."""
    from diffusers import FluxPipeline

    model = FLUX.load(str(wide_flux)).transformer
    out_features = adapters.linear_out_features(model)
    assert not kohya.unmappable(list(out_features), "flux")
    info = adapters.inject(model, "lora", 2, 0.7, sorted(out_features), skip_init=True)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in adapters.trainable_parameters(model):
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    x, emb, pooled = (torch.randn(1, 4, 16, generator=g), torch.randn(1, 24, 64, generator=g),
                      torch.randn(1, 32, generator=g))
    with torch.no_grad():
        ours = flux_predict(model, x, torch.tensor([0.6]), emb, pooled, flux.image_ids(4, 4), 3.5)
        state = kohya.to_kohya(adapters.export_factors(model, info), info.scale, out_features, "flux")
        adapters.remove(model, info)
        base = flux_predict(model, x, torch.tensor([0.6]), emb, pooled, flux.image_ids(4, 4), 3.5)
    path = tmp_path / "all.safetensors"
    export.save_kohya_file(path, state, {})
    # diffusers 0.42's kohya converter names the modules outside the blocks (x_embedder, context_embedder,
    # time_text_embed.*, norm_out.linear, proj_out) without the "transformer." prefix, so load_lora_weights
    # drops them (ComfyUI reads them: it maps every diffusion_model.<name>.weight to lora_unet_<name>).
    # The converter's output is used as it is; only that prefix is added here.
    converted = FluxPipeline.lora_state_dict(str(path))
    outside = [k for k in converted if not k.startswith("transformer.")]
    assert {k.rsplit(".lora_", 1)[0] for k in outside} == {n for n in out_features if "blocks." not in n}
    converted = {(k if k.startswith("transformer.") else f"transformer.{k}"): v for k, v in converted.items()}
    pipe = FluxPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=model)
    pipe.load_lora_weights(converted)
    with torch.no_grad():
        theirs = flux_predict(model, x, torch.tensor([0.6]), emb, pooled, flux.image_ids(4, 4), 3.5)
    assert (ours - base).abs().max() > 0.05
    torch.testing.assert_close(theirs, ours, rtol=0, atol=2e-4)
