"""Image-folder datasets: `root/<class>/*.jpg`, or `root/{train,test}/<class>/*.jpg`.

This is the layout of MIT-67, Kvasir and Chest X-ray (Kermany et al.). Class names are the folder
names, in sorted order, so label indices do not depend on the file system. Files below a class
folder are found recursively (as torchvision's `ImageFolder` does). Hidden files and folders
(names starting with '.') are ignored; any other file that is not a readable image (wrong
extension, corrupt or truncated) is skipped, listed in `FolderStats.skipped` and named (the
first ten) in one `logging.warning`; a flat folder's automatic split is announced with its
per-class counts. Both sentences are kept in `Dataset.notes` for reports.

With the split layout, a `root/val/` or `root/validation/` folder (Chest X-ray ships one) is merged
into the training split, as `load_tfds` merges TFDS validation splits: few-shot sampling and
validation-based learning-rate selection both draw from the training pool, and the test split
stays untouched.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import pathlib
from typing import Optional, Sequence, Union

import numpy as np

from jtransfer.data import images as images_lib
from jtransfer.data import stream
from jtransfer.data.base import Dataset, ImageSet
from jtransfer.data.stream import StreamOptions
from jtransfer.errors import InputError

_TRAIN, _TEST = "train", "test"
_EXTRA_TRAIN = ("val", "validation")

ClassRef = Union[int, str]

_log = logging.getLogger(__name__)

# Skipped files and per-class counts a note names before it only counts the rest.
NOTE_ITEMS = 10


@dataclasses.dataclass(frozen=True)
class FolderStats:
  """What `load_folder` found besides the images it returned.

  Attributes:
    skipped: (path, reason) for every file that was not used: not an image by extension,
      or an image file that could not be decoded.
    train_counts: images per class in the train split, in label order.
    test_counts: images per class in the test split, in label order.
    layout: 'split' (root/train + root/test) or 'flat' (root/<class>, split with the seed).
  """
  skipped: tuple[tuple[str, str], ...]
  train_counts: tuple[int, ...]
  test_counts: tuple[int, ...]
  layout: str

  @property
  def num_skipped(self) -> int:
    return len(self.skipped)


def select_classes(classes: Sequence[ClassRef] | None, class_names: Sequence[str],
                   what: str) -> list[int]:
  """Resolves a class selection to indices into `class_names`, in the order given.

  Args:
    classes: None (all classes, in order) or a sequence of class names and/or indices.
    class_names: the available class names, in label order.
    what: the dataset, named in error messages.

  Returns:
    The selected original label indices; new label i is original label `result[i]`.

  Raises:
    InputError: for an unknown name, an index out of range, a duplicate or an empty selection.
  """
  if classes is None:
    return list(range(len(class_names)))
  if isinstance(classes, (str, int)):
    raise InputError(f"{what}: classes must be a list of names or indices, got {classes!r}")
  position = {name: i for i, name in enumerate(class_names)}
  picked = []
  for ref in classes:
    if isinstance(ref, (int, np.integer)) and not isinstance(ref, bool):
      if not 0 <= ref < len(class_names):
        raise InputError(f"{what}: class index {ref} is out of range [0, {len(class_names)})")
      picked.append(int(ref))
    elif isinstance(ref, str):
      if ref not in position:
        raise InputError(f"{what}: unknown class {ref!r}; known classes start with "
                         f"{list(class_names[:8])}")
      picked.append(position[ref])
    else:
      raise InputError(f"{what}: classes must be names or indices, got {ref!r}")
  if not picked:
    raise InputError(f"{what}: classes is empty; pass None for all classes")
  if len(set(picked)) != len(picked):
    raise InputError(f"{what}: classes {list(classes)} select the same class more than once")
  return picked


def _visible(path: pathlib.Path) -> bool:
  return not path.name.startswith(".")


def _class_dirs(parent: pathlib.Path) -> list[str]:
  return sorted(p.name for p in parent.iterdir() if p.is_dir() and _visible(p))


def _list_files(folder: pathlib.Path, skipped: list) -> list[str]:
  """Image files below `folder` (recursive, sorted); other visible files go to `skipped`."""
  found = []
  for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    for name in sorted(filenames):
      if name.startswith("."):
        continue
      path = os.path.join(dirpath, name)
      if os.path.splitext(name)[1].lower() in images_lib.IMAGE_EXTENSIONS:
        found.append(path)
      else:
        skipped.append((path, "not an image file extension"))
  return found


def _loose_files(root: pathlib.Path, skipped: list) -> None:
  """Counts files lying directly in `root`, which belong to no class."""
  for p in sorted(root.iterdir()):
    if p.is_file() and _visible(p):
      skipped.append((str(p), "not inside a class folder"))


def _decode_class(paths: list[str], folder: pathlib.Path, skipped: list,
                  decode_kwargs: dict) -> np.ndarray:
  """Decodes one class folder's files; an empty result is an `InputError` naming the folder."""
  result = images_lib.decode_images(paths, skip_errors=True, **decode_kwargs)
  skipped.extend((paths[i], message) for i, message in result.errors)
  if not len(result.images):
    raise InputError(f"class folder {str(folder)!r} contains no readable images "
                     f"(extensions {', '.join(images_lib.IMAGE_EXTENSIONS)})")
  return result.images


