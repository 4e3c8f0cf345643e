"""Tests for jtransfer.data.images: decoding modes, crop geometry, batch resizing."""
import io

import numpy as np
import pytest
from PIL import Image

from jtransfer.data import images as im
from jtransfer.errors import InputError


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
  buf = io.BytesIO()
  image.save(buf, format=fmt, **kwargs)
  return buf.getvalue()


def _stripes(height=20, width=40) -> np.ndarray:
  """Left quarter red, middle half green, right quarter blue."""
  a = np.zeros((height, width, 3), np.uint8)
  a[:, :width // 4] = [255, 0, 0]
  a[:, width // 4:3 * width // 4] = [0, 255, 0]
  a[:, 3 * width // 4:] = [0, 0, 255]
  return a


# ---------------------------------------------------------------- decoding and channel modes

def test_png_bytes_rgb_and_gray():
  a = _stripes()
  data = _encode(Image.fromarray(a), "PNG")
  rgb = im.decode_image(data, channels=3)
  assert rgb.dtype == np.uint8 and rgb.shape == (20, 40, 3)
  np.testing.assert_array_equal(rgb, a)
  gray = im.decode_image(data, channels=1)
  assert gray.shape == (20, 40, 1)
  # PIL's 'L' is ITU-R 601-2 luma: L = R*299/1000 + G*587/1000 + B*114/1000.
  assert gray[0, 0, 0] == 76 and gray[0, 20, 0] == 150 and gray[0, 39, 0] == 29


def test_gray_to_rgb_repeats_the_channel(tmp_path):
  g = np.arange(12 * 10, dtype=np.uint8).reshape(12, 10)
  path = tmp_path / "g.png"
  Image.fromarray(g, "L").save(path)
  out = im.decode_image(path, channels=3)
  assert out.shape == (12, 10, 3)
  for c in range(3):
    np.testing.assert_array_equal(out[..., c], g)
  np.testing.assert_array_equal(im.decode_image(str(path), channels=1)[..., 0], g)


def test_rgba_composited_over_white():
  a = np.zeros((4, 4, 4), np.uint8)
  a[..., 0] = 255           # red
  a[:2, :, 3] = 255         # top half opaque
  a[2:, :, 3] = 0           # bottom half transparent
  out = im.decode_image(_encode(Image.fromarray(a, "RGBA"), "PNG"), channels=3)
  np.testing.assert_array_equal(out[0, 0], [255, 0, 0])
  np.testing.assert_array_equal(out[3, 3], [255, 255, 255])


def test_palette_with_transparency_and_la():
  p = Image.new("P", (4, 4), 0)
  p.putpalette([0, 0, 255] + [0, 0, 0] * 255)
  p.info["transparency"] = 0
  assert np.all(im.decode_image(_encode(p, "PNG", transparency=0), channels=3) == 255)
  p2 = Image.new("P", (4, 4), 0)
  p2.putpalette([0, 0, 255] + [0, 0, 0] * 255)
  np.testing.assert_array_equal(im.decode_image(_encode(p2, "PNG"), channels=3)[0, 0], [0, 0, 255])
  la = Image.fromarray(np.stack([np.full((3, 3), 10, np.uint8), np.full((3, 3), 255, np.uint8)],
                                -1), "LA")
  assert np.all(im.decode_image(la, channels=1) == 10)


def test_16bit_is_scaled_not_clipped():
  a = np.array([[0, 257 * 100, 65535, 257 * 7]], np.uint16)
  data = _encode(Image.fromarray(a), "PNG")
  assert Image.open(io.BytesIO(data)).mode.startswith("I")
  out = im.decode_image(data, channels=1)
  np.testing.assert_array_equal(out[0, :, 0], [0, 100, 255, 7])
  np.testing.assert_array_equal(im.decode_image(a, channels=3)[0, :, 1], [0, 100, 255, 7])


def test_bilevel_and_cmyk():
  bw = Image.fromarray(np.array([[0, 255]], np.uint8)).convert("1")
  np.testing.assert_array_equal(im.decode_image(bw, channels=1)[0, :, 0], [0, 255])
  cmyk = Image.new("CMYK", (8, 8), (0, 0, 0, 0))  # no ink: white
  out = im.decode_image(_encode(cmyk, "JPEG"), channels=3)
  assert out.shape == (8, 8, 3) and out.min() > 240


def test_array_sources():
  a = np.full((5, 6, 1), 9, np.uint8)
  assert im.decode_image(a, channels=3).shape == (5, 6, 3)
  with pytest.raises(InputError, match="shape"):
    im.decode_image(np.zeros((5, 6, 2), np.uint8))
  with pytest.raises(InputError, match="dtype"):
    im.decode_image(np.zeros((5, 6, 3), np.complex64))


def test_bad_arguments():
  a = _stripes()
  with pytest.raises(InputError, match="channels"):
    im.decode_image(a, channels=2)
  with pytest.raises(InputError, match="mode"):
    im.decode_image(a, size=8, mode="pad")
  with pytest.raises(InputError, match="image_size"):
    im.as_size((8, 0))
  with pytest.raises(InputError, match="image_size"):
    im.as_size("32")
  assert im.as_size(7) == (7, 7) and im.as_size([3, 5]) == (3, 5)
  with pytest.raises(InputError, match="image source"):
    im.decode_image(12)


def test_corrupt_bytes_raise_pil_error():
  with pytest.raises(Exception):
    im.decode_image(b"not an image")


# ---------------------------------------------------------------- geometry

def test_center_crop_wide_image_keeps_the_middle_exactly():
  a = _stripes(20, 40)
  out = im.decode_image(a, size=20, channels=3, mode="crop")
  np.testing.assert_array_equal(out, a[:, 10:30])  # scale 1: the centre 20x20 box, untouched


def test_center_crop_tall_image_and_downscale():
  a = np.ascontiguousarray(np.transpose(_stripes(20, 40), (1, 0, 2)))  # 40 high, 20 wide
  out = im.decode_image(a, size=(10, 10), mode="crop", resample="nearest")
  assert np.all(out == [0, 255, 0])  # only the green middle rows survive
  rect = im.decode_image(_stripes(20, 40), size=(10, 5), mode="crop", resample="nearest")
  assert rect.shape == (10, 5, 3) and np.all(rect == [0, 255, 0])


def test_resize_mode_keeps_the_whole_image():
  out = im.decode_image(_stripes(20, 40), size=(10, 10), mode="resize")
  assert out.shape == (10, 10, 3)
  np.testing.assert_array_equal(out[5, 0], [255, 0, 0])
  np.testing.assert_array_equal(out[5, 5], [0, 255, 0])
  np.testing.assert_array_equal(out[5, 9], [0, 0, 255])


def test_constant_image_stays_constant_at_any_size():
  c = np.full((13, 17, 3), 77, np.uint8)
  for mode in im.MODES:
    assert np.all(im.decode_image(c, size=(31, 5), mode=mode) == 77)


def test_jpeg_draft_matches_full_decode():
  rng = np.random.default_rng(0)
  base = rng.integers(0, 255, (30, 40, 3)).astype(np.uint8)
  big = np.asarray(Image.fromarray(base).resize((400, 300), Image.Resampling.BILINEAR))
  data = _encode(Image.fromarray(big), "JPEG", quality=95)
  fast = im.decode_image(data, size=32, channels=3)           # reduced-scale JPEG decode
  full = im.decode_image(Image.open(io.BytesIO(data)), size=32, channels=3)  # no draft
  assert fast.shape == full.shape == (32, 32, 3)
  assert np.abs(fast.astype(int) - full.astype(int)).mean() < 2
  gray = im.decode_image(data, size=(16, 24), channels=1)
  assert gray.shape == (16, 24, 1)


def test_decode_images_parallel_and_errors():
  good = _encode(Image.fromarray(_stripes()), "PNG")
  sources = [good, b"junk", good, _stripes()]
  result = im.decode_images(sources, size=8, channels=3, skip_errors=True, num_threads=2)
  assert result.images.shape == (3, 8, 8, 3) and result.images.dtype == np.uint8
  np.testing.assert_array_equal(result.index, [0, 2, 3])
  assert [i for i, _ in result.errors] == [1]
  with pytest.raises(InputError, match="could not be decoded"):
    im.decode_images(sources, size=8, channels=3)
  empty = im.decode_images([], size=(4, 5), channels=1)
  assert empty.images.shape == (0, 4, 5, 1)


# ---------------------------------------------------------------- batches (digits)

def test_digits_style_upsampling():
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  digits = load_digits().images[:64]  # (64, 8, 8) floats in 0..16
  batch = np.round(digits * (255 / 16)).astype(np.uint8)[..., None]
  out = im.resize_batch(batch, 28)
  assert out.shape == (64, 28, 28, 1) and out.dtype == np.uint8
  assert out.min() >= 0 and out.max() > 200
  # Bilinear upsampling keeps the mean brightness (edge clamping changes it only slightly).
  np.testing.assert_allclose(out.mean(axis=(1, 2, 3)), batch.mean(axis=(1, 2, 3)), atol=6)
  rgb = im.resize_batch(np.repeat(batch[:4], 3, -1), (28, 14))
  assert rgb.shape == (4, 28, 14, 3)
  np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])


def test_resize_batch_rejects_bad_input():
  with pytest.raises(InputError, match="uint8"):
    im.resize_batch(np.zeros((2, 8, 8, 1), np.float32), 28)
  with pytest.raises(InputError, match="shape"):
    im.resize_batch(np.zeros((8, 8, 1), np.uint8), 28)
