"""A tiny random-weight FLUX.2 [klein] pipeline (Flux2KleinPipeline) written to disk, for tests and offline
smoke runs: a real pipeline directory, loaded back with ``Flux2KleinPipeline.from_pretrained``.

The pipeline reads the Qwen3 hidden states of layers (9, 18, 27) and stacks them, so the tiny text encoder
has 27 (very narrow) layers and the transformer's ``joint_attention_dim`` is three times its width. The VAE's
batch-norm statistics (the latent normalisation the pipeline applies) are random, not the identity, so a
family that skipped them would not match the pipeline.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fluxlora.toy.qwen_tokenizer import write_qwen_tokenizer

TEXT_WIDTH = 16
TEXT_LAYERS = 27  # the pipeline's default text_encoder_out_layers reach hidden state 27
TINY_FLUX2_TRANSFORMER = dict(
    patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
    num_attention_heads=2, joint_attention_dim=3 * TEXT_WIDTH, timestep_guidance_channels=32,
    axes_dims_rope=(4, 4, 4, 4), guidance_embeds=False,
)
TINY_FLUX2_VAE = dict(
    latent_channels=4, block_out_channels=(32, 64, 64), down_block_types=("DownEncoderBlock2D",) * 3,
    up_block_types=("UpDecoderBlock2D",) * 3, layers_per_block=1, norm_num_groups=16, sample_size=64,
    mid_block_add_attention=False,
)
# FLUX.2's scheduler: dynamic shifting, the pipeline passes its empirical mu.
TINY_FLUX2_SCHEDULER = dict(num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True)


def _text_encoder(vocab_size: int, pad_id: int):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(vocab_size=vocab_size, hidden_size=TEXT_WIDTH, intermediate_size=32,
                         num_hidden_layers=TEXT_LAYERS, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                         max_position_embeddings=512, tie_word_embeddings=True, pad_token_id=pad_id)
    return Qwen3ForCausalLM(config).eval()


def _vae():
    from diffusers import AutoencoderKLFlux2

    vae = AutoencoderKLFlux2(**TINY_FLUX2_VAE).eval()
    with torch.no_grad():  # latent statistics that are not the identity
        vae.bn.running_mean.copy_(torch.randn(vae.bn.num_features) * 0.2)
        vae.bn.running_var.copy_(torch.rand(vae.bn.num_features) * 1.5 + 0.5)
    return vae


def build_tiny_flux2(out: Path, seed: int = 0, distilled: bool = False) -> Path:
    """Write a tiny Flux2KleinPipeline (random weights, seeded) to ``out`` and return it. ``distilled``: the
    pipeline's ``is_distilled`` flag (no classifier-free guidance at sampling)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import Qwen2TokenizerFast

    out = Path(out)
    tok_dir = out.with_name(out.name + "-tokenizer")
    write_qwen_tokenizer(tok_dir)
    tokenizer = Qwen2TokenizerFast.from_pretrained(tok_dir)
    torch.manual_seed(seed)
    pipe = Flux2KleinPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**TINY_FLUX2_SCHEDULER), vae=_vae(),
        text_encoder=_text_encoder(len(tokenizer), tokenizer.pad_token_id), tokenizer=tokenizer,
        transformer=Flux2Transformer2DModel(**TINY_FLUX2_TRANSFORMER).eval(), is_distilled=distilled,
    )
    pipe.save_pretrained(out)
    return out

