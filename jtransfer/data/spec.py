"""Dataset specs as users write them on the command line.

  fmnist[:c1,c2,...]        Fashion-MNIST (IDX files), optional class subset (indices or names)
  digits[:c1,c2,...]        scikit-learn digits upsampled to the requested size
  tfds:NAME[:c1,c2,...]     a TFDS catalog dataset through tfds.data_source (no TensorFlow)
  folder:PATH               an image folder root/<class>/*.jpg (optionally root/train, root/test)
"""
from __future__ import annotations

import dataclasses
import logging
import re
from typing import Optional

from jtransfer.data.base import Dataset
from jtransfer.errors import InputError

KINDS = ("fmnist", "digits", "tfds", "folder")

_log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class DataSpec:
  kind: str
  name: str = ""
  classes: Optional[tuple[str, ...]] = None

  def __str__(self) -> str:
    parts = [self.kind] + ([self.name] if self.name else [])
    if self.classes is not None:
      parts.append(",".join(self.classes))
    return ":".join(parts)


def parse_spec(spec: str, *, flag: str = "dataset") -> DataSpec:
  """Parses a spec string; raises InputError with the accepted forms when malformed."""
  forms = "fmnist[:c1,c2,..], digits[:c1,..], tfds:NAME[:c1,..], folder:PATH"
  if not isinstance(spec, str) or not spec.strip():
    raise InputError(f"{flag} spec is empty; expected one of {forms}")
  kind, _, rest = spec.strip().partition(":")
  if kind not in KINDS:
    raise InputError(f"{flag} spec {spec!r} has unknown kind {kind!r}; expected one of {forms}")
  if kind == "folder":
    if not rest:
      raise InputError(f"{flag} spec {spec!r} needs a path: folder:/path/to/root")
    return DataSpec(kind, rest)
  name = ""
  if kind == "tfds":
    name, _, rest = rest.partition(":")
    if not re.fullmatch(r"[a-z0-9_]+(/[\w.]+)?(:[\d.]+)?", name or "!"):
      raise InputError(f"{flag} spec {spec!r} needs a TFDS name: tfds:oxford_flowers102")
  classes = None
  if spec.strip().endswith(":") and not rest:
    raise InputError(f"{flag} spec {spec!r} has an empty class list after ':'; list classes "
                     f"(e.g. {kind}{':' + name if name else ''}:0,1,2) or drop the ':'")
  if rest:
    classes = tuple(c.strip() for c in rest.split(","))
    if any(not c for c in classes):
      raise InputError(f"{flag} spec {spec!r} has an empty class in its list {rest!r}")
    if len(classes) == 1:  # refused here, before anything is loaded or any --out opened
      raise InputError(one_class(flag, spec.strip(), classes))
  return DataSpec(kind, name, classes)


def one_class(flag: str, spec: str, names) -> str:
  """The refusal of a dataset with fewer than two classes."""
  return (f"{flag} {spec} has {len(names)} class ({', '.join(map(repr, names))}); it needs at "
          "least 2 classes, since a classifier of one class is always right")


def load_spec(spec: str | DataSpec, image_shape: tuple[int, int, int], *, flag: str = "dataset",
              data_dir: Optional[str] = None, stream=None) -> Dataset:
  """Loads a spec as uint8 images of `image_shape` (H, W, C), class subset applied.

  Any source shape works with any spec: images stored at another size or colour (Fashion-MNIST
  and digits are 28 px grey) are resized and converted to `image_shape` (grey to RGB by
  repeating the channel, RGB to grey by the ITU-R BT.601 luma weights, see
  `images.convert_channels`); the conversion is logged and kept in the result's `notes`.

  `stream` (a `stream.StreamOptions`): an image folder is listed, not decoded, and its images
  are decoded on demand (`stream.LazyImages`); other kinds are refused with it.

  Raises:
    InputError: a malformed spec, a dataset that cannot be read, or fewer than two classes
      (a classifier of one class is always right, so its accuracy says nothing).
  """
  from jtransfer.data import digits, fewshot, fmnist
  s = parse_spec(spec, flag=flag) if isinstance(spec, str) else spec
  h, w, c = image_shape
  if stream is not None and s.kind != "folder":
    raise InputError(f"{flag} {spec}: decoding on demand (streaming) is for image folders; "
                     f"{s.kind} data loads into memory")
  if s.kind == "fmnist":
    data = fmnist.load_fmnist(data_dir)
  elif s.kind == "digits":
    if h != w:
      raise InputError(f"digits are square; requested image shape {image_shape}")
    data = digits.load_digits(h)
  elif s.kind == "tfds":
    from jtransfer.data import tfds_source
    data = tfds_source.load_tfds(s.name, image_size=(h, w), channels=c, data_dir=data_dir)
  else:
    from jtransfer.data import folder
    data = folder.load_folder(s.name, image_size=(h, w), channels=c, stream=stream)
  if s.classes is not None:
    data = fewshot.subset_classes(data, s.classes)
  if data.train.num_classes < 2:
    raise InputError(one_class(flag, str(s), data.class_names))
  if data.image_shape != (h, w, c):
    data = _resize(data, (h, w, c), flag, str(s))
  elif s.kind in ("tfds", "folder"):  # decoded straight to the source's shape: say how
    colour = ("any colour image converted to grey by ITU-R BT.601 luma" if c == 1
              else "any grey image repeated to RGB")
    note = (f"{flag} {s}: images decoded to {h}x{w}x{c} to match the source's input shape "
            f"(scaled to cover, centre crop; {colour})")
    _log.warning("%s", note)
    data = dataclasses.replace(data, notes=data.notes + (note,))
  return data


def _resize(data: Dataset, shape: tuple[int, int, int], flag: str, spec: str) -> Dataset:
  """`data` resized and channel-converted to `shape`, with a note saying so."""
  from jtransfer.data import images
  from jtransfer.data.base import ImageSet
  def conv(s):
    return ImageSet(images.resize_batch(s.images, shape[:2], channels=shape[2]), s.labels,
                    s.class_names)
  before = "x".join(map(str, data.image_shape))
  colour = {(1, 3): " (grey repeated to RGB)",
            (3, 1): " (RGB to grey by ITU-R BT.601 luma)"}.get((data.image_shape[2], shape[2]), "")
  note = (f"{flag} {spec}: images converted from {before} to {'x'.join(map(str, shape))}"
          f"{colour} to match the source's input shape")
  _log.warning("%s", note)
  return Dataset(data.name, conv(data.train), conv(data.test), data.notes + (note,))