def _read_classes(parents: Sequence[pathlib.Path], names: Sequence[str], skipped: list,
                  decode_kwargs: dict) -> list[np.ndarray]:
  """Decodes `parent/<name>` for each name, files of all parents merged (parents[0] first).

  Streaming (`decode_kwargs['stream']`): each class's file paths instead, decoded later.
  """
  per_class = []
  streaming = decode_kwargs.get("stream") is not None
  kwargs = {k: v for k, v in decode_kwargs.items() if k != "stream"}
  for name in names:
    paths = []
    for parent in parents:
      if (parent / name).is_dir():
        paths += _list_files(parent / name, skipped)
    if streaming:
      if not paths:
        raise InputError(f"class folder {str(parents[0] / name)!r} contains no image files "
                         f"(extensions {', '.join(images_lib.IMAGE_EXTENSIONS)})")
      per_class.append(np.asarray(paths, dtype=object))
    else:
      per_class.append(_decode_class(paths, parents[0] / name, skipped, kwargs))
  return per_class


def _stack(per_class: Sequence[np.ndarray], class_names: tuple[str, ...],
           decode_kwargs: dict) -> ImageSet:
  labels = np.concatenate([np.zeros(0, np.int32)] +
                          [np.full(len(x), i, np.int32) for i, x in enumerate(per_class)])
  options = decode_kwargs.get("stream")
  if options is not None:
    return ImageSet(stream.concat_paths(per_class, decode_kwargs["size"],
                                        decode_kwargs["channels"], decode_kwargs["mode"],
                                        options), labels, class_names)
  height, width = decode_kwargs["size"]
  empty = np.zeros((0, height, width, decode_kwargs["channels"]), np.uint8)
  images = np.concatenate([empty, *per_class])
  return ImageSet(images, labels, class_names)


def _split_class(images: np.ndarray, test_fraction: float, seed: int,
                 label: int) -> tuple[np.ndarray, np.ndarray]:
  """Splits one class: round(n * fraction) test images, at least 1 and at most n - 1."""
  n = len(images)
  n_test = 0 if n < 2 else min(max(int(round(n * test_fraction)), 1), n - 1)
  # One stream per class, so adding or removing a class leaves the other classes' splits alone.
  order = np.random.default_rng([seed, label]).permutation(n)
  test_idx, train_idx = np.sort(order[:n_test]), np.sort(order[n_test:])
  return images[train_idx], images[test_idx]


def _check_fraction(test_fraction: float) -> float:
  if not isinstance(test_fraction, (int, float)) or not 0 < test_fraction < 1:
    raise InputError(f"test_fraction: expected a number strictly between 0 and 1, "
                     f"got {test_fraction!r}")
  return float(test_fraction)


def _layout(root: pathlib.Path) -> str:
  has_train, has_test = (root / _TRAIN).is_dir(), (root / _TEST).is_dir()
  if has_train != has_test:
    present, missing = (_TRAIN, _TEST) if has_train else (_TEST, _TRAIN)
    raise InputError(f"image folder {str(root)!r} has a {present!r} folder but no {missing!r} "
                     f"folder; give both, or put class folders directly under the root")
  return "split" if has_train else "flat"


def _load_split_layout(root: pathlib.Path, classes: Sequence[ClassRef] | None, skipped: list,
                       decode_kwargs: dict) -> tuple[tuple[str, ...], list, list]:
  """Reads root/train (+ root/val) and root/test; returns (names, per-class train, test)."""
  train_root, test_root = root / _TRAIN, root / _TEST
  extra = [root / d for d in _EXTRA_TRAIN if (root / d).is_dir()]
  train_names = _class_dirs(train_root)
  test_names = _class_dirs(test_root)
  for parent in extra:
    if set(_class_dirs(parent)) - set(train_names):
      raise InputError(f"image folder {str(parent)!r} has class folders that {str(train_root)!r} "
                       f"lacks: {sorted(set(_class_dirs(parent)) - set(train_names))}")
  if train_names != test_names:
    only_train = sorted(set(train_names) - set(test_names))
    only_test = sorted(set(test_names) - set(train_names))
    raise InputError(f"image folder {str(root)!r}: train and test class folders differ "
                     f"(only in train: {only_train}, only in test: {only_test})")
  if not train_names:
    raise InputError(f"image folder {str(train_root)!r} contains no class folders")
  for parent in (root, train_root, test_root, *extra):
    _loose_files(parent, skipped)
  picked = select_classes(classes, train_names, f"image folder {str(root)!r}")
  names = tuple(train_names[i] for i in picked)
  train = _read_classes([train_root, *extra], names, skipped, decode_kwargs)
  test = _read_classes([test_root], names, skipped, decode_kwargs)
  return names, train, test


