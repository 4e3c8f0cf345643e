"""TFDS catalog datasets without TensorFlow, through `tfds.data_source` (random access).

`tfds.load` needs TensorFlow; `tfds.data_source` reads the ArrayRecord files of a prepared dataset
with numpy and PIL only. The dataset must already be prepared in the `array_record` format under
`data_dir` (`tfds build NAME --file_format=array_record` where there is internet); `load_tfds`
never downloads.

Default splits, when `train_split` / `test_split` are not given, follow the split names the
prepared dataset has:
- test: 'test' if present, else 'validation';
- train: 'train', plus 'validation' when the test split is 'test' ('train+validation'), because
  few-shot sampling and validation-based learning-rate selection both draw from the training
  pool and the standard protocols of Oxford Flowers-102 and DTD train on train+val.
So caltech101 and cifar10 give train / test, oxford_flowers102 and dtd give train+validation /
test. A dataset without these names needs explicit splits, e.g. `test_split='train[80%:]'`.

Reading: records are fetched in chunks in order; each chunk's labels are read first (from the
serialized record, without decoding the image, when the TFDS version allows it), records outside
the class selection or over `max_per_class` are dropped, and the rest are decoded, resized and
centre-cropped in parallel threads with PIL (JPEGs are decoded at a reduced scale when the target
is small). Reading stops early once every selected class has `max_per_class` images.
"""
from __future__ import annotations

import difflib
import logging
from typing import Any, Callable, Sequence

import numpy as np

from jtransfer.data import images as images_lib
from jtransfer.data.base import Dataset, ImageSet
from jtransfer.data.folder import ClassRef, select_classes
from jtransfer.errors import InputError

# Split names of a few datasets, used only when the builder has no split information (dataset
# not prepared, or mocked from code in tests); prepared datasets use their own split list.
KNOWN_SPLITS = {
    "caltech101": ("train", "test"),
    "cifar10": ("train", "test"),
    "cifar100": ("train", "test"),
    "dtd": ("train", "validation", "test"),
    "oxford_flowers102": ("train", "validation", "test"),
    "oxford_iiit_pet": ("train", "test"),
    "stanford_dogs": ("train", "test"),
    "caltech_birds2011": ("train", "test"),
    "cars196": ("train", "test"),
    "food101": ("train", "validation"),
    "fashion_mnist": ("train", "test"),
    "mnist": ("train", "test"),
}

_CHUNK = 512

_log = logging.getLogger(__name__)

# (label, payload) per record; payload is encoded image bytes or a decoded pixel array.
Reader = Callable[[Sequence[int]], list[tuple[int, Any]]]


def _import_tfds():
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError("load_tfds needs the tensorflow-datasets package (TensorFlow itself is not "
                      "needed): pip install tensorflow-datasets array-record") from e
  return tfds


def _base_name(name: str) -> str:
  return name.split("/")[0].split(":")[0]


def _builder(tfds, name: str, data_dir: str | None):
  """`tfds.builder`, with an unknown name turned into one `InputError` with close matches."""
  try:
    return tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    known = tfds.list_builders(with_community_datasets=False)
    close = difflib.get_close_matches(_base_name(name), known, n=3, cutoff=0.6)
    hint = f"did you mean {', '.join(close)}?" if close else "see tfds.list_builders()"
    raise InputError(f"unknown TFDS dataset {name!r}; {hint}") from e


def find_feature_keys(features, name: str, image_key: str | None = None,
                      label_key: str | None = None) -> tuple[str, str]:
  """Finds the image and class-label feature keys of a TFDS `FeaturesDict`.

  Prefers 'image' and 'label'; otherwise takes the only top-level `Image` / `ClassLabel` feature.

  Args:
    features: the builder's `info.features`.
    name: the dataset name, for error messages.
    image_key: force this key for the image.
    label_key: force this key for the label.

  Returns:
    (image_key, label_key).

  Raises:
    InputError: when a key is missing, of the wrong type, or ambiguous.
  """
  from tensorflow_datasets import features as tfds_features  # pylint: disable=g-import-not-at-top
  items = dict(features.items())
  image_key = _pick_key(items, tfds_features.Image, "image", image_key, name, "image")
  label_key = _pick_key(items, tfds_features.ClassLabel, "label", label_key, name, "class label")
  return image_key, label_key


def _pick_key(items: dict, kind: type, preferred: str, forced: str | None, name: str,
              what: str) -> str:
  candidates = [k for k, f in items.items() if isinstance(f, kind)]
  if forced is not None:
    if forced not in candidates:
      raise InputError(f"TFDS dataset {name!r}: {forced!r} is not a top-level {what} feature; "
                       f"{what} features: {candidates}")
    return forced
  if preferred in candidates:
    return preferred
  if len(candidates) == 1:
    return candidates[0]
  if not candidates:
    raise InputError(f"TFDS dataset {name!r} has no top-level {what} feature "
                     f"(features: {sorted(items)})")
  raise InputError(f"TFDS dataset {name!r} has several {what} features {candidates}; "
                   f"choose one with {'image_key' if what == 'image' else 'label_key'}=")


