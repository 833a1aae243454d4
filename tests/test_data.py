"""Tests for unsupdistill.data: folder listing, decoding, skipping bad files, digits."""

from __future__ import annotations

import builtins
import errno
import logging
import os
import pickle
import struct
import warnings
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile

from unsupdistill.config import DataConfig
from unsupdistill.data import (
    IMAGE_EXTENSIONS,
    DataError,
    DigitsDataset,
    ImageFolderDataset,
    build_dataset,
    digits_split,
    list_image_files,
    load_rgb,
    resize_center_crop,
    write_skipped,
)
from unsupdistill.data.digits import _load_digits

SIZE = 12


def _save(path: Path, img: Image.Image, **params: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, **params)
    return path


def _rgb(path: Path, color: tuple[int, int, int] = (200, 30, 40), size: tuple[int, int] = (20, 16)) -> Path:
    return _save(path, Image.new("RGB", size, color))


def _warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.levelno == logging.WARNING and r.name.startswith("unsupdistill.data")]


def _png_bytes(width: int, height: int, bit_depth: int, color_type: int, rows: bytes) -> bytes:
    """A PNG written by hand, for what Pillow will not write: 16-bit RGB, or a header that lies.

    Args:
        rows: the raw scanlines, each starting with its filter byte.
    """

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
            + chunk(b"IEND", b""))