def _load_flat_layout(root: pathlib.Path, classes: Sequence[ClassRef] | None,
                      test_fraction: float, seed: int, skipped: list,
                      decode_kwargs: dict) -> tuple[tuple[str, ...], list, list]:
  """Reads root/<class> and splits each class; returns (names, per-class train, test)."""
  all_names = _class_dirs(root)
  if not all_names:
    raise InputError(f"image folder {str(root)!r} contains no class folders "
                     f"(expected root/<class>/<image files>)")
  _loose_files(root, skipped)
  picked = select_classes(classes, all_names, f"image folder {str(root)!r}")
  names = tuple(all_names[i] for i in picked)
  per_class = _read_classes([root], names, skipped, decode_kwargs)
  train, test = [], []
  for label, images in enumerate(per_class):
    if len(images) < 2:
      _log.warning("class folder %r has one readable image; it goes to the train split and "
                      "the class has no test image", str(root / names[label]))
    tr, te = _split_class(images, test_fraction, seed, label)
    train.append(tr)
    test.append(te)
  return names, train, test


def load_folder(root: str | os.PathLike, *, image_size: int | Sequence[int], channels: int,
                classes: Sequence[ClassRef] | None = None, test_fraction: float = 0.2,
                seed: int = 0, mode: str = "crop", num_threads: int | None = None,
                return_stats: bool = False, stream: Optional[StreamOptions] = None
                ) -> Dataset | tuple[Dataset, FolderStats]:
  """Loads an image-folder dataset into memory (or lists it, to decode on demand).

  Args:
    root: a folder holding `<class>/` folders, or `train/<class>/` and `test/<class>/` folders.
    image_size: target (height, width), or an int for a square.
    channels: 1 (grayscale) or 3 (RGB).
    classes: None for all classes (sorted folder names), or class names and/or indices into the
      sorted names; the selection is relabelled 0..K-1 in the order given.
    test_fraction: without train/test folders, the fraction of each class held out for test
      (at least 1 test image for a class with 2 or more images, never all of them).
    seed: the seed of that stratified split.
    mode: 'crop' (cover then centre crop) or 'resize' (stretch), see `images.fit_image`.
    num_threads: decoding threads (default: `images.default_threads()`).
    return_stats: also return a `FolderStats` (skipped files, per-class counts).
    stream: list the files only and hold the images as a `stream.LazyImages` decoded on demand
      through grain with these options (folders larger than memory); the labels, split and
      every draw from them are the in-memory path's.

  Returns:
    A `Dataset` named after the root folder, or `(Dataset, FolderStats)` with `return_stats`.

  Raises:
    InputError: a missing root, no class folders, a class folder without readable images,
      train/test class lists that differ, or bad arguments.
  """
  root = pathlib.Path(root).expanduser()
  if not root.is_dir():
    raise InputError(f"image folder {str(root)!r} does not exist or is not a directory")
  decode_kwargs = dict(size=images_lib.as_size(image_size),
                       channels=images_lib.check_channels(channels), mode=mode,
                       num_threads=num_threads, stream=stream)
  skipped: list[tuple[str, str]] = []
  layout = _layout(root)
  if layout == "split":
    names, train, test = _load_split_layout(root, classes, skipped, decode_kwargs)
  else:
    test_fraction = _check_fraction(test_fraction)
    names, train, test = _load_flat_layout(root, classes, test_fraction, seed, skipped,
                                           decode_kwargs)
  stats = FolderStats(tuple(skipped), tuple(len(x) for x in train), tuple(len(x) for x in test),
                      layout)
  notes = folder_notes(str(root), names, stats, test_fraction, seed)
  for note in notes:
    _log.warning("%s", note)
  dataset = Dataset(root.resolve().name, _stack(train, names, decode_kwargs),
                    _stack(test, names, decode_kwargs), notes)
  return (dataset, stats) if return_stats else dataset


def _first(items: Sequence[str], n: int = NOTE_ITEMS) -> str:
  """The first `n` items joined, then how many more there are."""
  more = f" and {len(items) - n} more" if len(items) > n else ""
  return ", ".join(items[:n]) + more


def folder_notes(root: str, names: Sequence[str], stats: FolderStats, test_fraction: float,
                 seed: int) -> tuple[str, ...]:
  """The sentences `load_folder` logs (and `Dataset.notes` keeps) about a folder it read.

  Every skipped file is named (the first `NOTE_ITEMS`, then a count), so a corrupt JPEG is not
  hidden behind a README.txt; a flat folder's automatic split states its real per-class train
  and test counts, which decide the largest k a target supports.
  """
  notes = []
  if stats.skipped:
    files = [f"{os.path.relpath(p, root)} ({reason[:80]})" for p, reason in stats.skipped]
    notes.append(f"image folder {root!r}: skipped {len(files)} file(s) that are not readable "
                 f"images: {_first(files)}")
  if stats.layout == "flat":
    counts = [f"{n} {a}/{b}" for n, a, b in zip(names, stats.train_counts, stats.test_counts)]
    notes.append(f"image folder {root!r} has no train/test folders, so each class was split "
                 f"automatically ({test_fraction:g} of its images to test, seed {seed}); "
                 f"train/test images per class: {_first(counts)}")
  return tuple(notes)
