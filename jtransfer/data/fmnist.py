"""Fashion-MNIST from its IDX files (Debian package `dataset-fashion-mnist`)."""
from __future__ import annotations

import gzip
import os

import numpy as np

from jtransfer.data.base import Dataset, ImageSet
from jtransfer.errors import InputError

DEFAULT_DIR = "/usr/share/datasets/fashion-mnist"
CLASS_NAMES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
               "bag", "ankle-boot")
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def read_idx(path: str) -> np.ndarray:
  """Reads an IDX file (optionally .gz): magic 0x00 0x00 dtype ndim, big-endian dims, data."""
  opener = gzip.open if path.endswith(".gz") else open
  try:
    with opener(path, "rb") as f:
      raw = f.read()
  except (OSError, EOFError) as e:
    raise InputError(f"cannot read IDX file {path}: {e}") from None
  if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
    raise InputError(f"{path} is not an unsigned-byte IDX file (bad magic number)")
  ndim = raw[3]
  dims = tuple(int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
  data = np.frombuffer(raw, np.uint8, offset=4 + 4 * ndim)
  if data.size != int(np.prod(dims)):
    raise InputError(f"{path} is truncated: header says {dims}, found {data.size} bytes of data")
  return data.reshape(dims)


def _find(directory: str, stem: str) -> str:
  for name in (stem + ".gz", stem):
    path = os.path.join(directory, name)
    if os.path.exists(path):
      return path
  raise InputError(f"Fashion-MNIST file {stem}[.gz] not found in {directory}; install the "
                   "Debian package dataset-fashion-mnist (apt-get install dataset-fashion-mnist) "
                   "or pass the directory that holds the IDX files")


def load_fmnist(directory: str | None = None) -> Dataset:
  """Loads all 10 classes of Fashion-MNIST as uint8 (N, 28, 28, 1), 60k train / 10k test."""
  directory = directory or os.environ.get("JTRANSFER_FMNIST_DIR", DEFAULT_DIR)
  if not os.path.isdir(directory):
    raise InputError(f"Fashion-MNIST directory {directory} does not exist; install the Debian "
                     "package dataset-fashion-mnist or set JTRANSFER_FMNIST_DIR")
  splits = {}
  for split, (img_stem, lbl_stem) in _FILES.items():
    images = read_idx(_find(directory, img_stem))
    labels = read_idx(_find(directory, lbl_stem)).astype(np.int32)
    if images.ndim != 3 or images.shape[0] != labels.shape[0]:
      raise InputError(f"Fashion-MNIST {split} files in {directory} disagree: images "
                       f"{images.shape}, labels {labels.shape}")
    splits[split] = ImageSet(images[..., None], labels, CLASS_NAMES)
  return Dataset("fmnist", splits["train"], splits["test"])
