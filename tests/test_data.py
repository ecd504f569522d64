"""Tests for fluxlora.data: every fixture image is generated here with PIL into tmp_path."""

from __future__ import annotations

import inspect
import os
import random
import signal
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fluxlora import data
from fluxlora.data import hflip, prepare_image, scan_folder

from data_fixtures import PROMPT, lines_for, noise, save, scan

# ------------------------------------------------------------------------------------------ formats


def test_normal_formats_and_uppercase_extension(tmp_path):
    for i, name in enumerate(["a.jpg", "b.jpeg", "c.png", "d.webp", "e.bmp", "f.PNG", "g.JpG"]):
        save(noise(seed=i), tmp_path / name)
    (tmp_path / "notes.md").write_text("not an image")
    (tmp_path / "model.gif").write_bytes(b"GIF89a")  # a header and nothing else
    (tmp_path / "._a.jpg").write_bytes(b"\x00\x05\x16\x07 AppleDouble")
    by_name, lines = scan(tmp_path)
    assert list(by_name) == ["a.jpg", "b.jpeg", "c.png", "d.webp", "e.bmp", "f.PNG", "g.JpG"]
    # every other file is named with the reason it is not used
    assert "hidden file" in lines_for(lines, "._a.jpg")[0]
    assert "not a supported image (extension .md" in lines_for(lines, "notes.md")[0]
    assert "skipped: not an image" in lines_for(lines, "model.gif")[0]
    assert len(lines) == 3
    for s in by_name.values():
        assert s.image.mode == "RGB" and s.image.size == (64, 48) and s.caption == PROMPT


def test_exif_rotation_applied(tmp_path):
    img = Image.new("RGB", (60, 40), (255, 0, 0))
    img.paste((0, 0, 255), (0, 0, 30, 40))  # left half blue, right half red
    exif = img.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    save(img, tmp_path / "rot.jpg", exif=exif, quality=95)
    s = scan(tmp_path)[0]["rot.jpg"]
    assert s.image.size == (40, 60)
    # After a 90 degree clockwise turn the stored left (blue) half is on top.
    top, bottom = s.image.getpixel((20, 5)), s.image.getpixel((20, 55))
    assert top[2] > 200 and top[0] < 50
    assert bottom[0] > 200 and bottom[2] < 50


@pytest.mark.parametrize("mode,fill", [("RGBA", (10, 20, 30, 0)), ("LA", (10, 0))])
def test_alpha_composited_on_white(tmp_path, mode, fill):
    img = Image.new(mode, (40, 40), fill)
    opaque = (200, 0, 0, 255) if mode == "RGBA" else (50, 255)
    img.paste(opaque, (0, 0, 20, 40))
    save(img, tmp_path / "x.png")
    s = scan(tmp_path)[0]["x.png"]
    assert s.image.getpixel((30, 10)) == (255, 255, 255)
    assert s.image.getpixel((5, 10)) == ((200, 0, 0) if mode == "RGBA" else (50, 50, 50))


def test_palette_with_transparency(tmp_path):
    img = Image.new("P", (40, 40), 0)
    img.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    img.paste(1, (0, 0, 20, 40))
    save(img, tmp_path / "p.png", transparency=0)
    s = scan(tmp_path)[0]["p.png"]
    assert s.image.getpixel((30, 5)) == (255, 255, 255)  # transparent index -> white, not black
    assert s.image.getpixel((5, 5)) == (0, 200, 0)


def test_cmyk_converted_with_note(tmp_path):
    save(Image.new("CMYK", (40, 40), (0, 255, 255, 0)), tmp_path / "c.jpg")
    by_name, lines = scan(tmp_path)
    r, g, b = by_name["c.jpg"].image.getpixel((20, 20))
    assert r > 200 and g < 60 and b < 60
    assert len(lines_for(lines, "c.jpg")) == 1 and "CMYK" in lines[0]


def test_16bit_scaled_not_clipped(tmp_path):
    img = Image.fromarray(np.full((40, 40), 32896, dtype=np.uint16))  # 128 * 257
    assert img.mode == "I;16"
    save(img, tmp_path / "deep.png")
    by_name, lines = scan(tmp_path)
    assert by_name["deep.png"].image.getpixel((3, 3)) == (128, 128, 128)
    assert len(lines) == 1 and "16-bit" in lines[0]


def test_16bit_mode_i_scaled():
    # Older Pillow opens 16-bit PNGs as mode "I"; the same 0..65535 range must map onto 0..255.
    img = Image.fromarray(np.full((40, 40), 65535, dtype=np.int32)).convert("I")
    assert data._to_rgb(img)[0].getpixel((0, 0)) == (255, 255, 255)
    img = Image.fromarray(np.full((40, 40), 257 * 64, dtype=np.int32)).convert("I")
    assert data._to_rgb(img)[0].getpixel((0, 0)) == (64, 64, 64)


