"""Image sets decoded on demand through grain, for folders larger than host memory.

`load_folder(..., stream=StreamOptions(...))` lists the files and labels (so class selection,
the train/test split, k-shot draws and every seeded sampling are exactly the in-memory path's:
they read labels only) and holds the images as a `LazyImages`: an array-like of shape
(N, H, W, C), uint8, whose indexing decodes just the rows asked for, through a grain pipeline
(`grain.MapDataset` over a random-access `DecodeSource`, read by `threads` threads with a
bounded prefetch buffer, or by `workers` worker processes). Evaluation slices it batch by batch
(`evaluate.predict_logits`), `Batches.at` decodes one training batch per step, and
`ImageSet.take` keeps a subset lazy, so peak memory is a few batches of pixels, not the set.

Differences from the in-memory path: an unreadable file is found when it is first decoded (an
`InputError` naming it) rather than skipped at load time; decoding is repeated each time a row
is read (a k-shot set is read once per run; use the in-memory path for sets that fit).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import numpy as np

from jtransfer.data import images as images_lib
from jtransfer.errors import InputError


@dataclasses.dataclass(frozen=True)
class StreamOptions:
  """How a `LazyImages` decodes.

  Attributes:
    threads: decoding threads in this process (PIL releases the GIL while decoding).
    workers: grain worker processes (0: threads only); each decodes whole rows.
    prefetch: decoded images buffered ahead per reader (bounds memory with the batch size).
  """
  threads: int = 4
  workers: int = 0
  prefetch: int = 64

  def __post_init__(self):
    if self.threads < 1 or self.workers < 0 or self.prefetch < 1:
      raise InputError(f"stream options: threads >= 1, workers >= 0 and prefetch >= 1, got "
                       f"{self}")


class DecodeSource:
  """grain's random-access source protocol: row i -> uint8 (H, W, C) of file i (picklable)."""

  def __init__(self, paths: Sequence[str], size: tuple[int, int], channels: int, mode: str):
    self.paths = np.asarray(paths, dtype=object)
    self.size, self.channels, self.mode = tuple(size), int(channels), mode

  def __len__(self) -> int:
    return len(self.paths)

  def __getitem__(self, i: int) -> np.ndarray:
    path = str(self.paths[i])
    try:
      return images_lib.decode_image(path, size=self.size, channels=self.channels,
                                     mode=self.mode)
    except InputError:
      raise
    except Exception as e:  # PIL's errors name the format problem; the path names the file
      raise InputError(f"image file {path!r} is not a readable image ({type(e).__name__}: "
                       f"{e})") from None

  def __repr__(self) -> str:  # grain logs sources; keep it short
    return f"DecodeSource({len(self)} files, {self.size}, {self.channels} ch)"


class _Rows:
  """The rows `rows` of a source, as a source."""

  def __init__(self, source: DecodeSource, rows: np.ndarray):
    self.source, self.rows = source, rows

  def __len__(self) -> int:
    return len(self.rows)

  def __getitem__(self, i: int) -> np.ndarray:
    return self.source[int(self.rows[i])]


class LazyImages:
  """uint8 images (N, H, W, C) decoded on demand; see the module docstring.

  Indexing (an int, a slice, an integer array or a boolean mask) returns decoded numpy
  pixels; `subset(index)` returns another LazyImages without decoding anything.
  `centre_view(out_hw)` gives the same rows seen through `augment.center_view` (test-time
  Resize + CenterCrop of images stored larger than the input), applied per decoded batch.
  """
  dtype = np.dtype(np.uint8)
  ndim = 4

  def __init__(self, source: DecodeSource, rows: Optional[np.ndarray] = None,
               options: StreamOptions = StreamOptions(),
               view: Optional[tuple[int, int]] = None):
    self.source, self.options = source, options
    self.rows = np.arange(len(source)) if rows is None else np.asarray(rows, np.int64)
    self.view = None if view is None or tuple(view) == tuple(source.size) else tuple(view)

  @property
  def shape(self) -> tuple[int, int, int, int]:
    return (len(self.rows), *(self.view or self.source.size), self.source.channels)

  def centre_view(self, out_hw: Sequence[int]) -> "LazyImages":
    """These rows as their (out_hw) test-time views, still lazy (`augment.center_view`)."""
    if self.view is not None:
      raise InputError("centre_view of a LazyImages that is already a view")
    return LazyImages(self.source, self.rows, self.options, tuple(int(v) for v in out_hw))

  def __len__(self) -> int:
    return len(self.rows)

  def __repr__(self) -> str:
    return f"LazyImages(shape={self.shape}, {self.source!r})"

  def subset(self, index: Any) -> "LazyImages":
    """The rows at `index` (as numpy indexes `rows`), still lazy."""
    return LazyImages(self.source, self.rows[index], self.options, self.view)

  def __getitem__(self, index: Any) -> np.ndarray:
    if isinstance(index, tuple):
      raise InputError("LazyImages take one index (rows); slice the decoded array further")
    rows = self.rows[index]
    if np.ndim(rows) == 0:
      image = self.source[int(rows)]
      return image if self.view is None else self._viewed(image[None])[0]
    return self.decode(np.asarray(rows))

  def _viewed(self, stored: np.ndarray) -> np.ndarray:
    from jtransfer.data import augment  # jax: imported only by views
    return augment.center_view(stored, self.view)

  def decode(self, rows: np.ndarray) -> np.ndarray:
    """Decoded pixels of source rows `rows`, in order, through grain (then viewed)."""
    out = np.empty((len(rows), *self.source.size, self.source.channels), np.uint8)
    if not len(rows):
      return out if self.view is None else np.empty((0, *self.shape[1:]), np.uint8)
    import grain.python as grain  # here: only streamed sets need grain (and its import)
    dataset = grain.MapDataset.source(_Rows(self.source, rows)).to_iter_dataset(
        grain.ReadOptions(num_threads=self.options.threads,
                          prefetch_buffer_size=self.options.prefetch))
    if self.options.workers:
      _absl_flags_parsed()
      dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=self.options.workers, per_worker_buffer_size=1))
    for i, image in enumerate(dataset):
      out[i] = image
    return out if self.view is None else self._viewed(out)

  def __array__(self, dtype=None, copy=None):
    """Decodes every row (np.asarray on a LazyImages): only for sets that fit in memory."""
    array = self.decode(self.rows)
    return array if dtype is None else array.astype(dtype)


def _absl_flags_parsed() -> None:
  """grain's worker processes read absl flags; outside an absl app they were never parsed."""
  from absl import flags
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def is_lazy(images: Any) -> bool:
  return isinstance(images, LazyImages)


def take(images: Any, index: Any):
  """`images[index]`, lazy for a LazyImages (no decoding), else numpy's."""
  return images.subset(index) if is_lazy(images) else images[index]


def concat_paths(per_class: Sequence[np.ndarray], size: tuple[int, int], channels: int,
                 mode: str, options: StreamOptions) -> LazyImages:
  """One LazyImages over the classes' file lists, in class order (as `folder._stack`)."""
  paths = np.concatenate([np.zeros(0, object)] + [np.asarray(p, object) for p in per_class])
  return LazyImages(DecodeSource(list(paths), size, channels, mode), options=options)
