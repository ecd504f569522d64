"""Aspect-ratio buckets and multi-resolution training (fluxlora/buckets.py): the bucket rules, a batch order
that never mixes buckets and is the same every time, and runs on real photos (scikit-image's sample images,
cut to portrait, landscape and square) that resume bit for bit."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import assert_resume_matches_uninterrupted, tiny_config
from fluxlora import buckets, data

# (name, scikit-image loader, crop box (left, top, right, bottom) or None): portrait, landscape and square cuts
PHOTOS = [("astronaut", "astronaut", (110, 0, 410, 512)), ("coffee", "coffee", None),
          ("chelsea", "chelsea", None), ("rocket", "rocket", (180, 0, 460, 427)),
          ("hubble", "hubble_deep_field", (0, 0, 872, 872)), ("camera", "camera", (0, 96, 512, 416))]


@pytest.fixture(scope="module")
def photo_dir(tmp_path_factory):
    """Six real photos at about 48 px on the short side, of aspect ratios 0.59 to 1.6."""
    skdata = pytest.importorskip("skimage.data")
    d = tmp_path_factory.mktemp("photos")
    for name, loader, box in PHOTOS:
        img = Image.fromarray(getattr(skdata, loader)()).convert("RGB")
        img = img.crop(box) if box else img
        scale = 48 / min(img.size)
        img.resize((round(img.width * scale), round(img.height * scale)), Image.Resampling.LANCZOS).save(d / f"{name}.png")
    return d


def photo_config(tmp_path, tiny_flux, photo_dir, **sections):
    data_section = {"instance_prompt": "a photo of zxq", "resolution": 32, "bucket_step": 8,
                    **sections.pop("data", {})}
    return tiny_config(tmp_path, tiny_flux, photo_dir, data=data_section, **sections)


# ------------------------------------------------------------------------------------------------ rules


def test_bucket_sizes_keep_the_area_the_step_and_the_aspect_limit():
    for res, step in [(512, 64), (1024, 64), (768, 32), (32, 8)]:
        sizes = buckets.sizes_for(res, step)
        assert (res, res) in sizes
        for w, h in sizes:
            assert w % step == 0 and h % step == 0 and w * h <= res * res
            assert max(w, h) <= buckets.MAX_ASPECT * min(w, h)
            assert (w * (h + step)) > res * res  # the tallest height for that width
    assert buckets.closest((3000, 2000), buckets.sizes_for(1024, 64)) == (1216, 832)  # 3:2 -> 1.46
    assert buckets.closest((2000, 3000), buckets.sizes_for(1024, 64)) == (832, 1216)
    assert buckets.closest((900, 1000), buckets.sizes_for(1024, 64)) == (960, 1088)  # 0.9 -> 0.88, not 1


def test_layout_puts_each_image_once_per_resolution():
    sizes = [(600, 400), (400, 600), (500, 500), (610, 400)]
    lay = buckets.layout(sizes, [512, 1024], 64, bucketed=True)
    for res in (512, 1024):
        of_res = [m for s, m in zip(lay.sizes, lay.members) if abs(math.sqrt(s[0] * s[1]) - res) < res * 0.1]
        assert sorted(i for m in of_res for i in m) == [0, 1, 2, 3]
    assert lay.members[lay.sizes.index((640, 384))] == (0, 3) and lay.members[lay.sizes.index((384, 640))] == (1,)
    square = buckets.layout(sizes, [512, 1024], 64, bucketed=False)
    assert square.sizes == ((512, 512), (1024, 1024)) and square.members == ((0, 1, 2, 3),) * 2
    assert buckets.default_step([1024], 16) == 64 and buckets.default_step([64], 16) == 16
    assert buckets.default_step([256, 1024], 8) == 32


def test_batches_never_mix_buckets_cover_the_epoch_and_repeat_exactly():
    counts, bs, repeats = (3, 1, 2), 2, 2
    per = buckets.batches_per_epoch(counts, bs, repeats)
    assert per == 3 + 1 + 2
    epoch = [buckets.micro_rows(counts, k, bs, repeats, 5) for k in range(per)]
    seen = {b: [] for b in range(len(counts))}
    for b, rows in epoch:
        assert len(rows) == bs and all(0 <= r < counts[b] for r in rows)  # one bucket per batch
        seen[b] += rows
    for b, n in enumerate(counts):  # every image `repeats` times; a short bucket fills up from its own images
        assert all(seen[b].count(i) >= repeats for i in range(n))
        assert len(seen[b]) == bs * math.ceil(n * repeats / bs)
    buckets.epoch_batches.cache_clear()
    assert [buckets.micro_rows(counts, k, bs, repeats, 5) for k in range(per)] == epoch  # a function of (seed, k)
    assert [buckets.micro_rows(counts, k, bs, repeats, 5) for k in range(per, 2 * per)] != epoch  # epochs differ
    # one bucket: the endless stream a square run always used
    assert buckets.micro_rows((5,), 3, 2, 1, 7) == (0, buckets.stream_rows(5, 3, 2, 1, 7))


def test_a_mask_follows_its_image_into_a_wide_bucket():
    arr = np.full((40, 60, 3), 255, np.uint8)
    arr[10:20, 35:50] = (255, 0, 0)  # a red rectangle, and a mask marking exactly it
    mask = np.zeros((40, 60), np.uint8)
    mask[10:20, 35:50] = 255
    for seed in range(4):
        pix, m = data.prepare_pair(Image.fromarray(arr), Image.fromarray(mask), (40, 24), center_crop=False,
                                   rng=random.Random(seed))
        assert pix.shape == (3, 24, 40) and m.shape == (1, 24, 40)
        redness = ((pix[0] - pix[1]) / 2).clamp(0, 1)  # 1 on the red rectangle, 0 on white
        ys, xs = torch.meshgrid(torch.arange(24.0), torch.arange(40.0), indexing="ij")
        for weights in (redness, m[0]):
            assert weights.sum() > 20  # the rectangle is inside the crop
        centre = [((w * xs).sum() / w.sum(), (w * ys).sum() / w.sum()) for w in (redness, m[0])]
        assert abs(centre[0][0] - centre[1][0]) < 0.5 and abs(centre[0][1] - centre[1][1]) < 0.5
        assert torch.corrcoef(torch.stack([redness.flatten(), m[0].flatten()]))[0, 1] > 0.9


def test_resolution_lists_are_checked(tmp_path, tiny_flux, subject_dir):
    from fluxlora.config import ConfigError

    with pytest.raises(ConfigError, match=r"data.resolution[\s\S]*twice"):
        tiny_config(tmp_path, tiny_flux, subject_dir, data={"resolution": [32, 64, 32]})
    with pytest.raises(ConfigError, match="data.resolution"):
        tiny_config(tmp_path, tiny_flux, subject_dir, data={"resolution": [32, 40]})
    cfg = tiny_config(tmp_path, tiny_flux, subject_dir, data={"resolution": [64, 32]})
    assert cfg.data.resolutions == [64, 32] and cfg.data.largest == 64


# ------------------------------------------------------------------------------------------------ runs


def test_real_photos_train_in_their_buckets(tmp_path, tiny_flux, photo_dir):
    from fluxlora.families.pipeline import vae_factor
    from fluxlora.prepare import prepare
    from fluxlora.train import make_batch

    lines = []
    prep = prepare(photo_config(tmp_path, tiny_flux, photo_dir), torch.device("cpu"), warn=lines.append)
    sizes = [g.size for g in prep.instance.groups]
    assert {(24, 40), (32, 32), (40, 24)} <= set(sizes)  # portrait, square, landscape
    assert any("training size(s)" in line for line in lines) and any("40x24" in line for line in lines)
    by_name = {p.stem: i for i, p in enumerate(sorted(photo_dir.glob("*.png")))}
    portrait = next(g for g in prep.instance.groups if g.size == (24, 40))
    assert by_name["astronaut"] in portrait.members.tolist() and by_name["rocket"] in portrait.members.tolist()
    f = vae_factor(prep.pipe)
    for g in prep.instance.groups:  # latents of the bucket's size
        assert g.latents.shape[-2:] == (g.size[1] // f, g.size[0] // f)
    gen = torch.Generator().manual_seed(0)
    shapes = {make_batch(prep, k, 1, 0, gen).latent_hw for k in range(12)}
    assert len(shapes) >= 3


def test_a_bucketed_multi_resolution_run_resumes_bit_for_bit(tmp_path, tiny_flux, photo_dir):
    def make(name, steps):
        return photo_config(tmp_path, tiny_flux, photo_dir, name=name, data={"resolution": [16, 32]},
                            train={"steps": steps, "checkpoint_every": 2, "batch_size": 2})

    assert_resume_matches_uninterrupted(tmp_path, make, "lora")


def test_a_bucket_too_small_for_a_batch_is_named_and_lora_sb_refuses(tmp_path, tiny_flux, photo_dir):
    from fluxlora.config import ConfigError
    from fluxlora.dryrun import dry_run

    cfg = photo_config(tmp_path, tiny_flux, photo_dir, train={"batch_size": 2})
    said = []
    assert dry_run(cfg, False, None, say=said.append) == 0
    # at 32 px, step 8: 40x24 holds coffee, chelsea, camera; 24x40 astronaut, rocket; 32x32 hubble alone
    warning = next(line for line in said if "fewer than train.batch_size" in line)
    assert "bucket 32x32 holds 1 image(s) (hubble.png)" in warning
    sb = photo_config(tmp_path, tiny_flux, photo_dir, train={"batch_size": 2}, adapter={"init": "lora_sb", "rank": 4,
                                                                                         "sb_batches": 3})
    with pytest.raises(ConfigError, match="repeat images"):  # 3 of the epoch's 4 batches: 2 are filled up
        dry_run(sb, False, None, say=said.append)


def test_dry_run_dumps_each_image_at_its_bucket_size(tmp_path, tiny_flux, photo_dir):
    from fluxlora.dryrun import dry_run

    out = tmp_path / "seen"
    assert dry_run(photo_config(tmp_path, tiny_flux, photo_dir), False, str(out), say=lambda m: None) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    assert len(manifest) == len(PHOTOS)
    for entry in manifest:
        assert Image.open(out / entry["file"]).size == tuple(entry["size"])
        assert f"_{entry['size'][0]}x{entry['size'][1]}" in entry["file"]
    astronaut = next(e for e in manifest if Path(e["source"]).stem == "astronaut")
    assert astronaut["size"] == [24, 40]


def test_prior_images_are_cut_to_every_instance_bucket(tmp_path, tiny_flux, photo_dir, subject_dir):
    from fluxlora.prepare import prepare
    from fluxlora.train import make_batch

    cfg = photo_config(tmp_path, tiny_flux, photo_dir, data={"class_dir": str(subject_dir), "class_prompt": "an emblem"})
    prep = prepare(cfg, torch.device("cpu"), warn=lambda m: None)
    assert [g.size for g in prep.prior.groups] == [g.size for g in prep.instance.groups]
    gen = torch.Generator().manual_seed(0)
    for k in range(8):
        batch = make_batch(prep, k, 1, 0, gen)
        assert batch.x0.shape[0] == 2 and batch.n_instance == 1  # one instance row, one prior row, one size
