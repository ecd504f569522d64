"""Every file of the data folder is accounted for (fluxlora/datafiles.py): GIF and TIFF are used, content is
trusted over a wrong extension, sub-folders are named (or used with data.recursive), duplicates keep the
captioned copy, and the check ends with "N images used, K skipped"."""

from __future__ import annotations

import os

import numpy as np
from PIL import Image

from data_fixtures import PROMPT, lines_for, noise, save, scan
from fluxlora.data import load_samples, scan_folder


def test_animated_gif_and_16_bit_tiff_are_used(tmp_path):
    frames = [noise(seed=s).convert("P") for s in (1, 2)]
    frames[0].save(tmp_path / "animated.gif", save_all=True, append_images=frames[1:], duration=100)
    ramp = (np.arange(64 * 48, dtype=np.uint16).reshape(48, 64) * 21).astype(np.uint16)
    Image.fromarray(ramp).save(tmp_path / "gray16.tif")  # mode I;16
    by_name, lines = scan(tmp_path)
    assert sorted(by_name) == ["animated.gif", "gray16.tif"]
    assert "first frame" in lines_for(lines, "animated.gif")[0]
    assert "16-bit image scaled to 8-bit" in lines_for(lines, "gray16.tif")[0]
    g = np.asarray(by_name["gray16.tif"].image)
    assert g.max() > 200 and g.min() < 5  # scaled, not clipped to white


def test_content_wins_over_a_wrong_or_unknown_extension(tmp_path):
    save(noise(seed=3), tmp_path / "iphone_photo.heic", format="JPEG")
    save(noise(seed=4), tmp_path / "really_a_jpeg.png", format="JPEG")
    (tmp_path / "real.heic").write_bytes(b"\x00\x00\x00\x18ftypheic" + b"\x00" * 64)  # a HEIF PIL cannot read
    os.mkfifo(tmp_path / "pipe.dat")  # never opened: the scan must not hang on it
    by_name, lines = scan(tmp_path)
    assert sorted(by_name) == ["iphone_photo.heic", "really_a_jpeg.png"]
    assert "content is JPEG, extension .heic says otherwise; used" in lines_for(lines, "iphone_photo.heic")[0]
    assert "content is JPEG, extension .png says PNG; used" in lines_for(lines, "really_a_jpeg.png")[0]
    assert "not a supported image (extension .heic" in lines_for(lines, "real.heic")[0]
    assert "not a regular file" in lines_for(lines, "pipe.dat")[0]


def test_sub_folders_are_named_or_used_with_recursive(tmp_path):
    save(noise(seed=5), tmp_path / "top.png")
    (tmp_path / "more").mkdir()
    save(noise(seed=6), tmp_path / "more" / "top.png")  # the same name in another folder: its own image
    (tmp_path / "more" / "top.txt").write_text("the sub-folder's caption")
    by_name, lines = scan(tmp_path)
    assert list(by_name) == ["top.png"] and "data.recursive=true" in lines_for(lines, "more")[0]
    samples, lines = scan_folder(tmp_path, PROMPT, recursive=True)
    assert [s.path.relative_to(tmp_path).as_posix() for s in samples] == ["more/top.png", "top.png"]
    assert [s.caption for s in samples] == ["the sub-folder's caption", PROMPT] and lines == []


def test_a_duplicate_keeps_the_copy_with_a_caption(tmp_path):
    img = noise(seed=7)
    save(img, tmp_path / "z_captioned.png")  # created first, sorts last
    (tmp_path / "z_captioned.txt").write_text("its own caption")
    save(img, tmp_path / "a_copy.bmp")
    by_name, lines = scan(tmp_path)
    assert list(by_name) == ["z_captioned.png"] and by_name["z_captioned.png"].caption == "its own caption"
    assert lines == [f"{tmp_path / 'a_copy.bmp'}: skipped: exact duplicate of z_captioned.png (kept "
                     "z_captioned.png: it has a caption file, which is used)"]


def test_the_check_ends_with_what_was_used_and_skipped(tmp_path):
    save(noise(seed=8), tmp_path / "a.png")
    save(noise(seed=9), tmp_path / "b.png")
    (tmp_path / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    (tmp_path / "notes.md").write_text("x")
    got: list[str] = []
    samples = load_samples(tmp_path, PROMPT, warn=got.append)
    assert len(samples) == 2
    assert got[-1] == f"{tmp_path}: 2 images used, 2 skipped: .DS_Store, notes.md"
    clean: list[str] = []
    for p in (tmp_path / ".DS_Store", tmp_path / "notes.md"):
        p.unlink()
    load_samples(tmp_path, PROMPT, warn=clean.append)
    assert clean == [f"{tmp_path}: 2 images used, 0 skipped"]


def test_symlink_loops_and_fifo_captions_do_not_hang_the_scan(tmp_path):
    save(noise(seed=10), tmp_path / "a.png")
    (tmp_path / "sub").mkdir()
    save(noise(seed=11), tmp_path / "sub" / "b.png")
    (tmp_path / "sub" / "up").symlink_to(tmp_path, target_is_directory=True)  # a loop back to the root
    (tmp_path / "sub" / "again").symlink_to(tmp_path, target_is_directory=True)
    os.mkfifo(tmp_path / "a.txt")  # named like a caption: never read
    samples, lines = scan_folder(tmp_path, PROMPT, recursive=True)
    assert sorted(s.path.name for s in samples) == ["a.png", "b.png"]
    assert "already scanned" in lines_for(lines, "up")[0] and "not a regular file" in lines_for(lines, "a.txt")[0]
