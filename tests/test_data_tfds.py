"""Tests for jtransfer.data.tfds_source.load_tfds, offline and without TensorFlow.

Two kinds of data:
- `tfds.testing.mock_data(policy=MockPolicy.USE_CODE)` for real catalog names (oxford_flowers102,
  caltech101, dtd, cifar10): builder info from the installed TFDS code, random records (labels
  uniform over the classes, images of random size 5..49 unless the feature fixes it). Under the
  mock, only decoded reads work (serializing a fake record needs TensorFlow), so these tests go
  through the decoded path.
- A tiny builder prepared for real in the array_record format in a temporary data_dir (images
  given as encoded bytes, so no TensorFlow is needed to write it): the raw read path, real split
  names, and the not-prepared error.
"""
import io
import logging

import numpy as np
import pytest
from PIL import Image

from jtransfer.data.tfds_source import default_splits, find_feature_keys, load_tfds
from jtransfer.errors import InputError

tfds = pytest.importorskip("tensorflow_datasets")

_NUM_CLASSES = {"oxford_flowers102": 102, "caltech101": 102, "dtd": 47, "cifar10": 10}


def _mock(num_examples=24, **kwargs):
  return tfds.testing.mock_data(num_examples=num_examples,
                                policy=tfds.testing.MockPolicy.USE_CODE, **kwargs)


# ---------------------------------------------------------------- catalog names, mocked

@pytest.mark.parametrize("name", sorted(_NUM_CLASSES))
@pytest.mark.parametrize("size,channels", [(32, 3), (28, 1)])
def test_catalog_shapes_and_labels(name, size, channels):
  with _mock():
    ds = load_tfds(name, image_size=size, channels=channels)
  assert ds.name == name
  assert len(ds.class_names) == _NUM_CLASSES[name]
  for split in (ds.train, ds.test):
    assert split.images.shape == (24, size, size, channels)
    assert split.images.dtype == np.uint8 and split.labels.dtype == np.int32
    assert 0 <= split.labels.min() and split.labels.max() < _NUM_CLASSES[name]


def test_catalog_class_names_come_from_the_label_feature():
  with _mock(2):
    assert load_tfds("caltech101", image_size=8, channels=3).class_names[:3] == (
        "accordion", "airplanes", "anchor")
    assert load_tfds("dtd", image_size=8, channels=3).class_names[:2] == ("banded", "blotchy")
    flowers = load_tfds("oxford_flowers102", image_size=8, channels=3)
  assert flowers.class_names[0] == "pink primrose"


def _controlled_source(num_records=30, num_present=5):
  """A mock `as_data_source`: record i has label i % num_present and pixel (40*label, i, 7)."""
  def records(split):
    out = []
    for i in range(num_records):
      label = i % num_present
      image = np.empty((7 + i % 3, 9, 3), np.uint8)
      image[:] = (40 * label, i, 7 if split == "test" else 3)
      out.append({"image": image, "label": np.int64(label)})
    return out
  def as_data_source(self, split, decoders=None, deserialize_method=None, **kwargs):
    del self, decoders, deserialize_method, kwargs
    return [records(s) for s in split] if isinstance(split, list) else records(split)
  return as_data_source


def test_class_subset_by_name_and_index_is_remapped_in_order():
  with _mock(as_data_source_fn=_controlled_source()):
    by_name = load_tfds("caltech101", image_size=4, channels=3, classes=["anchor", "accordion"])
    by_index = load_tfds("caltech101", image_size=4, channels=3, classes=[2, 0])
    mixed = load_tfds("caltech101", image_size=4, channels=3, classes=["anchor", 0])
  assert by_name.class_names == by_index.class_names == mixed.class_names == (
      "anchor", "accordion")
  np.testing.assert_array_equal(by_name.train.images, by_index.train.images)
  np.testing.assert_array_equal(by_name.train.labels, mixed.train.labels)
  original = by_name.train.images[:, 0, 0, 0] // 40
  np.testing.assert_array_equal(np.array([2, 0])[by_name.train.labels], original)
  assert np.bincount(by_name.train.labels).tolist() == [6, 6]
  assert np.all(by_name.test.images[..., 2] == 7) and np.all(by_name.train.images[..., 2] == 3)


