"""Tests for fluxlora.data: caption files (encodings, fallbacks, refusals) and instance folders."""

from __future__ import annotations

import codecs
import os

import pytest

from fluxlora.data import DataError, load_samples, scan_folder

from data_fixtures import PROMPT, noise, save, scan


@pytest.mark.parametrize("raw", [
    codecs.BOM_UTF8 + "  a photo of sks café \n".encode(),
    "a photo of sks café".encode("utf-8"),
    "a photo of sks café\r\n".encode("utf-16"),  # with BOM, native order
    codecs.BOM_UTF16_LE + "a photo of sks café".encode("utf-16-le"),
    codecs.BOM_UTF16_BE + "a photo of sks café".encode("utf-16-be"),
])
def test_caption_encodings(tmp_path, raw):
    save(noise(), tmp_path / "x.png")
    (tmp_path / "x.txt").write_bytes(raw)
    by_name, lines = scan(tmp_path, None)
    assert by_name["x.png"].caption == "a photo of sks café"
    assert lines == []


def test_caption_sources_and_empty_caption_fallback(tmp_path):
    save(noise(seed=1), tmp_path / "a.PNG")
    (tmp_path / "a.txt").write_text("own caption")  # beside the image: wins over the default
    save(noise(seed=2), tmp_path / "b.png")  # no caption file: the default, silently
    save(noise(), tmp_path / "x.png")
    (tmp_path / "x.txt").write_text("  \n\t")  # blank: the default, with a warning
    by_name, lines = scan(tmp_path)
    assert by_name["a.PNG"].caption == "own caption" and by_name["b.png"].caption == PROMPT
    assert by_name["x.png"].caption == PROMPT
    assert len(lines) == 1 and "x.txt" in lines[0] and "empty" in lines[0]


# Latin-1 bytes are invalid UTF-8; UTF-16 without a BOM "decodes" as UTF-8 full of NULs and must not pass.
@pytest.mark.parametrize("raw", [b"caf\xe9 latin-1 \x80", "sks dog".encode("utf-16-le")])
def test_undecodable_caption_falls_back_with_warning(tmp_path, raw):
    save(noise(), tmp_path / "x.png")
    (tmp_path / "x.txt").write_bytes(raw)
    by_name, lines = scan(tmp_path)
    assert by_name["x.png"].caption == PROMPT
    assert len(lines) == 1 and "x.txt" in lines[0] and "UTF-8" in lines[0]


def test_caption_without_image_warns(tmp_path):
    save(noise(), tmp_path / "x.png")
    (tmp_path / "orphan.txt").write_text("lonely")
    (tmp_path / "README.md").write_text("not an image")
    _, lines = scan(tmp_path)
    assert lines == [f"{tmp_path / 'README.md'}: skipped: not a supported image (extension .md; readable: "
                     ".jpg, .jpeg, .png, .webp, .bmp, .gif, .tif, .tiff)",
                     f"{tmp_path / 'orphan.txt'}: caption without image, ignored"]


def test_missing_captions_without_default_is_one_error(tmp_path):
    save(noise(seed=1), tmp_path / "a.png")
    (tmp_path / "a.txt").write_text("fine")
    save(noise(seed=2), tmp_path / "b.png")
    save(noise(seed=3), tmp_path / "c.jpg")
    save(noise(seed=4), tmp_path / "d.png")
    (tmp_path / "d.txt").write_text("")
    with pytest.raises(DataError) as err:
        scan_folder(tmp_path, None)
    msg = str(err.value)
    assert "b.png" in msg and "c.jpg" in msg and "d.png (caption file is empty)" in msg
    assert "a.png" not in msg and str(tmp_path) in msg
    assert ".txt" in msg and "data.instance_prompt" in msg
    with pytest.raises(DataError, match="b.png"):  # a blank default prompt counts as none
        scan_folder(tmp_path, "   ")


# ------------------------------------------------------------------------------------------ folders


def test_empty_folder_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match="no usable images in") as err:
        scan_folder(tmp_path, PROMPT)
    assert str(tmp_path) in str(err.value) and "fix" in str(err.value)
    # Image files that are all unusable: same refusal, with each file's reason.
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "fake.jpg").write_text("nope")
    with pytest.raises(DataError, match="no usable images in") as err:
        scan_folder(tmp_path, PROMPT)
    assert "empty.png" in str(err.value) and "fake.jpg" in str(err.value)


def test_nonexistent_and_file_folder_refused(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        scan_folder(tmp_path / "nope", PROMPT)
    path = save(noise(), tmp_path / "x.png")
    with pytest.raises(DataError, match="not a directory"):
        scan_folder(path, PROMPT)


def test_load_samples_reports_each_line(tmp_path):
    save(noise(), tmp_path / "a.png")
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "orphan.txt").write_text("x")
    got: list[str] = []
    samples = load_samples(str(tmp_path), PROMPT, warn=got.append)
    assert [s.path.name for s in samples] == ["a.png"]
    assert len(got) == 3 and "empty.png" in got[0] and "orphan.txt" in got[1]
    assert got[2] == f"{tmp_path}: 1 images used, 1 skipped: empty.png"  # the data check's last line
    with pytest.raises(AttributeError):  # Sample is frozen
        samples[0].caption = "other"


# ------------------------------------------------------------------------------------------ more caption files


@pytest.mark.parametrize("encoding", ["utf-32", "utf-32-le", "utf-32-be"])
def test_utf32_captions_with_bom(tmp_path, encoding):
    bom = {"utf-32": b"", "utf-32-le": codecs.BOM_UTF32_LE, "utf-32-be": codecs.BOM_UTF32_BE}[encoding]
    save(noise(), tmp_path / "x.png")
    (tmp_path / "x.txt").write_bytes(bom + "sks café".encode(encoding))
    by_name, lines = scan(tmp_path, None)
    assert by_name["x.png"].caption == "sks café" and lines == []


def test_unreadable_caption_falls_back_or_is_refused(tmp_path):
    save(noise(), tmp_path / "x.png")
    os.symlink(tmp_path / "x.txt", tmp_path / "x.txt")  # reading it fails: a symlink loop
    by_name, lines = scan(tmp_path)
    assert by_name["x.png"].caption == PROMPT
    assert lines == [f"{tmp_path / 'x.txt'}: caption unreadable: symlink loop -> fix: replace the link with "
                     "the real file; using data.instance_prompt instead"]
    with pytest.raises(DataError, match=r"x.png \(caption unreadable: symlink loop"):
        scan_folder(tmp_path, None)
