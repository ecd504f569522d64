"""Masked loss (fluxlora/masks.py): masks are found beside their images (or in the alpha channel), follow
every resize, crop and mirror of their image, land on the latent grid in the denoiser's layout, and weight
the loss; bad masks are named and the image trains unmasked."""

from __future__ import annotations

import random
import shutil
import types
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from conftest import tiny_config
from data_fixtures import PROMPT, lines_for, noise, save, scan
from fluxlora import data, masks
from fluxlora.families.flux import pack
from fluxlora.buckets import Layout
from fluxlora.prepare import encode_groups
from fluxlora.rundir import ArmDir
from fluxlora.runner import run

BOX = (40, 10, 56, 26)  # the subject square in a 64 x 40 picture


def square_image() -> tuple[Image.Image, Image.Image]:
    img = Image.new("RGB", (64, 40), (128, 128, 128))
    img.paste((255, 0, 0), BOX)
    mask = Image.new("L", (64, 40), 0)
    mask.paste(255, BOX)
    return img, mask


def red(pix: torch.Tensor) -> torch.Tensor:
    return (pix[0] > 0.5) & (pix[1] < -0.5)


def test_the_mask_follows_resize_crop_and_mirror():
    img, mask = square_image()
    for seed in range(5):
        pix, m = data.prepare_pair(img, mask, 32, center_crop=False, rng=random.Random(seed))
        inside = m[0] > 0.5
        assert (inside & red(pix)).sum() >= 0.8 * max(int(inside.sum()), int(red(pix).sum()))
    sample = data.Sample(Path("x.png"), img, PROMPT, mask)
    fam = types.SimpleNamespace(encode_images=lambda pipe, views: views)
    (group,) = encode_groups(fam, None, [sample], Layout(((32, 32),), ((0,),)), False, True, 3)
    views, grid = group.latents, group.masks
    for v in range(2):  # the plain and the mirrored view: the mask on the latent grid marks the red square
        cells = torch.nn.functional.adaptive_avg_pool2d(red(views[0, v]).float()[None], (32, 32))[0]
        assert torch.allclose(grid[0, v, 0], cells, atol=0.35)
    assert torch.equal(grid[0, 1], grid[0, 0].flip(-1))


def test_packed_weights_line_up_with_packed_latents():
    lat = torch.arange(2 * 4 * 4 * 6, dtype=torch.float32).view(2, 4, 4, 6)  # every element its own value
    mask = torch.zeros(2, 1, 4, 6)
    mask[:, :, 1, 3] = 1.0  # one latent cell is the subject
    w = pack(masks.element_weights(mask, 4, 0.0).contiguous())
    picked = pack(lat)[w > 0]
    assert sorted(picked.tolist()) == sorted(lat[:, :, 1, 3].flatten().tolist())
    err = torch.rand(2, 6, 16)
    assert torch.allclose(masks.weighted_mean(err, w), (err * w).sum((1, 2)) / 4)  # mean over the 4 channels


def test_masks_beside_images_alpha_masks_and_bad_masks(tmp_path):
    img, mask = square_image()
    save(img, tmp_path / "a.png")
    save(mask, tmp_path / "a.mask.png")
    save(noise(seed=1), tmp_path / "b.png")
    save(Image.new("L", (10, 10), 255), tmp_path / "b.mask.png")  # the wrong size
    save(noise(seed=2), tmp_path / "c.png")
    (tmp_path / "c.mask.png").write_bytes(b"not a png")
    save(Image.new("L", (64, 40)), tmp_path / "lonely.mask.png")
    rgba = noise(seed=3).convert("RGBA")
    rgba.putalpha(mask.resize(rgba.size))
    save(rgba, tmp_path / "d.png")
    by_name, lines = scan(tmp_path)
    assert sorted(by_name) == ["a.png", "b.png", "c.png", "d.png"]  # masks are not training images
    assert np.array_equal(np.asarray(by_name["a.png"].mask), np.asarray(mask))
    assert by_name["b.png"].mask is None and "mask is 10x10 but its image is 64x48" in lines_for(lines, "b.mask")[0]
    assert by_name["c.png"].mask is None and "mask unreadable" in lines_for(lines, "c.mask")[0]
    assert "mask without an image" in lines_for(lines, "lonely.mask")[0]
    assert by_name["d.png"].mask is None  # alpha is a mask only with data.alpha_mask
    with_alpha, _ = data.scan_folder(tmp_path, PROMPT, alpha_mask=True)
    d = next(s for s in with_alpha if s.path.name == "d.png")
    assert d.mask is not None and np.asarray(d.mask).max() == 255 and np.asarray(d.mask).min() == 0


def test_an_all_white_mask_trains_exactly_like_no_mask_and_masking_changes_training(tmp_path, tiny_flux, subject_dir):
    white, partial = tmp_path / "white", tmp_path / "partial"
    for folder, fill in ((white, 255), (partial, 0)):
        shutil.copytree(subject_dir, folder)
        for image in sorted(folder.glob("*.png")):
            m = Image.new("L", Image.open(image).size, fill)
            m.paste(255, (0, 0, 16, 16))
            save(m, image.with_name(image.stem + ".mask.png"))

    def losses(name, folder):
        cfg = tiny_config(tmp_path, tiny_flux, folder, name=name, train={"steps": 3})
        assert "error" not in run(cfg, warn=lambda m: None)[0]
        return [r["loss"] for r in ArmDir(tmp_path / "runs" / name / "lora").metrics() if "loss" in r]

    plain, masked_white, masked = losses("plain", subject_dir), losses("white", white), losses("partial", partial)
    np.testing.assert_allclose(masked_white, plain, rtol=1e-5)  # weights all 1: the plain mean
    assert not np.allclose(masked, plain, rtol=1e-3)