def test_max_per_class_keeps_the_first_records():
  with _mock(as_data_source_fn=_controlled_source()):
    ds = load_tfds("cifar10", image_size=(5, 6), channels=3, classes=[3, 1], max_per_class=2)
  assert ds.train.images.shape == (4, 5, 6, 3)
  record = ds.train.images[:, 0, 0, 1]
  # Class 3 sits at records 3, 8, 13...; class 1 at 1, 6, 11...: the first two of each.
  assert sorted(record[ds.train.labels == 0].tolist()) == [3, 8]
  assert sorted(record[ds.train.labels == 1].tolist()) == [1, 6]


def test_grayscale_of_color_records():
  with _mock(as_data_source_fn=_controlled_source()):
    ds = load_tfds("cifar10", image_size=3, channels=1, classes=[4])
  # Luma of (160, i, 3) rounds to 160*0.299 + i*0.587 + 3*0.114 for record i.
  record = np.arange(4, 30, 5)
  expected = np.round(160 * 0.299 + record * 0.587 + 3 * 0.114)
  np.testing.assert_allclose(ds.train.images[:, 0, 0, 0], expected, atol=1)


def test_selection_errors():
  with _mock(2):
    with pytest.raises(InputError, match="unknown class 'pizzza'"):
      load_tfds("caltech101", image_size=8, channels=3, classes=["pizzza"])
    with pytest.raises(InputError, match=r"out of range \[0, 10\)"):
      load_tfds("cifar10", image_size=8, channels=3, classes=[10])
    with pytest.raises(InputError, match="max_per_class"):
      load_tfds("cifar10", image_size=8, channels=3, max_per_class=0)
  with _mock(as_data_source_fn=_controlled_source(num_present=5)):
    with pytest.raises(InputError, match="no images of the selected classes"):
      load_tfds("cifar10", image_size=8, channels=3, classes=[9])


def test_unknown_dataset_names_close_matches():
  with pytest.raises(InputError, match=r"unknown TFDS dataset 'cifar_10'; did you mean cifar10"):
    load_tfds("cifar_10", image_size=8, channels=3)
  with pytest.raises(InputError, match="unknown TFDS dataset 'zzqqxx'; see tfds.list_builders"):
    load_tfds("zzqqxx", image_size=8, channels=3)


def test_default_splits():
  assert default_splits("caltech101", ["train", "test"]) == ("train", "test")
  assert default_splits("cifar10", ["train", "test"]) == ("train", "test")
  assert default_splits("dtd", ["train", "validation", "test"]) == ("train+validation", "test")
  assert default_splits("oxford_flowers102", ["test", "train", "validation"]) == (
      "train+validation", "test")
  assert default_splits("food101", ["train", "validation"]) == ("train", "validation")
  # Without split info (not prepared, or mocked), the known table decides.
  assert default_splits("oxford_flowers102", []) == ("train+validation", "test")
  assert default_splits("dtd/1:3.0.1", []) == ("train+validation", "test")
  assert default_splits("somethingelse", []) == ("train", "test")
  assert default_splits("dtd", ["train", "validation", "test"], train_split="train") == (
      "train", "test")
  assert default_splits("x", ["train"], test_split="train[80%:]") == ("train", "train[80%:]")
  with pytest.raises(InputError, match="no 'test' or 'validation' split"):
    default_splits("x", ["train"])
  with pytest.raises(InputError, match="no 'train' split"):
    default_splits("x", ["all", "test"])


def test_feature_key_detection():
  image = tfds.features.Image(shape=(None, None, 3))
  label = tfds.features.ClassLabel(names=["a", "b"])
  assert find_feature_keys(tfds.features.FeaturesDict({"image": image, "label": label}),
                           "x") == ("image", "label")
  assert find_feature_keys(tfds.features.FeaturesDict({"img": image, "y": label}), "x") == (
      "img", "y")
  no_label = tfds.features.FeaturesDict(
      {"image": image, "y": tfds.features.Tensor(shape=(), dtype=np.int64)})
  with pytest.raises(InputError, match="no top-level class label feature"):
    find_feature_keys(no_label, "x")
  two = tfds.features.FeaturesDict({"a": image, "b": image, "label": label})
  with pytest.raises(InputError, match="several image features"):
    find_feature_keys(two, "x")
  assert find_feature_keys(two, "x", image_key="b") == ("b", "label")


