"""A tiny Qwen2-style byte-level BPE tokenizer with Qwen's chat template, built offline (not trained, so
bit-reproducible): the pipelines of the Qwen-text families (Z-Image, FLUX.2 [klein], Qwen-Image) format
prompts with ``apply_chat_template`` and tokenize with ``Qwen2TokenizerFast``; tests need one without a
download. The vocabulary is the byte alphabet plus merges that spell each word of the toy corpus."""

from __future__ import annotations

from pathlib import Path

from fluxlora.toy.build import _bytes_to_unicode, corpus

SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
# Qwen3's chat format (the parts the pipelines use): role turns, the generation prompt, and the empty
# thinking block that ``enable_thinking=False`` asks for.
CHAT_TEMPLATE = (
    "{%- for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + "
    "'<|im_end|>' + '\\n' }}{%- endfor %}{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{ '<think>\\n\\n</think>\\n\\n' }}"
    "{%- endif %}{%- endif %}"
)


def _vocab_and_merges() -> tuple[dict[str, int], list[tuple[str, str]]]:
    byte_char = _bytes_to_unicode()
    vocab = list(byte_char.values())
    known, merges = set(vocab), []
    for word in corpus():
        symbols = [byte_char[b] for b in (" " + word).encode()]  # GPT-2 style: the space joins the word
        left = symbols[0]
        for right in symbols[1:]:
            merged = left + right
            if merged not in known:
                merges.append((left, right))
                vocab.append(merged)
                known.add(merged)
            left = merged
    return {t: i for i, t in enumerate(vocab)}, merges


def write_qwen_tokenizer(out: Path, model_max_length: int = 512) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import Qwen2TokenizerFast

    vocab, merges = _vocab_and_merges()
    core = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    core.decoder = decoders.ByteLevel()
    tok = Qwen2TokenizerFast(tokenizer_object=core, unk_token=None, bos_token=None, eos_token="<|im_end|>",
                             pad_token="<|endoftext|>", model_max_length=model_max_length)
    tok.add_special_tokens({"additional_special_tokens": SPECIAL[1:]})
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out)
