"""Image decoding and geometry shared by every loader.

Every function here returns uint8 pixels in HWC (one image) or NHWC (a batch) layout, the
layout of `jtransfer.data.base.ImageSet`. Decoding uses PIL only (no TensorFlow, no OpenCV).

Conventions, chosen to match the usual PIL/torchvision pipelines that pretrained models saw:
- `channels=1` is PIL's 'L' (ITU-R 601-2 luma); `channels=3` is 'RGB', a gray image repeated.
- Transparent pixels (RGBA, LA, palette with transparency) are composited over white.
- 16-bit images are scaled to 8 bits (value / 257), not clipped.
- EXIF orientation is ignored, as torchvision's and TensorFlow's decoders ignore it.
- `mode='crop'` scales the image so that it covers the target, then takes the centre (the
  "resize shorter side, centre crop" of ImageNet evaluation); `mode='resize'` stretches the whole
  image to the target size, ignoring its aspect ratio.
"""
from __future__ import annotations

import concurrent.futures
import io
import os
from typing import NamedTuple, Sequence, Union

import numpy as np
from PIL import Image

from jtransfer.errors import InputError

# Extensions `load_folder` treats as images (compared in lower case).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")

MODES = ("crop", "resize")

_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
}

_BACKGROUND = (255, 255, 255)

ImageSource = Union[bytes, str, os.PathLike, np.ndarray, Image.Image]


class DecodeResult(NamedTuple):
  """What `decode_images` returns.

  Attributes:
    images: uint8 (M, H, W, C), the sources that decoded, in input order.
    index: int64 (M,), the position in the input of each decoded image.
    errors: (position, message) for each source that could not be decoded.
  """
  images: np.ndarray
  index: np.ndarray
  errors: tuple[tuple[int, str], ...]


def as_size(size: int | Sequence[int], what: str = "image_size") -> tuple[int, int]:
  """Returns `size` as a (height, width) pair of positive ints.

  Args:
    size: an int (square) or a pair (height, width).
    what: the argument name used in the error message.

  Raises:
    InputError: when `size` is not a positive int or a pair of them.
  """
  if isinstance(size, (int, np.integer)) and not isinstance(size, bool):
    pair = (int(size), int(size))
  elif (isinstance(size, (tuple, list)) and len(size) == 2
        and all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in size)):
    pair = (int(size[0]), int(size[1]))
  else:
    raise InputError(f"{what}: expected an int or a (height, width) pair of ints, got {size!r}")
  if min(pair) < 1:
    raise InputError(f"{what}: expected positive sizes, got {size!r}")
  return pair


def check_channels(channels: int) -> int:
  """Returns `channels` if it is 1 or 3, else raises `InputError`."""
  if channels not in (1, 3) or isinstance(channels, bool):
    raise InputError(f"channels: expected 1 (grayscale) or 3 (RGB), got {channels!r}")
  return int(channels)


def _check_mode(mode: str) -> str:
  if mode not in MODES:
    raise InputError(f"mode: expected one of {MODES}, got {mode!r}")
  return mode


def _resample(name: str) -> Image.Resampling:
  if name not in _RESAMPLE:
    raise InputError(f"resample: expected one of {tuple(_RESAMPLE)}, got {name!r}")
  return _RESAMPLE[name]


def _array_to_8bit(array: np.ndarray) -> np.ndarray:
  """Maps an integer or float pixel array to uint8 (16-bit scaled by 1/257, floats clipped)."""
  if array.dtype == np.uint8:
    return array
  if array.dtype == np.bool_:
    return array.astype(np.uint8) * 255
  if array.dtype in (np.uint16, np.int32, np.uint32, np.int64):
    # 16-bit content (the usual source of these dtypes); values above 16 bits are clipped.
    return np.clip(np.round(array.astype(np.float64) / 257.0), 0, 255).astype(np.uint8)
  if np.issubdtype(array.dtype, np.floating):
    return np.clip(np.round(array), 0, 255).astype(np.uint8)
  raise InputError(f"image array: expected uint8, uint16 or float pixels, got dtype {array.dtype}")


def _from_array(array: np.ndarray) -> Image.Image:
  """Wraps an HW, HW1, HW3 or HW4 array as a PIL image (8-bit)."""
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[-1] not in (3, 4)):
    raise InputError(f"image array: expected shape (H, W), (H, W, 1), (H, W, 3) or (H, W, 4), "
                     f"got {array.shape}")
  return Image.fromarray(np.ascontiguousarray(_array_to_8bit(array)))


def open_image(source: ImageSource) -> Image.Image:
  """Opens `source` lazily as a PIL image (pixels are read on first use).

  Args:
    source: encoded bytes, a file path, a pixel array (HW, HWC) or a PIL image.

  Raises:
    InputError: for an array of unsupported shape or dtype, or a source of unsupported type.
    OSError, PIL.UnidentifiedImageError: when the bytes or file are not a readable image.
  """
  if isinstance(source, Image.Image):
    return source
  if isinstance(source, np.ndarray):
    return _from_array(source)
  if isinstance(source, (bytes, bytearray, memoryview)):
    return Image.open(io.BytesIO(bytes(source)))
  if isinstance(source, (str, os.PathLike)):
    return Image.open(source)
  raise InputError(f"image source: expected bytes, a path, an array or a PIL image, "
                   f"got {type(source).__name__}")