def test_one_bit_and_grayscale(tmp_path):
    one = Image.new("1", (40, 40), 1)
    one.paste(0, (0, 0, 20, 40))
    save(one, tmp_path / "one.png")
    save(Image.new("L", (40, 40), 77), tmp_path / "gray.bmp")
    by_name, lines = scan(tmp_path)
    assert by_name["one.png"].image.getpixel((5, 5)) == (0, 0, 0)
    assert by_name["one.png"].image.getpixel((30, 5)) == (255, 255, 255)
    assert by_name["gray.bmp"].image.getpixel((5, 5)) == (77, 77, 77)
    assert lines == []


@pytest.mark.parametrize("ext", ["webp", "png"])
def test_animated_uses_first_frame(tmp_path, ext):
    frames = [Image.new("RGB", (40, 40), c) for c in ((255, 0, 0), (0, 0, 255))]
    frames[0].save(tmp_path / f"anim.{ext}", save_all=True, append_images=frames[1:], duration=100,
                   **({"lossless": True} if ext == "webp" else {}))
    by_name, lines = scan(tmp_path)
    assert by_name[f"anim.{ext}"].image.getpixel((20, 20)) == (255, 0, 0)
    assert len(lines) == 1 and "first frame" in lines[0] and f"anim.{ext}" in lines[0]


# ------------------------------------------------------------------------------------------ skips


def _assert_skipped(tmp_path, name, reason_word, **kw):
    save(noise(seed=99), tmp_path / "good.png")
    by_name, lines = scan(tmp_path, **kw)
    assert list(by_name) == ["good.png"]
    mine = lines_for(lines, name)
    assert len(mine) == 1 and "skipped" in mine[0] and reason_word in mine[0], lines
    return mine[0]


def test_tiny_image_skipped(tmp_path):
    save(noise((20, 50)), tmp_path / "tiny.png")
    _assert_skipped(tmp_path, "tiny.png", "too small")


def test_extreme_aspect_skipped(tmp_path):
    save(noise((410, 100)), tmp_path / "wide.png")
    save(noise((400, 100), seed=3), tmp_path / "ok_wide.png")  # exactly 4:1 is still accepted
    by_name, lines = scan(tmp_path)
    assert list(by_name) == ["ok_wide.png"]
    assert len(lines) == 1 and "wide.png" in lines[0] and "aspect" in lines[0]


def test_decompression_bomb_guard(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "MAX_PIXELS", 100 * 100)
    save(noise((101, 100)), tmp_path / "bomb.png")
    before = Image.MAX_IMAGE_PIXELS
    _assert_skipped(tmp_path, "bomb.png", "decompression bomb")
    assert Image.MAX_IMAGE_PIXELS == before  # the global PIL limit is never touched


def test_pil_bomb_warning_is_a_skip(tmp_path, monkeypatch):
    # PIL's own guard (warning -> error) also ends as a skip, even if our limit were higher.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50 * 50)
    save(noise((60, 60)), tmp_path / "big.png")
    save(noise((110, 110)), tmp_path / "huge.png")  # > 2x the limit: DecompressionBombError
    save(noise((40, 40), seed=5), tmp_path / "good.png")
    by_name, lines = scan(tmp_path)
    assert list(by_name) == ["good.png"]
    assert all("decompression bomb" in line for line in lines) and len(lines) == 2


def test_zero_byte_skipped(tmp_path):
    (tmp_path / "empty.jpg").write_bytes(b"")
    _assert_skipped(tmp_path, "empty.jpg", "0 bytes")


@pytest.mark.parametrize("ext", ["jpg", "png"])
def test_truncated_skipped(tmp_path, ext):
    path = save(noise((200, 200), seed=7), tmp_path / f"cut.{ext}")
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    _assert_skipped(tmp_path, f"cut.{ext}", "truncated")


def test_text_with_image_extension_skipped(tmp_path):
    (tmp_path / "fake.png").write_text("this is not a picture")
    _assert_skipped(tmp_path, "fake.png", "not an image")


