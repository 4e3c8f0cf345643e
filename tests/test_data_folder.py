"""Tests for jtransfer.data.folder.load_folder on small trees of real PNG and JPEG files."""
import logging
import pathlib

import numpy as np
import pytest
from PIL import Image

from jtransfer.data.folder import load_folder, select_classes
from jtransfer.errors import InputError

# Distinct, JPEG-robust colours per class (far apart in every channel pair that matters).
_COLOURS = {"cat": (230, 30, 30), "ant": (30, 230, 30), "bee": (30, 30, 230)}


def _write(path: pathlib.Path, colour, fmt: str, size=(12, 10), gray=False):
  """Writes a solid image of `colour` (RGB, or its luma with `gray`) in format `fmt`."""
  path.parent.mkdir(parents=True, exist_ok=True)
  a = np.empty((size[1], size[0], 3), np.uint8)
  a[:] = colour
  image = Image.fromarray(a)
  if gray:
    image = image.convert("L")
  image.save(path, format=fmt)


def _flat_tree(root: pathlib.Path, per_class=5) -> pathlib.Path:
  for name, colour in _COLOURS.items():
    for i in range(per_class):
      fmt, ext = (("PNG", ".png"), ("JPEG", ".jpg"), ("JPEG", ".JPEG"), ("PNG", ".PNG"))[i % 4]
      _write(root / name / f"img{i:02d}{ext}", colour, fmt)
  (root / "cat" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
  (root / "ant" / "notes.txt").write_text("not an image")
  (root / "bee" / ".DS_Store").write_bytes(b"\0\0")  # hidden: ignored, not counted
  return root


def _colour_of(images: np.ndarray) -> np.ndarray:
  return images.reshape(len(images), -1, images.shape[-1]).mean(1)


def test_flat_layout_shapes_order_and_skips(tmp_path, caplog):
  root = _flat_tree(tmp_path / "pets")
  with caplog.at_level(logging.WARNING):
    ds, stats = load_folder(root, image_size=8, channels=3, return_stats=True)
  assert ds.name == "pets"
  assert ds.class_names == ("ant", "bee", "cat")  # sorted, not creation order
  assert ds.train.images.shape[1:] == (8, 8, 3) and ds.train.images.dtype == np.uint8
  assert ds.train.labels.dtype == np.int32
  assert stats.layout == "flat"
  assert stats.num_skipped == 2
  assert sorted(pathlib.Path(p).name for p, _ in stats.skipped) == ["broken.jpg", "notes.txt"]
  assert "skipped 2 file(s)" in caplog.text
  assert "broken.jpg" in caplog.text and "notes.txt" in caplog.text
  # The automatic split states its real per-class counts; both sentences reach Dataset.notes.
  assert "train/test images per class: ant 4/1, bee 4/1, cat 4/1" in caplog.text
  assert len(ds.notes) == 2 and all(n in caplog.text for n in ds.notes)
  # 5 images per class, test_fraction 0.2 -> 1 test image per class.
  assert stats.train_counts == (4, 4, 4) and stats.test_counts == (1, 1, 1)
  np.testing.assert_array_equal(np.bincount(ds.test.labels), [1, 1, 1])
  for split in (ds.train, ds.test):
    colours = _colour_of(split.images)
    for label, name in enumerate(ds.class_names):
      np.testing.assert_allclose(colours[split.labels == label], [_COLOURS[name]] * (
          split.labels == label).sum(), atol=6)


def test_flat_split_is_stratified_and_seeded(tmp_path):
  root = tmp_path / "d"
  for name, colour in _COLOURS.items():
    for i in range(10):
      # Brightness encodes the file index, to tell which files went to test.
      _write(root / name / f"{i}.png", tuple(max(0, c - 10 * i) for c in colour), "PNG")
  def test_ids(seed):
    ds = load_folder(root, image_size=4, channels=3, test_fraction=0.3, seed=seed)
    assert np.bincount(ds.test.labels).tolist() == [3, 3, 3]
    assert np.bincount(ds.train.labels).tolist() == [7, 7, 7]
    return sorted(map(tuple, _colour_of(ds.test.images).round().astype(int).tolist()))
  assert test_ids(0) == test_ids(0)
  assert test_ids(0) != test_ids(1)


def test_at_least_one_test_image_and_singletons(tmp_path, caplog):
  root = tmp_path / "d"
  _write(root / "ant" / "a.png", _COLOURS["ant"], "PNG")
  _write(root / "ant" / "b.png", _COLOURS["ant"], "PNG")
  _write(root / "bee" / "a.png", _COLOURS["bee"], "PNG")
  with caplog.at_level(logging.WARNING):
    ds, stats = load_folder(root, image_size=4, channels=3, test_fraction=0.01, return_stats=True)
  assert stats.train_counts == (1, 1) and stats.test_counts == (1, 0)
  assert "one readable image" in caplog.text


def test_split_layout_with_val_merged(tmp_path):
  root = tmp_path / "xray"
  for split, n in (("train", 3), ("test", 2), ("val", 1)):
    for name in ("NORMAL", "PNEUMONIA"):
      for i in range(n):
        colour = _COLOURS["ant" if name == "NORMAL" else "cat"]
        _write(root / split / name / f"{i}.jpeg", colour, "JPEG", gray=True)
  (root / "README.md").write_text("hello")
  ds, stats = load_folder(root, image_size=(6, 5), channels=1, return_stats=True)
  assert stats.layout == "split"
  assert ds.class_names == ("NORMAL", "PNEUMONIA")
  assert ds.train.images.shape == (8, 6, 5, 1) and ds.test.images.shape == (4, 6, 5, 1)
  assert stats.train_counts == (4, 4) and stats.test_counts == (2, 2)
  assert stats.num_skipped == 1  # README.md at the root


def test_grayscale_and_rgb_conversion(tmp_path):
  root = tmp_path / "d"
  _write(root / "ant" / "rgb.png", (200, 100, 50), "PNG")
  _write(root / "ant" / "rgb2.png", (200, 100, 50), "PNG")
  _write(root / "bee" / "gray.png", (90, 90, 90), "PNG", gray=True)
  _write(root / "bee" / "gray2.png", (90, 90, 90), "PNG", gray=True)
  rgb = load_folder(root, image_size=4, channels=3)
  gray = load_folder(root, image_size=4, channels=1)
  assert rgb.image_shape == (4, 4, 3) and gray.image_shape == (4, 4, 1)
  both = np.concatenate([rgb.train.images, rgb.test.images])
  labels = np.concatenate([rgb.train.labels, rgb.test.labels])
  np.testing.assert_array_equal(both[labels == 0][:, 0, 0], [[200, 100, 50]] * 2)
  np.testing.assert_array_equal(both[labels == 1][:, 0, 0], [[90, 90, 90]] * 2)
  g = np.concatenate([gray.train.images, gray.test.images])
  # Luma of (200, 100, 50) = (200*299 + 100*587 + 50*114) / 1000 = 124.
  assert set(g[labels == 0].ravel()) == {124} and set(g[labels == 1].ravel()) == {90}


def test_class_subset_by_name_and_index(tmp_path):
  root = _flat_tree(tmp_path / "d")
  ds = load_folder(root, image_size=4, channels=3, classes=["cat", "ant"])
  assert ds.class_names == ("cat", "ant")
  np.testing.assert_allclose(_colour_of(ds.train.images[ds.train.labels == 0])[0],
                             _COLOURS["cat"], atol=6)
  ds2 = load_folder(root, image_size=4, channels=3, classes=[2, 0])
  assert ds2.class_names == ("cat", "ant")
  np.testing.assert_array_equal(ds.train.images, ds2.train.images)
  with pytest.raises(InputError, match="unknown class 'dog'"):
    load_folder(root, image_size=4, channels=3, classes=["dog"])
  with pytest.raises(InputError, match="out of range"):
    load_folder(root, image_size=4, channels=3, classes=[3])
  with pytest.raises(InputError, match="more than once"):
    select_classes(["ant", 0], ("ant", "bee"), "x")


def test_empty_class_is_an_error_naming_the_folder(tmp_path):
  root = _flat_tree(tmp_path / "d")
  (root / "dog").mkdir()
  (root / "dog" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
  with pytest.raises(InputError, match=r"class folder '.*dog' contains no readable images"):
    load_folder(root, image_size=4, channels=3)
  # Leaving the broken class out of the selection works.
  ds = load_folder(root, image_size=4, channels=3, classes=["ant", "bee"])
  assert ds.class_names == ("ant", "bee")


def test_missing_root_and_bad_layouts(tmp_path):
  with pytest.raises(InputError, match="does not exist"):
    load_folder(tmp_path / "nope", image_size=4, channels=3)
  (tmp_path / "empty").mkdir()
  with pytest.raises(InputError, match="no class folders"):
    load_folder(tmp_path / "empty", image_size=4, channels=3)
  only_train = tmp_path / "t"
  _write(only_train / "train" / "ant" / "0.png", _COLOURS["ant"], "PNG")
  with pytest.raises(InputError, match="no 'test' folder"):
    load_folder(only_train, image_size=4, channels=3)
  differ = tmp_path / "x"
  _write(differ / "train" / "ant" / "0.png", _COLOURS["ant"], "PNG")
  _write(differ / "train" / "bee" / "0.png", _COLOURS["bee"], "PNG")
  _write(differ / "test" / "ant" / "0.png", _COLOURS["ant"], "PNG")
  _write(differ / "test" / "cat" / "0.png", _COLOURS["cat"], "PNG")
  with pytest.raises(InputError, match=r"only in train: \['bee'\], only in test: \['cat'\]"):
    load_folder(differ, image_size=4, channels=3)


def test_bad_arguments(tmp_path):
  root = _flat_tree(tmp_path / "d", per_class=2)
  with pytest.raises(InputError, match="test_fraction"):
    load_folder(root, image_size=4, channels=3, test_fraction=1.0)
  with pytest.raises(InputError, match="channels"):
    load_folder(root, image_size=4, channels=4)
  with pytest.raises(InputError, match="image_size"):
    load_folder(root, image_size=(4, -1), channels=3)


def test_nested_files_and_resize_mode(tmp_path):
  root = tmp_path / "d"
  _write(root / "ant" / "sub" / "0.png", _COLOURS["ant"], "PNG", size=(30, 10))
  _write(root / "ant" / "1.png", _COLOURS["ant"], "PNG", size=(30, 10))
  _write(root / "bee" / "0.png", _COLOURS["bee"], "PNG")
  _write(root / "bee" / "1.png", _COLOURS["bee"], "PNG")
  ds, stats = load_folder(root, image_size=(5, 7), channels=3, mode="resize", return_stats=True)
  assert stats.train_counts == (1, 1) and stats.test_counts == (1, 1)
  assert ds.image_shape == (5, 7, 3)