def to_channels(image: Image.Image, channels: int) -> Image.Image:
  """Converts a PIL image of any mode to 'L' (channels=1) or 'RGB' (channels=3).

  Handles palette, alpha (composited over white), 16-bit and 32-bit modes, CMYK and bilevel.
  """
  check_channels(channels)
  target = "L" if channels == 1 else "RGB"
  if image.mode == "P":
    # Palette images may carry transparency; expand first so it is composited, not dropped.
    image = image.convert("RGBA" if "transparency" in image.info else "RGB")
  if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, _BACKGROUND + (255,))
    image = Image.alpha_composite(background, rgba).convert("RGB")
  if image.mode.startswith("I") or image.mode == "F":
    # PIL's own convert clips 16-bit values at 255, which whitens the image; rescale instead.
    image = Image.fromarray(_array_to_8bit(np.asarray(image)), "L")
  return image if image.mode == target else image.convert(target)


def _crop_box(width: int, height: int, size: tuple[int, int]) -> tuple[float, float, float, float]:
  """The centred source box with the target's aspect ratio that is as large as possible."""
  target_h, target_w = size
  scale = max(target_w / width, target_h / height)
  box_w, box_h = target_w / scale, target_h / scale
  left, top = (width - box_w) / 2, (height - box_h) / 2
  return (left, top, left + box_w, top + box_h)


def fit_image(image: Image.Image, size: int | Sequence[int], mode: str = "crop",
              resample: str = "bilinear") -> Image.Image:
  """Resizes a PIL image to exactly `size` = (height, width).

  Args:
    image: the PIL image.
    size: target (height, width) or an int for a square.
    mode: 'crop' (scale to cover the target, centre crop) or 'resize' (stretch to the target).
    resample: 'bilinear' (default), 'bicubic', 'lanczos', 'box' or 'nearest'. PIL antialiases
      when it shrinks.

  Returns:
    The resized PIL image, in the same mode as `image`.
  """
  height, width = as_size(size, "size")
  _check_mode(mode)
  box = None
  if mode == "crop":
    box = _crop_box(image.width, image.height, (height, width))
  if image.size == (width, height) and box in (None, (0, 0, width, height)):
    return image
  # One resize over the box instead of resize-then-crop: a single interpolation, exact geometry.
  return image.resize((width, height), _resample(resample), box=box)


def _draft(image: Image.Image, size: tuple[int, int], mode: str, channels: int) -> None:
  """Lets JPEG decode at a reduced scale (1/2 .. 1/8) that keeps twice the target size.

  JPEG's DCT scaling is a box filter; keeping 2x the target leaves the antialiasing to the
  resize: measured 0.6 grey levels from a full decode (8.4 at 1x), about 1.7x faster.
  """
  if image.format != "JPEG" or image.mode not in ("RGB", "L", "YCbCr"):
    return
  height, width = size
  scale = 2 * max(width / image.width, height / image.height)
  if mode == "resize":
    need = (2 * width, 2 * height)
  else:
    need = (int(np.ceil(image.width * scale)), int(np.ceil(image.height * scale)))
  image.draft("L" if channels == 1 else "RGB", need)


def decode_image(source: ImageSource, *, size: int | Sequence[int] | None = None,
                 channels: int = 3, mode: str = "crop",
                 resample: str = "bilinear") -> np.ndarray:
  """Decodes one image to uint8 HWC with the requested channels and size.

  Args:
    source: encoded bytes, a file path, a pixel array (HW, HWC, uint8/uint16) or a PIL image.
    size: target (height, width), an int for a square, or None to keep the decoded size.
    channels: 1 (grayscale 'L') or 3 (RGB).
    mode: 'crop' or 'resize', see `fit_image`.
    resample: the interpolation, see `fit_image`.

  Returns:
    uint8 array (height, width, channels).

  Raises:
    InputError: for bad arguments or an unsupported array.
    OSError, PIL.UnidentifiedImageError: when the source is not a readable image.
  """
  check_channels(channels)
  _check_mode(mode)
  image = open_image(source)
  try:
    if size is not None:
      size = as_size(size, "size")
      if not isinstance(source, Image.Image):  # draft changes the image; never the caller's
        _draft(image, size, mode, channels)
    image = to_channels(image, channels)
    if size is not None:
      image = fit_image(image, size, mode, resample)
    array = np.asarray(image, dtype=np.uint8)
  finally:
    if not isinstance(source, Image.Image):
      image.close()
  return array[..., None] if array.ndim == 2 else array


def _decode_or_error(source: ImageSource, kwargs: dict) -> np.ndarray | str:
  try:
    return decode_image(source, **kwargs)
  except InputError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    # PIL raises many types for bad files (OSError, SyntaxError, ValueError, DecompressionBomb...).
    return f"{type(e).__name__}: {e}"


