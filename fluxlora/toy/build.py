"""Build the toy base model's components from configs: offline tokenizers, seeded random text encoders, and
the untrained VAE / transformer / scheduler of a small FLUX-architecture pipeline.

CLIP stays frozen at its seeded random initialization: FLUX only reads its pooled vector, a random encoder
is (almost surely) injective on our short captions, and the transformer's pooled projection learns to read
it. The small T5 is trained jointly with the transformer (``pretrain.py``): FLUX gives text tokens no
positional ids, so word order ("a red circle on a blue background") must come from T5, and a frozen random
one carried it too weakly (colour accuracy near 0.6 in a measured run).
"""

from __future__ import annotations

from pathlib import Path

import torch

from fluxlora.toy import world
from fluxlora.toy.subject import TRIGGER

T5_MAX_LENGTH = 24  # tokens; captions of the world use <= 13
CLIP_MAX_LENGTH = 77

TRANSFORMER_CONFIG = dict(
    patch_size=1, in_channels=16, num_layers=2, num_single_layers=4, attention_head_dim=32,
    num_attention_heads=4, joint_attention_dim=64, pooled_projection_dim=32, guidance_embeds=False,
    axes_dims_rope=(8, 12, 12),
)
VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32, 64, 64),
    down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
    layers_per_block=1, norm_num_groups=16, sample_size=64, mid_block_add_attention=False,
    shift_factor=0.0, scaling_factor=1.0,  # replaced by the latent statistics after pretraining
)
SCHEDULER_CONFIG = dict(
    num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
    base_image_seq_len=64, max_image_seq_len=1024,
)


def corpus() -> list[str]:
    """Every word the toy world (and its subject) can say, plus the alphabet for unseen words."""
    words = set("a on background emblem photo of the an in with".split())
    words |= set(world.COLORS) | set(world.SHAPES) | set(world.SIZES) | {TRIGGER}
    for pos in world.POSITIONS:
        words |= set(pos.split())
    words |= set("abcdefghijklmnopqrstuvwxyz0123456789")
    return sorted(words)


def _bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP byte-level alphabet: printable bytes map to themselves, the rest to code points >= 256.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def write_clip_tokenizer(out: Path) -> None:
    """CLIP BPE: byte alphabet (with and without </w>) plus merges that spell each corpus word."""
    from transformers import CLIPTokenizer

    alphabet = list(_bytes_to_unicode().values())
    vocab = alphabet + [c + "</w>" for c in alphabet]
    merges: list[tuple[str, str]] = []
    known = set(vocab)
    for word in corpus():
        if len(word) < 2:
            continue
        symbols = list(word[:-1]) + [word[-1] + "</w>"]
        left = symbols[0]
        for right in symbols[1:]:
            merged = left + right
            if merged not in known:
                merges.append((left, right))
                vocab.append(merged)
                known.add(merged)
            left = merged
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    tok = CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=merges,
                        model_max_length=CLIP_MAX_LENGTH)
    tok.save_pretrained(out)


def write_t5_tokenizer(out: Path) -> None:
    """A Unigram tokenizer built (not trained, so bit-reproducible) from the corpus: each corpus word is
    one piece, single characters are the fallback for anything else."""
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -8.0)]
    pieces += [("\u2581" + w, -1.0) for w in corpus()]
    chars = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789,.:;!?'-()"
    pieces += [(c, -10.0) for c in chars]
    tok = T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=T5_MAX_LENGTH)
    tok.save_pretrained(out)


def build_text_encoders(clip_vocab: int, t5_vocab: int, seed: int = 0):
    """Seeded random CLIP and T5 encoders (frozen; see module doc)."""
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    torch.manual_seed(seed)
    clip = CLIPTextModel(CLIPTextConfig(
        vocab_size=clip_vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=CLIP_MAX_LENGTH, projection_dim=32,
        bos_token_id=clip_vocab - 2, eos_token_id=clip_vocab - 1, pad_token_id=clip_vocab - 1,
    )).eval()
    t5 = T5EncoderModel(T5Config(
        vocab_size=t5_vocab, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
        relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", dropout_rate=0.0,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1,
    )).eval()
    return clip, t5


def build_skeleton(out: Path, seed: int = 0) -> None:
    """Write tokenizers, frozen text encoders and the scheduler; VAE/transformer come from pretraining."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from transformers import CLIPTokenizer, T5TokenizerFast

    write_clip_tokenizer(out / "tokenizer")
    write_t5_tokenizer(out / "tokenizer_2")
    clip_tok = CLIPTokenizer.from_pretrained(out / "tokenizer")
    t5_tok = T5TokenizerFast.from_pretrained(out / "tokenizer_2")
    clip, t5 = build_text_encoders(len(clip_tok), len(t5_tok), seed)
    clip.save_pretrained(out / "text_encoder")
    t5.save_pretrained(out / "text_encoder_2")
    FlowMatchEulerDiscreteScheduler(**SCHEDULER_CONFIG).save_pretrained(out / "scheduler")