def _centre(dataset: ImageFolderDataset, name: str) -> np.ndarray:
    index = [p.name for p in dataset.files].index(name)
    return dataset[index][:, SIZE // 2, SIZE // 2].numpy().astype(int)


# ----------------------------------------------------------------------------------------------
# Listing
# ----------------------------------------------------------------------------------------------


def test_image_extensions_cover_common_formats_and_not_save_only_or_stub_ones() -> None:
    for ext in (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"):
        assert ext in IMAGE_EXTENSIONS
    assert all(ext == ext.lower() and ext.startswith(".") for ext in IMAGE_EXTENSIONS)
    for ext in (".pdf", ".h5", ".mpg", ".txt"):  # save-only, stub, identify-only, not an image
        assert ext not in IMAGE_EXTENSIONS


def test_list_image_files_recursive_sorted_case_insensitive_and_ignores_hidden(tmp_path: Path) -> None:
    for rel in ("b/z.JPG", "b/a.Png", "a.png", "c/d/e.jpeg", "B.tif"):
        _rgb(tmp_path / rel)
    _rgb(tmp_path / ".hidden" / "x.png")
    _rgb(tmp_path / "b" / ".y.png")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "b" / "data.npy").write_bytes(b"\x00")

    files = list_image_files(tmp_path)

    rel = [p.relative_to(tmp_path).as_posix() for p in files]
    assert rel == ["B.tif", "a.png", "b/a.Png", "b/z.JPG", "c/d/e.jpeg"]
    assert list_image_files(str(tmp_path)) == files


def test_list_image_files_follows_symlinks_without_looping(tmp_path: Path) -> None:
    _rgb(tmp_path / "data" / "a.png")
    _rgb(tmp_path / "elsewhere" / "b.png")
    os.symlink(tmp_path / "data", tmp_path / "data" / "loop")  # a loop back to itself
    os.symlink(tmp_path / "elsewhere", tmp_path / "data" / "linked")

    rel = [p.relative_to(tmp_path / "data").as_posix() for p in list_image_files(tmp_path / "data")]

    assert rel == ["a.png", "linked/b.png"]


def test_symlink_loops_to_files_are_listed_and_reported_not_dropped(tmp_path: Path) -> None:
    _rgb(tmp_path / "good.png")
    os.symlink("self.png", tmp_path / "self.png")  # a link to itself
    os.symlink("pong.jpg", tmp_path / "ping.jpg")  # two links pointing at each other
    os.symlink("ping.jpg", tmp_path / "pong.jpg")
    os.symlink(tmp_path, tmp_path / "again")  # and a folder loop, visited once

    assert [p.name for p in list_image_files(tmp_path)] == ["good.png", "ping.jpg", "pong.jpg", "self.png"]
    dataset = ImageFolderDataset(tmp_path, SIZE)

    assert [p.name for p in dataset.files] == ["good.png"]
    assert [(Path(path).name, reason) for path, reason in dataset.skipped] == [
        (name, "symlink loop (too many levels of symbolic links)") for name in ("ping.jpg", "pong.jpg", "self.png")
    ]


def test_unlistable_subfolder_is_warned_about_even_as_root(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Root lists any folder, so EACCES is raised where the listing calls ``os.scandir``."""
    _rgb(tmp_path / "a.png")
    _rgb(tmp_path / "locked" / "b.png")
    locked = {str(tmp_path / "locked")}
    real_scandir = os.scandir

    def scandir(path: str | os.PathLike = ".") -> object:
        if os.fspath(path) in locked:
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with caplog.at_level(logging.WARNING, logger="unsupdistill.data"):
        files = list_image_files(tmp_path)

    assert [p.name for p in files] == ["a.png"]
    assert f"cannot list folder {tmp_path / 'locked'}" in caplog.text and "Permission denied" in caplog.text
    locked.add(str(tmp_path))
    with pytest.raises(DataError, match="cannot list image folder .*Permission denied"):
        list_image_files(tmp_path)


def test_list_image_files_missing_or_not_a_folder(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist") as err:
        list_image_files(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(err.value)
    file = _rgb(tmp_path / "a.png")
    with pytest.raises(DataError, match="not a directory"):
        list_image_files(file)


# ----------------------------------------------------------------------------------------------
# Decoding
# ----------------------------------------------------------------------------------------------


def _palette_with_transparency() -> Image.Image:
    img = Image.new("P", (20, 16), 1)
    img.putpalette([0, 0, 0, 10, 200, 30] + [0] * (254 * 3))
    img.info["transparency"] = 0
    return img


@pytest.mark.parametrize(
    ("name", "make", "expected"),
    [
        ("gray.png", lambda: Image.new("L", (20, 16), 90), (90, 90, 90)),
        ("palette.png", _palette_with_transparency, (10, 200, 30)),
        ("palette.gif", _palette_with_transparency, (10, 200, 30)),
        ("rgba.png", lambda: Image.new("RGBA", (20, 16), (10, 20, 30, 0)), (10, 20, 30)),
        ("la.png", lambda: Image.new("LA", (20, 16), (70, 128)), (70, 70, 70)),
        ("cmyk.jpg", lambda: Image.new("CMYK", (24, 16), (255, 0, 0, 0)), (0, 255, 255)),
        ("float.tif", lambda: Image.new("F", (20, 16), 0.5), (128, 128, 128)),
        ("bilevel.png", lambda: Image.new("1", (20, 16), 1), (255, 255, 255)),
    ],
)
def test_modes_decode_to_rgb(
    tmp_path: Path, name: str, make: Callable[[], Image.Image], expected: tuple[int, int, int]
) -> None:
    path = _save(tmp_path / name, make())

    img = load_rgb(path)
    out = resize_center_crop(img, SIZE)

    assert img.mode == "RGB"
    assert out.shape == (3, SIZE, SIZE) and out.dtype == torch.uint8
    tol = 3 if name.endswith(".jpg") else 0
    assert np.abs(out[:, SIZE // 2, SIZE // 2].numpy().astype(int) - np.array(expected)).max() <= tol


def test_16_bit_png_is_scaled_not_clipped(tmp_path: Path) -> None:
    values = np.array([[0, 32768, 65535, 1000]], dtype=np.uint16).repeat(3, axis=0)
    path = _save(tmp_path / "deep.png", Image.fromarray(values))
    assert Image.open(path).mode == "I;16"

    pixels = np.asarray(load_rgb(path))

    assert pixels.shape == (3, 4, 3) and pixels.dtype == np.uint8
    assert pixels[0, :, 0].tolist() == [0, 128, 255, 4]
    assert (pixels[..., 0] == pixels[..., 1]).all() and (pixels[..., 0] == pixels[..., 2]).all()
    assert resize_center_crop(load_rgb(path), SIZE).shape == (3, SIZE, SIZE)


def test_32_bit_integer_image_in_16_bit_range_is_scaled(tmp_path: Path) -> None:
    path = _save(tmp_path / "int.tif", Image.fromarray(np.array([[0, 65535]], dtype=np.int32)))
    assert Image.open(path).mode == "I"

    assert np.asarray(load_rgb(path))[0, :, 0].tolist() == [0, 255]


def test_exif_orientation_is_applied(tmp_path: Path) -> None:
    img = Image.new("RGB", (40, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))  # left half red, right half blue
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    path = _save(tmp_path / "rotated.jpg", img, exif=exif, quality=95)

    upright = load_rgb(path)

    assert upright.size == (20, 40)
    top, bottom = np.asarray(upright)[5, 10].astype(int), np.asarray(upright)[35, 10].astype(int)
    assert top[0] > 200 and top[2] < 60  # the left (red) half is now on top
    assert bottom[2] > 200 and bottom[0] < 60


def test_animated_gif_gives_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (16, 16), color) for color in ((255, 0, 0), (0, 0, 255))]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50)
    assert Image.open(path).n_frames == 2

    assert np.asarray(load_rgb(path))[8, 8].tolist() == [255, 0, 0]


def _write_odd_files(root: Path) -> dict[str, tuple[tuple[int, int, int], int]]:
    """Readable files in unusual forms; returns each name's expected centre colour and tolerance."""
    root.mkdir(parents=True, exist_ok=True)
    green, red = (10, 200, 30), (255, 0, 0)
    _save(root / "png_named.jpg", Image.new("RGB", (20, 16), green), format="PNG")
    _save(root / "jpeg_named.png", Image.new("RGB", (20, 16), green), format="JPEG", quality=95)
    _save(root / "webp_named.bmp", Image.new("RGB", (20, 16), green), format="WEBP", lossless=True)
    _save(root / "deep_gray.png", Image.fromarray(np.full((16, 20), 32896, dtype=np.uint16)))  # 0x8080
    pixel = struct.pack(">HHH", 65535, 32896, 0)  # 16 bits per channel
    (root / "deep_rgb.png").write_bytes(_png_bytes(20, 16, 16, 2, (b"\x00" + pixel * 20) * 16))
    _save(root / "cmyk.jpg", Image.new("CMYK", (24, 16), (255, 0, 0, 0)), quality=95)
    _save(root / "palette_transparent.png", _palette_with_transparency())
    for ext in (".gif", ".png", ".tif"):  # animated GIF and PNG, multi-page TIFF: red, then blue
        frames = [Image.new("RGB", (16, 16), color) for color in (red, (0, 0, 255))]
        frames[0].save(root / f"frames{ext}", save_all=True, append_images=frames[1:])
    jpeg = _save(root / "plain.jpg", Image.new("RGB", (20, 16), red), quality=95).read_bytes()
    (root / "plain.jpg").unlink()
    junk_exif = b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\xff\xff" + b"\x00" * 10  # claims 65535 tags
    segment = b"\xff\xe1" + struct.pack(">H", len(junk_exif) + 2) + junk_exif
    (root / "corrupt_exif.jpg").write_bytes(jpeg[:2] + segment + jpeg[2:])
    return {
        "png_named.jpg": (green, 0), "jpeg_named.png": (green, 3), "webp_named.bmp": (green, 0),
        "deep_gray.png": ((128, 128, 128), 0), "deep_rgb.png": ((255, 128, 0), 0), "cmyk.jpg": ((0, 255, 255), 3),
        "palette_transparent.png": (green, 0), "frames.gif": (red, 0), "frames.png": (red, 0),
        "frames.tif": (red, 0), "corrupt_exif.jpg": (red, 3),
    }


@pytest.mark.parametrize("verify", ["full", "header"])
def test_odd_but_readable_files_are_read_not_skipped(tmp_path: Path, verify: str) -> None:
    """Wrong extensions, 16 bits, CMYK, palettes with transparency, frames and broken EXIF all decode."""
    expected = _write_odd_files(tmp_path)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # Pillow: "Corrupt EXIF data"
        dataset = ImageFolderDataset(tmp_path, SIZE, verify=verify)
        assert dataset.skipped == []
        assert sorted(p.name for p in dataset.files) == sorted(expected)
        for name, (color, tol) in expected.items():
            assert np.abs(_centre(dataset, name) - np.array(color)).max() <= tol, name


def test_exif_orientation_is_applied_when_jpeg_decoding_is_reduced(tmp_path: Path) -> None:
    """The dataset decodes JPEGs at a reduced scale (draft) before it rotates them."""
    img = Image.new("RGB", (96, 48), (255, 0, 0))
    img.paste((0, 0, 255), (48, 0, 96, 48))  # left half red, right half blue
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    _save(tmp_path / "rotated.jpg", img, exif=exif, quality=95)

    out = ImageFolderDataset(tmp_path, SIZE)[0].numpy().astype(int)  # upright 48x96, centre 12x12 crop

    assert out[0, 1, 6] > 200 and out[2, 1, 6] < 60  # red (the left half) on top
    assert out[2, SIZE - 2, 6] > 200 and out[0, SIZE - 2, 6] < 60


def test_resize_center_crop_keeps_the_centre() -> None:
    img = Image.new("RGB", (60, 20), (255, 0, 0))
    img.paste((0, 0, 255), (20, 0, 40, 20))  # blue centre square, red sides

    out = resize_center_crop(img, 10)

    assert out.shape == (3, 10, 10) and out.dtype == torch.uint8 and out.is_contiguous()
    assert (out[2, :, 2:8] == 255).all() and (out[0, :, 2:8] == 0).all()
    assert resize_center_crop(Image.new("RGB", (5, 30), (1, 2, 3)), 10).shape == (3, 10, 10)  # upscaling


# ----------------------------------------------------------------------------------------------
# Skipping unreadable files
# ----------------------------------------------------------------------------------------------


def _folder_with_bad_files(root: Path) -> list[Path]:
    _rgb(root / "good1.png")
    _rgb(root / "sub" / "good2.jpg")
    empty = root / "empty.jpg"
    empty.write_bytes(b"")
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    jpeg = _save(root / "full.jpg", Image.fromarray(noise), quality=95).read_bytes()
    (root / "full.jpg").unlink()
    truncated = root / "truncated.jpg"
    truncated.write_bytes(jpeg[: len(jpeg) // 2])  # the header is intact, half the pixel data is gone
    text = root / "text.png"
    text.write_text("this is not a png")
    return [empty, text, truncated]


def test_unreadable_files_are_skipped_counted_and_warned_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bad = _folder_with_bad_files(tmp_path)

    with caplog.at_level(logging.INFO, logger="unsupdistill.data"):
        dataset = ImageFolderDataset(tmp_path, SIZE)

    assert ImageFile.LOAD_TRUNCATED_IMAGES is False
    assert [p.relative_to(tmp_path).as_posix() for p in dataset.files] == ["good1.png", "sub/good2.jpg"]
    assert len(dataset) == 2
    assert sorted(path for path, _ in dataset.skipped) == sorted(str(p) for p in bad)
    reasons = dict(dataset.skipped)
    assert "empty" in reasons[str(bad[0])]
    assert "truncated" in reasons[str(bad[2])].lower()
    warned = _warnings(caplog)
    assert len(warned) == 1
    message = warned[0].getMessage()
    assert "skipped 3 " in message and "data.strict=true" in message
    assert all(str(p) in message for p in bad)


def test_strict_raises_listing_the_bad_files(tmp_path: Path) -> None:
    bad = _folder_with_bad_files(tmp_path)

    with pytest.raises(DataError, match="data.strict=false") as err:
        ImageFolderDataset(tmp_path, SIZE, strict=True)

    assert all(str(p) in str(err.value) for p in bad)


def test_header_verify_defers_truncated_files_to_load_time(tmp_path: Path) -> None:
    _folder_with_bad_files(tmp_path)

    dataset = ImageFolderDataset(tmp_path, SIZE, verify="header", num_threads=1)

    assert sorted(Path(p).name for p, _ in dataset.skipped) == ["empty.jpg", "text.png"]
    index = [p.name for p in dataset.files].index("truncated.jpg")
    with pytest.raises(DataError, match="truncated.jpg"):
        dataset[index]


def test_decompression_bombs_are_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _rgb(tmp_path / "small.png", size=(8, 8))
    _rgb(tmp_path / "warns.png", size=(15, 10))  # 150 pixels: Pillow only warns above the limit
    _rgb(tmp_path / "raises.png", size=(30, 30))  # 900 pixels: more than twice the limit
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)

    dataset = ImageFolderDataset(tmp_path, SIZE)

    assert [p.name for p in dataset.files] == ["small.png"]
    assert all("decompression bomb" in reason for _, reason in dataset.skipped)
    assert len(dataset.skipped) == 2
    with pytest.raises(Image.DecompressionBombWarning):
        load_rgb(tmp_path / "warns.png")


def test_broken_symlink_is_reported(tmp_path: Path) -> None:
    _rgb(tmp_path / "good.png")
    os.symlink(tmp_path / "missing.png", tmp_path / "broken.png")

    dataset = ImageFolderDataset(tmp_path, SIZE)

    assert dataset.skipped == [(str(tmp_path / "broken.png"), "file not found (broken symlink?)")]


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read any file")
def test_permission_denied_is_skipped(tmp_path: Path) -> None:
    _rgb(tmp_path / "good.png")
    locked = _rgb(tmp_path / "locked.png")
    locked.chmod(0)

    dataset = ImageFolderDataset(tmp_path, SIZE)

    assert dataset.skipped == [(str(locked), "permission denied")]


def test_permission_denied_is_skipped_even_as_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Root reads any file (CI runs as root), so EACCES is raised where Pillow opens files: ``builtins.open``."""
    _rgb(tmp_path / "good.png")
    locked = _rgb(tmp_path / "locked.png")
    header_checked = ImageFolderDataset(tmp_path, SIZE, verify="header")  # before the file turns unreadable
    real_open = builtins.open
    opened: list[str] = []

    def open_denying_locked(file: object, *args: object, **kwargs: object) -> object:
        if isinstance(file, (str, os.PathLike)) and os.fspath(file) == str(locked):
            opened.append(str(locked))
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(locked))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", open_denying_locked)

    for verify in ("full", "header"):
        dataset = ImageFolderDataset(tmp_path, SIZE, verify=verify)
        assert [p.name for p in dataset.files] == ["good.png"]
        assert dataset.skipped == [(str(locked), "permission denied")]
    assert opened  # the scan really went through the patched open
    with pytest.raises(DataError, match="permission denied") as err:
        ImageFolderDataset(tmp_path, SIZE, strict=True)
    assert str(locked) in str(err.value)
    index = [p.name for p in header_checked.files].index("locked.png")
    with pytest.raises(DataError, match="locked.png could not be read \\(permission denied\\)"):
        header_checked[index]


@pytest.mark.parametrize("verify", ["full", "header"])
def test_decompression_bombs_with_default_limit_are_skipped_without_decoding(tmp_path: Path, verify: str) -> None:
    """Files of about 100 bytes whose headers declare 10**10 and 10**8 pixels (30 GB and 100 MB decoded)."""
    assert Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < 10**8 < 2 * Image.MAX_IMAGE_PIXELS
    _rgb(tmp_path / "good.png")
    (tmp_path / "huge.png").write_bytes(_png_bytes(100_000, 100_000, 8, 2, b"\x00" * 64))  # Pillow raises
    (tmp_path / "over_limit.png").write_bytes(_png_bytes(10_000, 10_000, 8, 0, b"\x00" * 64))  # Pillow only warns

    dataset = ImageFolderDataset(tmp_path, SIZE, verify=verify)

    assert [p.name for p in dataset.files] == ["good.png"]
    assert [Path(path).name for path, _ in dataset.skipped] == ["huge.png", "over_limit.png"]
    assert all(reason.startswith("decompression bomb") for _, reason in dataset.skipped)


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("empty.png", b"", "empty file (0 bytes)"),
        ("notes.jpg", b"shopping list: eggs, milk\n", "not a recognised image"),
        ("page.png", b"<!DOCTYPE html><html><body>404</body></html>", "not a recognised image"),
        ("program.webp", b"\x7fELF\x02\x01\x01" + bytes(57), "not a recognised image"),
        ("header_only.png", _png_bytes(20, 16, 8, 2, b"")[:33], ""),  # signature and IHDR, no pixel data
    ],
)
def test_hostile_files_are_skipped_with_a_reason(tmp_path: Path, name: str, content: bytes, reason: str) -> None:
    _rgb(tmp_path / "good.png")
    (tmp_path / name).write_bytes(content)

    dataset = ImageFolderDataset(tmp_path, SIZE)

    assert [p.name for p in dataset.files] == ["good.png"]
    assert len(dataset.skipped) == 1 and dataset.skipped[0][0] == str(tmp_path / name)
    assert dataset.skipped[0][1].startswith(reason) and dataset.skipped[0][1]


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "WEBP"])
def test_truncated_files_of_each_format_are_skipped(tmp_path: Path, fmt: str) -> None:
    _rgb(tmp_path / "good.png")
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    full = _save(tmp_path / "full.img", Image.fromarray(noise), format=fmt).read_bytes()
    (tmp_path / "full.img").unlink()
    (tmp_path / f"cut.{fmt.lower()}").write_bytes(full[: len(full) // 2])  # the header survives, pixels do not

    dataset = ImageFolderDataset(tmp_path, SIZE)

    assert [p.name for p in dataset.files] == ["good.png"]
    assert [Path(path).name for path, _ in dataset.skipped] == [f"cut.{fmt.lower()}"]


def test_empty_folder_raises_naming_it(tmp_path: Path) -> None:
    (tmp_path / "readme.txt").write_text("no images here")
    _rgb(tmp_path / ".hidden.png")

    with pytest.raises(DataError, match="no image files") as err:
        ImageFolderDataset(tmp_path, SIZE)

    assert str(tmp_path) in str(err.value)


def test_folder_with_only_unreadable_images_raises(tmp_path: Path) -> None:
    (tmp_path / "a.png").write_text("nope")
    (tmp_path / "b.jpg").write_bytes(b"")

    with pytest.raises(DataError, match="none of the 2 image files") as err:
        ImageFolderDataset(tmp_path, SIZE)

    assert str(tmp_path) in str(err.value)


def test_write_skipped(tmp_path: Path) -> None:
    _folder_with_bad_files(tmp_path / "images")
    dataset = ImageFolderDataset(tmp_path / "images", SIZE)

    assert write_skipped(dataset, tmp_path / "skipped.txt") == 3
    lines = (tmp_path / "skipped.txt").read_text().splitlines()
    assert [tuple(line.split("\t")) for line in lines] == dataset.skipped
    assert write_skipped(DigitsDataset(8, indices=[0]), tmp_path / "none.txt") == 0
    assert not (tmp_path / "none.txt").exists()


def test_write_skipped_keeps_one_line_per_file_whatever_its_name(tmp_path: Path) -> None:
    images = tmp_path / "images"
    _rgb(images / "good.png")
    names = ["two\nlines.png", "tab\there.jpg", "back\\slash.png", os.fsdecode(b"latin-1 caf\xe9.png")]
    for name in names:
        (images / name).write_bytes(b"not an image")
    dataset = ImageFolderDataset(images, SIZE)
    assert len(dataset.skipped) == 4

    assert write_skipped(dataset, tmp_path / "skipped.txt") == 4

    lines = (tmp_path / "skipped.txt").read_bytes().splitlines()
    assert len(lines) == 4 and all(line.count(b"\t") == 1 for line in lines)
    listed = sorted(line.split(b"\t")[0] for line in lines)
    expected = [os.fsencode(images) + b"/" + name for name in
                (b"back\\\\slash.png", b"latin-1 caf\xe9.png", b"tab\\there.jpg", b"two\\nlines.png")]
    assert listed == expected


def test_skipped_files_are_listed_in_the_run_directory(tmp_path: Path) -> None:
    from conftest import TINY

    from unsupdistill.cli import main

    bad = _folder_with_bad_files(tmp_path / "images")  # 2 readable images, 3 unreadable
    run = tmp_path / "run"

    assert main(["pretrain", str(tmp_path / "images"), "--out", str(run), *TINY, "train.batch_size=2",
                 "train.max_steps=1"]) == 0

    lines = (run / "skipped.txt").read_text().splitlines()
    assert sorted(line.split("\t")[0] for line in lines) == sorted(str(p) for p in bad)
    assert all(line.split("\t")[1] for line in lines)


def test_fewer_readable_images_than_one_batch_is_a_clear_error(tmp_path: Path) -> None:
    from unsupdistill.config import load_config
    from unsupdistill.methods import build_trainer

    _folder_with_bad_files(tmp_path / "images")  # 2 readable images, 3 unreadable
    config = load_config(None, [f"data.path={tmp_path / 'images'}", "train.batch_size=4", "data.num_workers=0"])

    with pytest.raises(DataError) as err:
        build_trainer(config, tmp_path / "run")

    message = str(err.value)
    assert "2 readable images are fewer than one batch (train.batch_size=4)" in message
    assert "train.batch_size to at most 2" in message
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------
# Loading in worker processes
# ----------------------------------------------------------------------------------------------


def test_dataloader_with_worker_processes(tmp_path: Path) -> None:
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (9, 9, 9)]
    for i, color in enumerate(colors):
        _rgb(tmp_path / f"{i}.png", color, size=(30 + i, 20))
    dataset = ImageFolderDataset(tmp_path, SIZE)
    assert pickle.loads(pickle.dumps(dataset)).files == dataset.files

    loader = torch.utils.data.DataLoader(dataset, batch_size=2, num_workers=2)
    batches = list(loader)

    assert [b.shape for b in batches] == [(2, 3, SIZE, SIZE)] * 2
    assert all(b.dtype == torch.uint8 for b in batches)
    centre = torch.cat(batches)[:, :, SIZE // 2, SIZE // 2]
    assert centre.tolist() == [list(c) for c in colors]


# ----------------------------------------------------------------------------------------------
# Digits
# ----------------------------------------------------------------------------------------------


def test_digits_dataset_pixels_shape_and_labels() -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    native = DigitsDataset(8)
    assert len(native) == 1797 and native.labels.dtype == torch.int64 and len(native.labels) == 1797
    assert native.skipped == []
    expected = np.rint(digits.images[3] * 255 / 16).astype(np.uint8)
    assert (native[3].numpy() == expected[None]).all()  # same in all three channels

    big = DigitsDataset(32, indices=[5, 0, 7])
    assert big.images.shape == (3, 3, 32, 32) and big[0].dtype == torch.uint8
    assert big.labels.tolist() == digits.target[[5, 0, 7]].tolist()
    assert int(big.images.max()) == 255 and int(big.images.min()) == 0
    assert (big.images[:, 0] == big.images[:, 2]).all()


def test_the_digits_read_from_the_bundled_file_are_load_digits(monkeypatch: pytest.MonkeyPatch) -> None:
    import sklearn.datasets

    digits = sklearn.datasets.load_digits()

    def refused() -> None:
        raise AssertionError("the digits are read from scikit-learn's file, without importing scikit-learn")

    monkeypatch.setattr(sklearn.datasets, "load_digits", refused)
    images, labels = _load_digits()
    assert np.array_equal(images, digits.images) and np.array_equal(labels, digits.target)
    assert labels.dtype == np.int64


def test_digits_split_is_fixed_stratified_and_covers_everything() -> None:
    train, test = digits_split()

    assert (len(train), len(test)) == (1257, 540)
    assert not set(train) & set(test) and sorted(train + test) == list(range(1797))
    assert train == sorted(train) and test == sorted(test)
    assert digits_split() == (train, test)
    labels = DigitsDataset(8).labels
    test_counts = torch.bincount(labels[test], minlength=10).float()
    all_counts = torch.bincount(labels, minlength=10).float()
    assert torch.allclose(test_counts / all_counts, torch.full((10,), 0.3), atol=0.02)


def test_build_dataset(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="unsupdistill.data"):
        digits = build_dataset(DataConfig(), image_size=16)
    assert isinstance(digits, DigitsDataset) and len(digits) == 1797 and digits[0].shape == (3, 16, 16)
    assert "built-in digits (1,797 images)" in caplog.text

    _rgb(tmp_path / "a.png")
    folder = build_dataset(DataConfig(path=str(tmp_path)), image_size=16)
    assert isinstance(folder, ImageFolderDataset) and folder[0].shape == (3, 16, 16)
    resized = build_dataset(DataConfig(path=str(tmp_path), image_size=10, verify="header"), image_size=16)
    assert resized[0].shape == (3, 10, 10)
