"""A tiny random-weight FLUX pipeline written to disk, for tests and offline smoke runs.

It is a real diffusers pipeline directory (loaded back with ``FluxPipeline.from_pretrained``), so the
code path under test is the one real checkpoints take. Text side as in the toy base model.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fluxlora.toy import build

TINY_TRANSFORMER = dict(
    patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16,
    num_attention_heads=2, joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=True,
    axes_dims_rope=(4, 6, 6),
)


def build_tiny_flux(out: Path, seed: int = 0, guidance_embeds: bool = True) -> Path:
    """Write a tiny FLUX pipeline (random weights, seeded) to ``out`` and return it."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    out = Path(out)
    skeleton = out.with_name(out.name + "-parts")
    build.build_skeleton(skeleton, seed)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**{**TINY_TRANSFORMER, "guidance_embeds": guidance_embeds})
    vae = AutoencoderKL(**build.VAE_CONFIG)
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**build.SCHEDULER_CONFIG), vae=vae.eval(),
        text_encoder=CLIPTextModel.from_pretrained(skeleton / "text_encoder"),
        tokenizer=CLIPTokenizer.from_pretrained(skeleton / "tokenizer"),
        text_encoder_2=T5EncoderModel.from_pretrained(skeleton / "text_encoder_2"),
        tokenizer_2=T5TokenizerFast.from_pretrained(skeleton / "tokenizer_2"),
        transformer=transformer.eval(),
    )
    pipe.save_pretrained(out)
    return out


TINY_SD3_TRANSFORMER = dict(
    sample_size=32, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
    joint_attention_dim=64, caption_projection_dim=32, pooled_projection_dim=64, out_channels=4,
    pos_embed_max_size=32,
)


def build_tiny_sd3(out: Path, seed: int = 0) -> Path:
    """A tiny random-weight StableDiffusion3Pipeline (two CLIP-with-projection encoders + T5, MMDiT, VAE)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import (CLIPTextConfig, CLIPTextModelWithProjection, CLIPTokenizer, T5EncoderModel,
                              T5TokenizerFast)

    out = Path(out)
    skeleton = out.with_name(out.name + "-parts")
    build.build_skeleton(skeleton, seed)
    clip_tok = CLIPTokenizer.from_pretrained(skeleton / "tokenizer")
    v = len(clip_tok)
    torch.manual_seed(seed)
    clips = [CLIPTextModelWithProjection(CLIPTextConfig(
        vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=build.CLIP_MAX_LENGTH, projection_dim=32, bos_token_id=v - 2,
        eos_token_id=v - 1, pad_token_id=v - 1)).eval() for _ in range(2)]
    pipe = StableDiffusion3Pipeline(
        transformer=SD3Transformer2DModel(**TINY_SD3_TRANSFORMER).eval(),
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=AutoencoderKL(**build.VAE_CONFIG).eval(),
        text_encoder=clips[0], tokenizer=clip_tok, text_encoder_2=clips[1], tokenizer_2=clip_tok,
        text_encoder_3=T5EncoderModel.from_pretrained(skeleton / "text_encoder_2"),
        tokenizer_3=T5TokenizerFast.from_pretrained(skeleton / "tokenizer_2"),
    )
    pipe.save_pretrained(out)
    return out


def _tiny_unet(cross_dim: int, xl: bool):
    from diffusers import UNet2DConditionModel

    extra = dict(addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=6 * 8 + 32) if xl else {}
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), cross_attention_dim=cross_dim, norm_num_groups=16, use_linear_projection=xl,
        **extra).eval()


def build_tiny_unet_pipeline(out: Path, xl: bool, seed: int = 0) -> Path:
    """A tiny random-weight StableDiffusionXLPipeline (xl) or StableDiffusionPipeline, written to ``out``."""
    from diffusers import (AutoencoderKL, EulerDiscreteScheduler, StableDiffusionPipeline,
                           StableDiffusionXLPipeline)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    out = Path(out)
    skeleton = out.with_name(out.name + "-parts")
    build.write_clip_tokenizer(skeleton / "tokenizer")
    tok = CLIPTokenizer.from_pretrained(skeleton / "tokenizer")
    v = len(tok)
    config = CLIPTextConfig(vocab_size=v, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=build.CLIP_MAX_LENGTH, projection_dim=32,
                            bos_token_id=v - 2, eos_token_id=v - 1, pad_token_id=v - 1)
    torch.manual_seed(seed)
    scheduler = EulerDiscreteScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                       timestep_spacing="leading", steps_offset=1)
    vae = AutoencoderKL(**{**build.VAE_CONFIG, "block_out_channels": (32, 64),
                           "down_block_types": ("DownEncoderBlock2D",) * 2,
                           "up_block_types": ("UpDecoderBlock2D",) * 2}).eval()
    if xl:
        pipe = StableDiffusionXLPipeline(
            vae=vae, text_encoder=CLIPTextModel(config).eval(), text_encoder_2=CLIPTextModelWithProjection(config).eval(),
            tokenizer=tok, tokenizer_2=tok, unet=_tiny_unet(64, xl=True), scheduler=scheduler)
    else:
        pipe = StableDiffusionPipeline(
            vae=vae, text_encoder=CLIPTextModel(config).eval(), tokenizer=tok, unet=_tiny_unet(32, xl=False),
            scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.save_pretrained(out)
    return out
