"""A tiny random-weight Z-Image pipeline (diffusers' ZImagePipeline) written to disk, for tests and offline
smoke runs: a 2-layer Qwen3 text model with the offline Qwen tokenizer (toy/qwen_tokenizer.py), a small
ZImageTransformer2DModel (main layers, noise and context refiners), a FLUX.1-style AutoencoderKL with 16
latent channels, scaling and shift factors, and the flow-matching Euler scheduler of Z-Image-Turbo.

It is a real pipeline directory (loaded back with ``ZImagePipeline.from_pretrained``), so the code under
test is the one real checkpoints take.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fluxlora.toy import build

TEXT_DIM = 32  # the Qwen3 hidden size = the transformer's cap_feat_dim
TINY_TRANSFORMER = dict(
    all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32, n_layers=2, n_refiner_layers=1,
    n_heads=2, n_kv_heads=2, cap_feat_dim=TEXT_DIM, axes_dims=[4, 6, 6], axes_lens=[256, 64, 64],
)
# Z-Image uses FLUX.1's VAE: 16 channels, latents normalized with a shift and a scale.
TINY_VAE = {**build.VAE_CONFIG, "latent_channels": 16, "scaling_factor": 0.3611, "shift_factor": 0.1159}
SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=False)  # Z-Image-Turbo's


def _text_encoder(vocab: int):
    from transformers import Qwen3Config, Qwen3Model

    config = Qwen3Config(vocab_size=vocab, hidden_size=TEXT_DIM, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                         tie_word_embeddings=False)
    return Qwen3Model(config).eval()


def build_tiny_z_image(out: Path, seed: int = 0) -> Path:
    """Write a tiny Z-Image pipeline (random weights, seeded) to ``out`` and return it."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, ZImagePipeline, ZImageTransformer2DModel
    from transformers import Qwen2TokenizerFast

    from fluxlora.toy.qwen_tokenizer import write_qwen_tokenizer

    out = Path(out)
    tok_dir = out.with_name(out.name + "-tokenizer")
    write_qwen_tokenizer(tok_dir)
    tokenizer = Qwen2TokenizerFast.from_pretrained(tok_dir)
    torch.manual_seed(seed)
    transformer = ZImageTransformer2DModel(**TINY_TRANSFORMER)
    with torch.no_grad():  # the pad tokens start at zero in diffusers; random ones make a padding leak visible
        transformer.x_pad_token.normal_()
        transformer.cap_pad_token.normal_()
    pipe = ZImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=AutoencoderKL(**TINY_VAE).eval(),
        text_encoder=_text_encoder(len(tokenizer)), tokenizer=tokenizer, transformer=transformer.eval(),
    )
    pipe.save_pretrained(out)
    return out
