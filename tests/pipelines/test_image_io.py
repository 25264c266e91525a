"""Photos as users hand them over: each odd format converted with a note, each bad file one "path: problem" line,
the good ones of the same set still read; outputs 8-bit PNG with ICC profile and alpha kept, never overwritten
unless asked."""

import io

import numpy as np
import pytest
from PIL import Image, ImageCms

from diffbody_jax.pipelines.image_io import PhotoError, find_images, read_photo, read_photos, write_png


@pytest.fixture
def photo(rng):
    return (rng.uniform(0, 1, (80, 96, 3)) * 255).astype(np.uint8)


def test_exif_orientation_is_applied_and_the_icc_profile_travels(tmp_path, photo):
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.fromarray(photo).save(tmp_path / "a.jpg", exif=exif, icc_profile=icc, quality=95)
    loaded = read_photo(tmp_path / "a.jpg")
    assert loaded.size == (96, 80) and loaded.icc_profile == icc
    out = write_png(tmp_path / "out" / "a.png", loaded.pixels, like=loaded)
    with Image.open(out) as written:
        assert written.mode == "RGB" and written.info.get("icc_profile") == icc and written.size == (80, 96)
    with pytest.raises(FileExistsError, match="--overwrite"):
        write_png(out, loaded.pixels, like=loaded)
    write_png(out, loaded.pixels * 0, like=loaded, overwrite=True)
    assert np.asarray(Image.open(out)).max() == 0


def test_odd_formats_are_converted_with_a_note(tmp_path, photo):
    grey = photo.mean(-1).astype(np.uint8)
    Image.fromarray(grey, "L").save(tmp_path / "grey.png")
    Image.fromarray(np.dstack([photo, np.full(photo.shape[:2], 128, np.uint8)]), "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(photo).convert("CMYK").save(tmp_path / "cmyk.jpg", quality=95)
    Image.fromarray(grey.astype(np.uint16) * 257).save(tmp_path / "deep.png")
    notes = {p: read_photo(tmp_path / p).notes[0].split(":")[0] for p in
             ("grey.png", "rgba.png", "cmyk.jpg", "deep.png")}
    assert notes == {"grey.png": "grayscale", "rgba.png": "alpha channel", "cmyk.jpg": "CMYK",
                     "deep.png": "16-bit grayscale"}
    deep = read_photo(tmp_path / "deep.png")
    np.testing.assert_allclose(deep.pixels[..., 0], grey / 255.0, atol=1e-6)
    rgba = read_photo(tmp_path / "rgba.png")
    out = write_png(tmp_path / "rgba_out.png", rgba.pixels, like=rgba)
    with Image.open(out) as written:
        assert written.mode == "RGBA" and np.asarray(written)[..., 3].min() == 128
    assert np.abs(read_photo(tmp_path / "cmyk.jpg").pixels - photo / 255.0).mean() < 0.05


def test_bad_files_each_give_one_line_and_the_good_ones_are_read(tmp_path, photo):
    Image.fromarray(photo).save(tmp_path / "good.png")
    buf = io.BytesIO()
    Image.fromarray(photo).save(buf, format="PNG")
    (tmp_path / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (tmp_path / "notes.png").write_text("not an image")
    Image.fromarray(photo[:20, :30]).save(tmp_path / "small.png")
    (tmp_path / "empty").mkdir()
    files, problems = find_images([tmp_path, tmp_path / "empty", tmp_path / "missing.jpg"])
    assert problems == [f"{tmp_path / 'empty'}: a directory with no images (.png, .jpg, .jpeg, .webp, .bmp, .tif, "
                        ".tiff)", f"{tmp_path / 'missing.jpg'}: no such file or directory"]
    photos, bad = read_photos(files)
    assert [p.path.name for p in photos] == ["good.png"]
    by_name = {line.split(":")[0].rsplit("/", 1)[-1]: line for line in bad}
    assert "unreadable or truncated" in by_name["truncated.png"]
    assert "not an image Pillow can read" in by_name["notes.png"]
    assert "20 x 30 pixels, below the minimum of 64" in by_name["small.png"]
    with pytest.raises(PhotoError, match="a directory"):
        read_photo(tmp_path / "empty")