# ---------------------------------------------------------------- a real prepared dataset

_COLOURS = {"red": (220, 20, 20), "green": (20, 220, 20), "blue": (20, 20, 220)}


class JtransferTinyImages(tfds.core.GeneratorBasedBuilder):
  """Three solid-colour classes; splits train (9), validation (3), test (6)."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "picture": tfds.features.Image(shape=(None, None, 3)),
        "kind": tfds.features.ClassLabel(names=list(_COLOURS)),
    }))

  def _split_generators(self, dl_manager):
    del dl_manager
    return {"train": self._generate_examples(9, "tr"),
            "validation": self._generate_examples(3, "va"),
            "test": self._generate_examples(6, "te")}

  def _generate_examples(self, n, prefix):
    for i in range(n):
      label = i % 3
      a = np.empty((20 + 3 * i, 30, 3), np.uint8)
      a[:] = _COLOURS[list(_COLOURS)[label]]
      buf = io.BytesIO()
      Image.fromarray(a).save(buf, format="JPEG" if i % 2 else "PNG")
      # Encoded bytes: encoding a numpy image would need TensorFlow.
      yield f"{prefix}{i}", {"picture": buf.getvalue(), "kind": label}


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  JtransferTinyImages(data_dir=data_dir, file_format="array_record").download_and_prepare()
  return data_dir


def _check_colours(split, class_names):
  colours = split.images.reshape(len(split.images), -1, 3).mean(1)
  for label, name in enumerate(class_names):
    np.testing.assert_allclose(colours[split.labels == label],
                               [_COLOURS[name]] * int((split.labels == label).sum()), atol=6)


def test_prepared_dataset_raw_path(tiny_dir, caplog):
  with caplog.at_level(logging.DEBUG, logger="jtransfer.data.tfds_source"):
    ds = load_tfds("jtransfer_tiny_images", image_size=8, channels=3, data_dir=tiny_dir)
  assert "unavailable" not in caplog.text  # read through the raw (no double decode) path
  assert ds.class_names == ("red", "green", "blue")
  assert ds.train.images.shape == (12, 8, 8, 3)  # train + validation
  assert ds.test.images.shape == (6, 8, 8, 3)
  assert np.bincount(ds.train.labels).tolist() == [4, 4, 4]
  _check_colours(ds.train, ds.class_names)
  _check_colours(ds.test, ds.class_names)


def test_prepared_dataset_subset_cap_and_splits(tiny_dir):
  ds = load_tfds("jtransfer_tiny_images", image_size=(6, 4), channels=1, data_dir=tiny_dir,
                 classes=["blue", "red"], max_per_class=2, train_split="train")
  assert ds.class_names == ("blue", "red")
  assert ds.train.images.shape == (4, 6, 4, 1) and ds.test.images.shape == (4, 6, 4, 1)
  gray = ds.train.images[:, 0, 0, 0]
  assert np.all(gray[ds.train.labels == 0] < 60) and np.all(gray[ds.train.labels == 1] > 60)
  with pytest.raises(InputError, match="could not open splits"):
    load_tfds("jtransfer_tiny_images", image_size=8, channels=3, data_dir=tiny_dir,
              test_split="nope")


def test_not_prepared_names_the_data_dir(tmp_path):
  with pytest.raises(InputError, match=rf"not prepared under {tmp_path}.*tfds build"):
    load_tfds("jtransfer_tiny_images", image_size=8, channels=3, data_dir=str(tmp_path))
  with pytest.raises(InputError, match="'cifar10' is not prepared"):
    load_tfds("cifar10", image_size=8, channels=3, data_dir=str(tmp_path))