def test_unreadable_permissions_skipped(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("running as root: root can read files without read permission")
    path = save(noise(), tmp_path / "locked.png")
    path.chmod(0)
    try:
        _assert_skipped(tmp_path, "locked.png", "permission denied")
    finally:
        path.chmod(0o644)


def test_permission_error_path_via_monkeypatch(tmp_path, monkeypatch):
    save(noise(), tmp_path / "locked.png")
    real_open = Image.open

    def fake_open(fp, *a, **kw):
        if Path(fp).name == "locked.png":
            raise PermissionError(13, "Permission denied", str(fp))
        return real_open(fp, *a, **kw)

    monkeypatch.setattr(data.Image, "open", fake_open)
    _assert_skipped(tmp_path, "locked.png", "permission denied")


def test_symlink_loop_and_broken_link_skipped(tmp_path):
    os.symlink(tmp_path / "b.png", tmp_path / "a.png")
    os.symlink(tmp_path / "a.png", tmp_path / "b.png")
    os.symlink(tmp_path / "missing.png", tmp_path / "dangling.jpg")
    (tmp_path / "folder.png").mkdir()
    save(noise(), tmp_path / "good.png")
    by_name, lines = scan(tmp_path)
    assert list(by_name) == ["good.png"]
    assert "symlink loop" in lines_for(lines, "a.png")[0]
    assert "symlink loop" in lines_for(lines, "b.png")[0]
    assert "broken symlink" in lines_for(lines, "dangling.jpg")[0]
    assert "directory" in lines_for(lines, "folder.png")[0]


def test_duplicates_keep_first_by_name(tmp_path):
    img = noise(seed=4)
    save(img, tmp_path / "b.png")
    save(img, tmp_path / "a.bmp")  # same pixels, different container
    by_name, lines = scan(tmp_path)
    assert list(by_name) == ["a.bmp"]
    assert len(lines) == 1 and "b.png" in lines[0] and "duplicate of a.bmp" in lines[0]


# ------------------------------------------------------------------------------------------ prepare_image


def _thirds(size=(90, 30)) -> Image.Image:
    img = Image.new("RGB", size, (255, 0, 0))
    img.paste((0, 255, 0), (size[0] // 3, 0, 2 * size[0] // 3, size[1]))
    img.paste((0, 0, 255), (2 * size[0] // 3, 0, size[0], size[1]))
    return img


def test_prepare_shape_range_dtype():
    t = prepare_image(noise((80, 60)), 32)
    assert t.shape == (3, 32, 32) and t.dtype == torch.float32
    assert t.min() >= -1.0 and t.max() <= 1.0
    white = prepare_image(Image.new("RGB", (40, 40), (255, 255, 255)), 16)
    black = prepare_image(Image.new("L", (40, 40), 0), 16)
    assert torch.allclose(white, torch.ones_like(white)) and torch.allclose(black, -torch.ones_like(black))


@pytest.mark.parametrize("size", [(90, 30), (30, 90), (31, 200), (500, 47)])
def test_prepare_respects_resolution_for_non_square(size):
    assert prepare_image(noise(size), 24).shape == (3, 24, 24)
    assert prepare_image(noise(size), 24, center_crop=False, rng=random.Random(1)).shape == (3, 24, 24)


def test_center_crop_takes_the_middle():
    t = prepare_image(_thirds(), 30)
    # The crop is exactly the green middle third (the 90x30 image is already at resolution height).
    assert torch.allclose(t[1], torch.ones(30, 30), atol=1e-6)
    assert torch.allclose(t[0], -torch.ones(30, 30), atol=1e-6)


def test_random_crop_deterministic_and_varied():
    img = noise((120, 40), seed=8)
    a = prepare_image(img, 40, center_crop=False, rng=random.Random(123))
    b = prepare_image(img, 40, center_crop=False, rng=random.Random(123))
    assert torch.equal(a, b)
    crops = {prepare_image(img, 40, center_crop=False, rng=random.Random(s)).sum().item() for s in range(8)}
    assert len(crops) > 1
    # The offset is exactly the rng's draw over the spare width (90 - 30 = 60 columns).
    img, expected_left = _thirds(), random.Random(0).randint(0, 60)
    t = prepare_image(img, 30, center_crop=False, rng=random.Random(0))
    ref = np.asarray(img.crop((expected_left, 0, expected_left + 30, 30)), dtype=np.float32) / 127.5 - 1
    assert torch.allclose(t, torch.from_numpy(ref).permute(2, 0, 1))


def test_hflip():
    t, f = prepare_image(noise(), 30), hflip(prepare_image(noise(), 30))
    assert f.shape == t.shape and torch.equal(f[:, :, 0], t[:, :, -1]) and torch.equal(hflip(f), t)
    left = prepare_image(_thirds((30, 30)), 30)
    assert left[0, 0, 0] == 1.0 and hflip(left)[2, 0, 0] == 1.0  # red left edge -> blue left edge


# ------------------------------------------------------------------------------------------ more fixtures


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A valid PNG signature + IHDR claiming ``width`` x ``height``, one tiny IDAT: a few hundred bytes
    that would decode to hundreds of megabytes (what a decompression bomb looks like from outside)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit grayscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


@pytest.mark.parametrize("size,reason", [((9000, 8000), "too many pixels (9000x8000"),  # our header guard
                                          ((20000, 20000), "possible decompression bomb (")])  # PIL's own
def test_real_bomb_file_skipped_from_its_header(tmp_path, size, reason):
    _png_header_only(tmp_path / "bomb.png", *size)
    line = _assert_skipped(tmp_path, "bomb.png", reason)
    assert "fix: downscale it" in line


def test_fifo_named_like_an_image_does_not_hang(tmp_path):
    os.mkfifo(tmp_path / "pipe.png")
    signal.signal(signal.SIGALRM, lambda *a: pytest.fail("scanning blocked on a FIFO"))
    signal.alarm(5)
    try:
        _assert_skipped(tmp_path, "pipe.png", "not a regular file")
    finally:
        signal.alarm(0)


def test_malformed_exif_keeps_the_image_as_stored(tmp_path):
    img = noise((60, 40), seed=11)
    save(img, tmp_path / "bad_orientation.jpg", quality=95,  # orientation 9 does not exist
          exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x01\x01\x12\x00\x03\x00\x00\x00\x01\x00\x09\x00\x00")
    save(img.transpose(Image.Transpose.ROTATE_90), tmp_path / "garbage.jpg", exif=b"Exif\x00\x00garbage!!")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PIL says "Corrupt EXIF data" on its own
        by_name, lines = scan(tmp_path)
    assert by_name["bad_orientation.jpg"].image.size == (60, 40) and by_name["garbage.jpg"].image.size == (40, 60)
    assert lines == []


def test_exif_that_cannot_be_applied_gives_a_note(tmp_path, monkeypatch):
    def broken(img):
        raise SyntaxError("not a TIFF file")

    monkeypatch.setattr(data.ImageOps, "exif_transpose", broken)
    save(noise((60, 40)), tmp_path / "x.jpg")
    by_name, lines = scan(tmp_path)
    assert by_name["x.jpg"].image.size == (60, 40)
    assert lines == [f"{tmp_path / 'x.jpg'}: EXIF orientation unreadable (not a TIFF file), used as stored"]



def test_duplicates_across_formats_and_modes(tmp_path):
    # Same pixels after conversion count as duplicates: a PNG and its lossless WebP copy; an L image and
    # the same picture stored as RGB. Near-identical pixels (one value off) do not.
    img = noise(seed=21)
    save(img, tmp_path / "a.png")
    save(img, tmp_path / "b.webp", lossless=True)
    gray = Image.new("L", (50, 50), 90)
    save(gray, tmp_path / "c.png")
    save(gray.convert("RGB"), tmp_path / "d.bmp")
    near = np.asarray(img).copy()
    near[0, 0, 0] ^= 1
    save(Image.fromarray(near), tmp_path / "e.png")
    by_name, lines = scan(tmp_path)
    assert list(by_name) == ["a.png", "c.png", "e.png"]
    first = "the first by name; no copy has a caption"
    assert lines == [f"{tmp_path / 'b.webp'}: skipped: exact duplicate of a.png (kept a.png: {first})",
                     f"{tmp_path / 'd.bmp'}: skipped: exact duplicate of c.png (kept c.png: {first})"]


@pytest.mark.parametrize("mode,key", [("RGB", (0, 0, 0)), ("L", 0)])
def test_trns_colour_key_becomes_white(tmp_path, mode, key):
    img = Image.new(mode, (40, 40), key)  # the keyed colour (black) is transparent
    img.paste((0, 0, 200) if mode == "RGB" else 120, (0, 0, 20, 40))
    save(img, tmp_path / "k.png", transparency=key)
    s = scan(tmp_path)[0]["k.png"]
    assert s.image.getpixel((30, 5)) == (255, 255, 255)
    assert s.image.getpixel((5, 5)) == ((0, 0, 200) if mode == "RGB" else (120, 120, 120))


def test_readme_table_states_the_limits_the_code_uses():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme.split("## Input images", 1)[1].split("\n## ", 1)[0]
    min_size = inspect.signature(scan_folder).parameters["min_size"].default
    assert f"shorter side < {min_size} px" in section
    assert f"aspect ratio > {data.MAX_ASPECT:g}:1" in section
    assert f"more than {data.MAX_PIXELS // 2**20} Mi pixels" in section
    assert all(ext in section for ext in data.IMAGE_EXTS)