def default_threads() -> int:
  """Decoding threads: two per core, at most 8.

  PIL releases the GIL while it decodes and resizes; file reads and numpy copies in between
  keep one thread per core from saturating them (measured: 4 threads beat 2 on 2 cores).
  """
  return max(1, min(8, 2 * (os.cpu_count() or 1)))


def decode_images(sources: Sequence[ImageSource], *, size: int | Sequence[int],
                  channels: int = 3, mode: str = "crop", resample: str = "bilinear",
                  skip_errors: bool = False, num_threads: int | None = None) -> DecodeResult:
  """Decodes many images in parallel threads to one uint8 NHWC array.

  Args:
    sources: items accepted by `decode_image`.
    size: target (height, width) or an int for a square.
    channels: 1 or 3.
    mode: 'crop' or 'resize'.
    resample: the interpolation, see `fit_image`.
    skip_errors: if True, unreadable sources are left out and listed in `errors`; if False, the
      first one raises `InputError`.
    num_threads: decoding threads (default: `default_threads()`).

  Returns:
    A `DecodeResult`.

  Raises:
    InputError: for bad arguments, or an unreadable source when `skip_errors` is False.
  """
  size = as_size(size, "size")
  kwargs = dict(size=size, channels=check_channels(channels), mode=_check_mode(mode),
                resample=resample)
  _resample(resample)
  threads = num_threads or default_threads()
  if threads > 1 and len(sources) > 1:
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
      results = list(pool.map(lambda s: _decode_or_error(s, kwargs), sources))
  else:
    results = [_decode_or_error(s, kwargs) for s in sources]
  errors = tuple((i, r) for i, r in enumerate(results) if isinstance(r, str))
  if errors and not skip_errors:
    position, message = errors[0]
    raise InputError(f"image {_describe(sources[position])}: could not be decoded ({message})")
  index = np.array([i for i, r in enumerate(results) if not isinstance(r, str)], np.int64)
  images = np.zeros((len(index), *size, channels), np.uint8)
  for row, i in enumerate(index):
    images[row] = results[i]
  return DecodeResult(images, index, errors)


def _describe(source: ImageSource) -> str:
  if isinstance(source, (str, os.PathLike)):
    return repr(os.fspath(source))
  if isinstance(source, (bytes, bytearray, memoryview)):
    return f"({len(source)} bytes)"
  return f"({type(source).__name__})"


# ITU-R BT.601 luma weights (R, G, B): what PIL's convert('L') and torchvision's Grayscale use.
LUMA_601 = (0.299, 0.587, 0.114)


def convert_channels(images: np.ndarray, channels: int) -> np.ndarray:
  """Converts a uint8 NHWC batch between grayscale and RGB.

  Grey to RGB repeats the single channel three times (as PIL's convert('RGB') does); RGB to
  grey is the ITU-R BT.601 luma Y = 0.299 R + 0.587 G + 0.114 B, rounded to the nearest integer
  (PIL's convert('L') computes the same weights in fixed point, so it may differ by one level).

  Args:
    images: uint8 array (N, H, W, C), C in {1, 3}.
    channels: 1 or 3.

  Returns:
    uint8 array (N, H, W, channels); `images` itself when it already has them.
  """
  check_channels(channels)
  if images.shape[-1] == channels:
    return images
  if channels == 3:
    return np.repeat(images, 3, axis=-1)
  luma = images.astype(np.float32) @ np.asarray(LUMA_601, np.float32)
  return np.clip(np.round(luma), 0, 255).astype(np.uint8)[..., None]


def resize_batch(images: np.ndarray, size: int | Sequence[int], *, mode: str = "resize",
                 resample: str = "bilinear", channels: int | None = None) -> np.ndarray:
  """Resizes every image of a uint8 NHWC batch (C = 1 or 3) to `size`.

  Used, for example, to upsample sklearn's 8x8 digits to 28x28 (bilinear, pixel centres
  aligned as in PIL, edges clamped).

  Args:
    images: uint8 array (N, H, W, C), C in {1, 3}.
    size: target (height, width) or an int for a square.
    mode: 'resize' (default: stretch) or 'crop' (cover then centre crop).
    resample: the interpolation, see `fit_image`.
    channels: 1 or 3 to convert the channels too (`convert_channels`, after resizing); None
      keeps C.

  Returns:
    uint8 array (N, height, width, channels or C).

  Raises:
    InputError: when `images` is not a uint8 NHWC array with 1 or 3 channels.
  """
  if not isinstance(images, np.ndarray) or images.ndim != 4 or images.shape[-1] not in (1, 3):
    shape = getattr(images, "shape", None)
    raise InputError(f"images: expected an array of shape (N, H, W, 1 or 3), got {shape}")
  if images.dtype != np.uint8:
    raise InputError(f"images: expected uint8 pixels (scale them to 0-255 first), "
                     f"got dtype {images.dtype}")
  height, width = as_size(size, "size")
  _check_mode(mode)
  _resample(resample)
  out = np.empty((images.shape[0], height, width, images.shape[-1]), np.uint8)
  for i, image in enumerate(images):
    pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
    out[i] = np.asarray(fit_image(pil, (height, width), mode, resample)).reshape(out.shape[1:])
  return out if channels is None else convert_channels(out, channels)