def default_splits(name: str, available: Sequence[str], train_split: str | None = None,
                   test_split: str | None = None) -> tuple[str, str]:
  """Chooses (train_split, test_split); see the module docstring for the rule.

  Args:
    name: the dataset name.
    available: split names the builder reports (empty when it does not know them).
    train_split: keep this train split if given.
    test_split: keep this test split if given.

  Raises:
    InputError: when a default is needed but the dataset has no suitable split.
  """
  names = tuple(available) or KNOWN_SPLITS.get(_base_name(name), ("train", "test"))
  if test_split is None:
    if "test" in names:
      test_split = "test"
    elif "validation" in names:
      test_split = "validation"
    else:
      raise InputError(f"TFDS dataset {name!r} has no 'test' or 'validation' split (splits: "
                       f"{list(names)}); pass test_split=, e.g. 'train[80%:]'")
  if train_split is None:
    if "train" not in names:
      raise InputError(f"TFDS dataset {name!r} has no 'train' split (splits: {list(names)}); "
                       f"pass train_split=")
    merge = "validation" in names and test_split == "test"
    train_split = "train+validation" if merge else "train"
  return train_split, test_split


def _open_error(tfds, builder, name: str, splits: Sequence[str], data_dir: str | None,
                error: Exception) -> InputError:
  """Explains why `tfds.data_source` failed, in one sentence."""
  where = data_dir or "the default data_dir (~/tensorflow_datasets or $TFDS_DATA_DIR)"
  if not builder.is_prepared():
    return InputError(
        f"TFDS dataset {name!r} is not prepared under {where}; on a machine with internet run "
        f"`tfds build {_base_name(name)} --data_dir=DIR --file_format=array_record` (or "
        f"builder.download_and_prepare(file_format='array_record')) and pass data_dir=DIR")
  if isinstance(error, NotImplementedError):
    return InputError(
        f"TFDS dataset {name!r} under {builder.data_dir} is not in a random-access format "
        f"(found {builder.info.file_format}); prepare it again with file_format='array_record'")
  detail = " ".join(str(error).split())  # TFDS messages span lines; keep one
  return InputError(f"TFDS dataset {name!r}: could not open splits {list(splits)} (available: "
                    f"{list(builder.info.splits)}): {detail}")


def _open(tfds, builder, name: str, splits: Sequence[str], data_dir: str | None, raw: bool):
  method = tfds.decode.DeserializeMethod
  try:
    return tfds.data_source(name, split=list(splits), data_dir=data_dir, download=False,
                            deserialize_method=method.RAW_BYTES if raw
                            else method.DESERIALIZE_AND_DECODE)
  except InputError:
    raise
  except Exception as e:  # pylint: disable=broad-except
    raise _open_error(tfds, builder, name, splits, data_dir, e) from e


def _raw_reader(source, parser, image_key: str, label_key: str) -> Reader:
  """Parses serialized records: labels and image bytes without decoding any image."""
  def read(keys):
    # One batched read: ArrayRecord fetches the records of a batch in parallel.
    parsed = [parser.parse_example(r) for r in source.__getitems__(list(keys))]
    return [(int(np.asarray(p[label_key])), p[image_key]) for p in parsed]
  return read


def _decoded_reader(source, image_key: str, label_key: str) -> Reader:
  def read(keys):
    # One key at a time: tfds.testing.mock_data's sources break on __getitems__.
    return [(int(np.asarray(ex[label_key])), ex[image_key]) for ex in map(source.__getitem__, keys)]
  return read


def _readers(tfds, builder, name: str, splits: Sequence[str], data_dir: str | None,
             image_key: str, label_key: str) -> list[tuple[Reader, int]]:
  """(reader, length) per split: the raw path if this TFDS version supports it, else decoded."""
  parser = getattr(builder.info.features, "_example_parser_np", None)
  if parser is not None:
    sources = _open(tfds, builder, name, splits, data_dir, raw=True)
    readers = [_raw_reader(s, parser, image_key, label_key) for s in sources]
    try:
      probe = next(((r, s) for r, s in zip(readers, sources) if len(s)), None)
      if probe is None or isinstance(probe[0]([0])[0][1], bytes):
        return [(r, len(s)) for r, s in zip(readers, sources)]
    except Exception as e:  # pylint: disable=broad-except
      # Private TFDS parser API or a mocked source without serialization: use the decoded path.
      _log.debug("TFDS raw read of %r unavailable (%s); decoding through TFDS", name, e)
  sources = _open(tfds, builder, name, splits, data_dir, raw=False)
  return [(_decoded_reader(s, image_key, label_key), len(s)) for s in sources]


