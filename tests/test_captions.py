"""Caption dropout and tag shuffling (fluxlora/captions.py): variants cached once, drawn per step from the
training generator (identical across arms, exact on resume), and nothing drawn when both are off."""

from __future__ import annotations

import random

import torch

from conftest import assert_resume_matches_uninterrupted, tiny_config
from fluxlora import captions


def test_shuffling_keeps_the_first_tags_and_is_seeded():
    cap = "zxq, emblem, red background, center, sharp"
    outs = captions.variants(cap, 8, 2, random.Random(0))
    assert len(outs) == 8 and outs[0] == cap
    for v in outs:
        tags = v.split(", ")
        assert tags[:2] == ["zxq", "emblem"] and sorted(tags) == sorted(cap.split(", "))
    assert len(set(outs)) > 2 and outs == captions.variants(cap, 8, 2, random.Random(0))


def test_with_both_off_the_table_is_the_sorted_captions_and_nothing_is_drawn():
    table = captions.build(["b, x", "a"], False, 8, 0, 0.0, 0, fixed=["class"])
    assert table.texts == ["a", "b, x", "class"] and table.empty is None
    gen = torch.Generator().manual_seed(3)
    state = gen.get_state()
    rows = torch.tensor([[0], [1]])
    assert captions.pick(rows, torch.tensor([1, 0, 1]), 0.0, None, gen).tolist() == [1, 0, 1]
    assert torch.equal(gen.get_state(), state)  # the data order of runs without the features is unchanged


def test_dropout_rate_and_variants_are_drawn_from_the_generator():
    table = captions.build(["t0, a, b, c", "t1, d, e, f"], True, 4, 1, 0.25, 0)
    assert "" in table.texts and table.texts[table.empty] == ""
    variant_rows = torch.tensor([table.rows["t0, a, b, c"], table.rows["t1, d, e, f"]])
    gen = torch.Generator().manual_seed(0)
    picked = torch.cat([captions.pick(variant_rows, torch.tensor([0, 1]), 0.25, table.empty, gen)
                        for _ in range(2000)])
    share = float((picked == table.empty).float().mean())
    assert abs(share - 0.25) < 0.03
    assert set(picked.tolist()) - {table.empty} == set(variant_rows.flatten().tolist())  # every variant used


def test_a_run_with_shuffled_tags_and_dropout_encodes_once_and_resumes_exactly(tmp_path, tiny_flux, subject_dir,
                                                                               monkeypatch):
    from fluxlora.families.flux import Flux

    calls = []
    real = Flux.encode_prompts

    def counting(self, pipe, prompts, max_len):
        calls.append(len(prompts))
        return real(self, pipe, prompts, max_len)

    monkeypatch.setattr(Flux, "encode_prompts", counting)
    data = {"shuffle_tags": True, "keep_tokens": 0, "tag_variants": 3, "caption_dropout": 0.3}

    def make(name, steps):
        return tiny_config(tmp_path, tiny_flux, subject_dir, name=name, data=data,
                           train={"steps": steps, "checkpoint_every": 2})

    assert_resume_matches_uninterrupted(tmp_path, make, "lora")
    caps = [p.read_text() for p in sorted(subject_dir.glob("*.txt"))]
    table = captions.build(caps, True, 3, 0, 0.3, 0)
    assert len(table.texts) > len(caps) + 1  # shuffled orders really differ ("<scene>, <position>" swapped)
    # per run: the caption table (every variant and the empty caption), the sample prompt, the negative
    assert calls[:3] == [len(table.texts), 1, 1] and len(calls) == 9  # three runs; nothing encoded per step
