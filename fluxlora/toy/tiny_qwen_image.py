"""A tiny random-weight Qwen-Image pipeline (diffusers' QwenImagePipeline) written to disk, for tests and offline
smoke runs: a 2-layer Qwen2.5-VL text model (with a minimal vision tower the pipeline never calls), the offline
Qwen tokenizer (toy/qwen_tokenizer.py), a 2-block QwenImageTransformer2DModel, a small AutoencoderKLQwenImage
(the Wan-style causal 3-D VAE, factor 8) with random per-channel latent statistics, and Qwen-Image's own
flow-matching scheduler settings (dynamic exponential shift, terminal sigma 0.02).

The pipeline formats every prompt with a fixed system prompt and drops its first
``prompt_template_encode_start_idx`` (34) tokens: the system turn and ``<|im_start|>user\\n`` under the real
Qwen2 tokenizer, where each word of that system prompt is one token. The toy tokenizer spells unknown words
letter by letter, so its merges are extended here with one chain per word of the system prompt (appended, so
no toy-world word changes): the prefix is then 34 tokens as well, and the tiny pipeline drops exactly the
template, as the real one does. ``build_tiny_qwen_image`` checks that.

It is a real pipeline directory (loaded back with ``QwenImagePipeline.from_pretrained``), so the code under
test is the one real checkpoints take.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from fluxlora.toy.build import _bytes_to_unicode
from fluxlora.toy.qwen_tokenizer import write_qwen_tokenizer

TEXT_DIM = 32  # the Qwen2.5-VL hidden size = the transformer's joint_attention_dim
Z_DIM = 4  # VAE latent channels (the released VAE has 16); the transformer sees 2x2 patches: 4 * Z_DIM
TINY_TRANSFORMER = dict(patch_size=2, in_channels=4 * Z_DIM, out_channels=Z_DIM, num_layers=2,
                        attention_head_dim=16, num_attention_heads=2, joint_attention_dim=TEXT_DIM,
                        axes_dims_rope=(4, 6, 6))
TINY_VAE = dict(base_dim=8, z_dim=Z_DIM, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                temperal_downsample=[False, True, True])
# Qwen/Qwen-Image's scheduler_config.json
SCHEDULER = dict(base_image_seq_len=256, base_shift=0.5, invert_sigmas=False, max_image_seq_len=8192,
                 max_shift=0.9, num_train_timesteps=1000, shift=1.0, shift_terminal=0.02, stochastic_sampling=False,
                 time_shift_type="exponential", use_beta_sigmas=False, use_dynamic_shifting=True,
                 use_exponential_sigmas=False, use_karras_sigmas=False)


def _template_words(template: str) -> list[str]:
    """The words of the pipeline's template (system prompt, roles) as the byte-level pre-tokenizer splits them
    (' the', 'user', ...)."""
    text = re.sub(r"<\|[a-z_]+\|>", "\n", template.replace("{}", "\n"))
    return sorted({w for w in re.findall(r" ?[A-Za-z]+", text) if len(w.strip()) > 1})


def _extend_merges(tok_dir: Path, words: list[str]) -> None:
    """Append to the tokenizer's BPE one left-growing merge chain per word (as toy/qwen_tokenizer.py builds
    its own), so each word becomes one token; appended merges rank last, so existing words are unchanged.
    The new tokens take the ids after the byte-level vocabulary; the special tokens move behind them."""
    path = tok_dir / "tokenizer.json"
    data = json.loads(path.read_text())
    vocab, merges = data["model"]["vocab"], data["model"]["merges"]
    as_pairs = bool(merges) and isinstance(merges[0], list)
    byte_char = _bytes_to_unicode()
    for word in words:
        symbols = [byte_char[b] for b in word.encode()]
        left = symbols[0]
        for right in symbols[1:]:
            if left + right not in vocab:
                merges.append([left, right] if as_pairs else f"{left} {right}")
                vocab[left + right] = len(vocab)
            left += right
    for i, special in enumerate(sorted(data["added_tokens"], key=lambda t: t["id"])):
        special["id"] = len(vocab) + i
    path.write_text(json.dumps(data, ensure_ascii=False))


def _tokenizer(out: Path, template: str, drop: int):
    from transformers import Qwen2TokenizerFast

    tok_dir = out.with_name(out.name + "-tokenizer")
    write_qwen_tokenizer(tok_dir, model_max_length=2048)
    _extend_merges(tok_dir, _template_words(template))
    tokenizer = Qwen2TokenizerFast.from_pretrained(tok_dir)
    prefix = template.split("{}")[0].rsplit("<|im_start|>user", 1)[0] + "<|im_start|>user\n"
    n = len(tokenizer(prefix).input_ids)
    if n != drop:
        raise RuntimeError(f"the tiny tokenizer spells the template prefix in {n} tokens, the pipeline drops {drop}")
    return tokenizer


def _text_encoder(vocab: int, eos: int, pad: int):
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    text = dict(vocab_size=vocab, hidden_size=TEXT_DIM, intermediate_size=64, num_hidden_layers=2,
                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512, bos_token_id=None,
                eos_token_id=eos, pad_token_id=pad,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [2, 3, 3]})
    vision = dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=TEXT_DIM,
                  fullatt_block_indexes=[0], window_size=28, patch_size=14, spatial_merge_size=2)
    config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, vocab_size=vocab, tie_word_embeddings=False)
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def _vae():
    from diffusers import AutoencoderKLQwenImage

    g = torch.Generator().manual_seed(1)  # latent statistics that are not the identity
    mean = (torch.randn(Z_DIM, generator=g) * 0.3).tolist()
    std = (torch.rand(Z_DIM, generator=g) * 1.5 + 0.5).tolist()
    return AutoencoderKLQwenImage(**TINY_VAE, latents_mean=mean, latents_std=std).eval()


def build_tiny_qwen_image(out: Path, seed: int = 0) -> Path:
    """Write a tiny QwenImagePipeline (random weights, seeded) to ``out`` and return it."""
    from diffusers import FlowMatchEulerDiscreteScheduler, QwenImagePipeline, QwenImageTransformer2DModel

    out = Path(out)
    bare = QwenImagePipeline(None, None, None, None, None)  # the template and drop count its __init__ sets
    template, drop = bare.prompt_template_encode, bare.prompt_template_encode_start_idx
    tokenizer = _tokenizer(out, template, drop)
    torch.manual_seed(seed)
    pipe = QwenImagePipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**SCHEDULER), vae=_vae(), 
        text_encoder=_text_encoder(len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id),
        tokenizer=tokenizer, transformer=QwenImageTransformer2DModel(**TINY_TRANSFORMER).eval(),
    )
    pipe.save_pretrained(out)
    return out