def _read_split(read: Reader, length: int, remap: np.ndarray, max_per_class: int | None,
                class_names: tuple[str, ...], decode_kwargs: dict, what: str) -> ImageSet:
  """Reads one split in order, keeping the selected classes up to `max_per_class` each."""
  counts = np.zeros(len(class_names), np.int64)
  height, width = decode_kwargs["size"]
  chunks = [np.zeros((0, height, width, decode_kwargs["channels"]), np.uint8)]
  labels = [np.zeros(0, np.int32)]
  for start in range(0, length, _CHUNK):
    keys = range(start, min(length, start + _CHUNK))
    kept_keys, kept_labels, payloads = [], [], []
    for key, (label, payload) in zip(keys, read(keys)):
      new = remap[label] if 0 <= label < len(remap) else -1
      if new < 0 or (max_per_class is not None and counts[new] >= max_per_class):
        continue
      counts[new] += 1
      kept_keys.append(key)
      kept_labels.append(new)
      payloads.append(payload)
    result = images_lib.decode_images(payloads, skip_errors=True, **decode_kwargs)
    if result.errors:
      position, message = result.errors[0]
      raise InputError(f"{what}: record {kept_keys[position]} could not be decoded ({message})")
    chunks.append(result.images)
    labels.append(np.asarray(kept_labels, np.int32))
    if max_per_class is not None and (counts >= max_per_class).all():
      break  # every selected class is full: the rest of the split would be dropped anyway
  if not counts.sum():
    raise InputError(f"{what}: no images of the selected classes")
  missing = [class_names[i] for i in np.flatnonzero(counts == 0)]
  if missing:
    _log.warning("%s: no images of %d selected classes (first: %s)", what, len(missing),
                 missing[:5])
  return ImageSet(np.concatenate(chunks), np.concatenate(labels), class_names)


def _check_cap(max_per_class: int | None) -> int | None:
  if max_per_class is None:
    return None
  is_int = isinstance(max_per_class, (int, np.integer)) and not isinstance(max_per_class, bool)
  if not is_int or max_per_class < 1:
    raise InputError(f"max_per_class: expected a positive int or None, got {max_per_class!r}")
  return int(max_per_class)


def load_tfds(name: str, *, image_size: int | Sequence[int], channels: int,
              classes: Sequence[ClassRef] | None = None, data_dir: str | None = None,
              train_split: str | None = None, test_split: str | None = None,
              max_per_class: int | None = None, mode: str = "crop",
              image_key: str | None = None, label_key: str | None = None,
              num_threads: int | None = None) -> Dataset:
  """Loads a prepared TFDS image-classification dataset into memory, without TensorFlow.

  Args:
    name: a TFDS name, e.g. 'caltech101', 'oxford_flowers102', 'dtd', 'cifar10' (a config or
      version may follow: 'name/config:1.0.0').
    image_size: target (height, width), or an int for a square.
    channels: 1 (grayscale) or 3 (RGB).
    classes: None for all classes, or class names and/or label indices; the selection is
      relabelled 0..K-1 in the order given.
    data_dir: the TFDS data folder holding the prepared dataset (default: TFDS's default).
    train_split: a TFDS split expression; default per the module docstring.
    test_split: a TFDS split expression; default per the module docstring.
    max_per_class: keep at most this many images per class in each split: the first ones in
      the split's (fixed, pre-shuffled) record order.
    mode: 'crop' (cover then centre crop) or 'resize' (stretch), see `images.fit_image`.
    image_key: the image feature, if not 'image' or the only `Image` feature.
    label_key: the label feature, if not 'label' or the only `ClassLabel` feature.
    num_threads: decoding threads (default: `images.default_threads()`).

  Returns:
    A `Dataset` named `name`, class names from the label feature.

  Raises:
    InputError: unknown dataset, dataset not prepared (or not in array_record format), missing
      image/label feature, unknown class, unknown split, or bad arguments.
  """
  decode_kwargs = dict(size=images_lib.as_size(image_size),
                       channels=images_lib.check_channels(channels), mode=mode,
                       num_threads=num_threads)
  max_per_class = _check_cap(max_per_class)
  tfds = _import_tfds()
  builder = _builder(tfds, name, data_dir)
  image_key, label_key = find_feature_keys(builder.info.features, name, image_key, label_key)
  all_names = tuple(builder.info.features[label_key].names)
  picked = select_classes(classes, all_names, f"TFDS dataset {name!r}")
  class_names = tuple(all_names[i] for i in picked)
  remap = np.full(len(all_names), -1, np.int64)
  remap[picked] = np.arange(len(picked))
  splits = default_splits(name, list(builder.info.splits), train_split, test_split)
  readers = _readers(tfds, builder, name, splits, data_dir, image_key, label_key)
  train, test = (
      _read_split(read, length, remap, max_per_class, class_names, decode_kwargs,
                  f"TFDS dataset {name!r} split {split!r}")
      for (read, length), split in zip(readers, splits))
  return Dataset(name, train, test)
