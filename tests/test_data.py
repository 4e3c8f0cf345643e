"""Real data readers, class subsets, k-shot sampling, specs, batching."""
import gzip
import os

import numpy as np
import pytest

from jtransfer.data import Batches, ImageSet, load_spec, parse_spec, sample_kshot, subset_classes
from jtransfer.data import digits, fmnist
from jtransfer.data.base import Dataset
from jtransfer.errors import InputError

HAVE_FMNIST = os.path.exists(os.path.join(fmnist.DEFAULT_DIR, "t10k-labels-idx1-ubyte.gz"))


def _write_idx(path, array):
  header = bytes([0, 0, 8, array.ndim]) + b"".join(int(d).to_bytes(4, "big")
                                                   for d in array.shape)
  with gzip.open(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


def test_idx_reader_round_trip_and_truncation(tmp_path):
  a = np.arange(2 * 3 * 4).reshape(2, 3, 4)
  _write_idx(tmp_path / "x.gz", a)
  np.testing.assert_array_equal(fmnist.read_idx(str(tmp_path / "x.gz")), a)
  with gzip.open(tmp_path / "bad.gz", "wb") as f:
    f.write(bytes([0, 0, 8, 1, 0, 0, 0, 9, 1, 2]))
  with pytest.raises(InputError, match="truncated"):
    fmnist.read_idx(str(tmp_path / "bad.gz"))
  (tmp_path / "txt").write_text("hello")
  with pytest.raises(InputError, match="not an unsigned-byte IDX"):
    fmnist.read_idx(str(tmp_path / "txt"))


def test_fmnist_from_a_directory_of_idx_files(tmp_path):
  rng = np.random.default_rng(0)
  for split, n in (("train", 6), ("t10k", 4)):
    _write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 255, (n, 28, 28)))
    _write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10)
  data = fmnist.load_fmnist(str(tmp_path))
  assert data.train.images.shape == (6, 28, 28, 1) and len(data.test) == 4


def test_missing_fmnist_dir_is_clear():
  with pytest.raises(InputError, match="/no/such/dir does not exist.*dataset-fashion-mnist"):
    fmnist.load_fmnist("/no/such/dir")


@pytest.mark.skipif(not HAVE_FMNIST, reason="dataset-fashion-mnist not installed")
def test_real_fmnist_spec_subset():
  data = load_spec("fmnist:1,5,7,8,9", (28, 28, 1))
  assert data.class_names == ("trouser", "sandal", "sneaker", "bag", "ankle-boot")
  assert len(data.train) == 30000 and len(data.test) == 5000
  assert set(np.unique(data.train.labels)) == set(range(5))


def test_digits_fixed_split_and_upsampling():
  data = digits.load_digits(28)
  assert data.train.images.shape[1:] == (28, 28, 1) and data.train.images.dtype == np.uint8
  assert len(data.train) + len(data.test) == 1797
  assert data.train.images.max() > 200
  again = digits.load_digits(28)
  np.testing.assert_array_equal(data.test.labels, again.test.labels)


def test_kshot_is_stratified_seeded_and_disjoint():
  labels = np.repeat(np.arange(4), 20)
  tr, va = sample_kshot(labels, 3, seed=7, val_per_class=5)
  assert np.bincount(labels[tr]).tolist() == [3, 3, 3, 3]
  assert np.bincount(labels[va]).tolist() == [5, 5, 5, 5]
  assert not set(tr) & set(va)
  tr2, _ = sample_kshot(labels, 3, seed=7, val_per_class=5)
  np.testing.assert_array_equal(tr, tr2)
  tr3, _ = sample_kshot(labels, 3, seed=8, val_per_class=5)
  assert not np.array_equal(tr, tr3)


def test_kshot_too_large_names_class_and_counts():
  labels = np.array([0] * 10 + [1] * 2)
  with pytest.raises(InputError, match="k-shot 3 is larger than class 1, which has 2"):
    sample_kshot(labels, 3, seed=0)
  with pytest.raises(InputError, match="shots must be >= 1"):
    sample_kshot(labels, 0, seed=0)


def test_subset_classes_by_index_and_name():
  imgs = np.zeros((6, 2, 2, 1), np.uint8)
  s = ImageSet(imgs, np.array([0, 1, 2, 0, 1, 2], np.int32), ("a", "b", "c"))
  data = subset_classes(Dataset("t", s, s), ["c", 0])
  assert data.class_names == ("c", "a")
  assert data.train.labels.tolist() == [1, 0, 1, 0]
  with pytest.raises(InputError, match="no class 'z'"):
    subset_classes(Dataset("t", s, s), ["z"])
  with pytest.raises(InputError, match="classes 0..2, got 5"):
    subset_classes(Dataset("t", s, s), [5])


@pytest.mark.parametrize("spec,msg", [("mnist:1", "unknown kind 'mnist'"),
                                      ("fmnist:1,,2", "empty class"),
                                      ("folder:", "needs a path"),
                                      ("tfds:", "needs a TFDS name"), ("", "empty")])
def test_malformed_specs(spec, msg):
  with pytest.raises(InputError, match=msg):
    parse_spec(spec, flag="--target")


def test_imageset_validation():
  with pytest.raises(InputError, match="rank 4"):
    ImageSet(np.zeros((2, 28, 28), np.uint8), np.zeros(2, np.int32), ("a",))
  with pytest.raises(InputError, match="1 or 3 channels"):
    ImageSet(np.zeros((2, 28, 28, 2), np.uint8), np.zeros(2, np.int32), ("a",))
  with pytest.raises(InputError, match="labels must lie in"):
    ImageSet(np.zeros((2, 4, 4, 1), np.uint8), np.array([0, 3], np.int32), ("a", "b"))
  with pytest.raises(InputError, match="uint8"):
    ImageSet(np.full((2, 4, 4, 1), np.nan), np.zeros(2, np.int32), ("a",))


def test_batches_are_a_function_of_the_step():
  x, y = np.arange(10)[:, None], np.arange(10)
  b1, b2 = Batches(x, y, 4, seed=1), Batches(x, y, 4, seed=1)
  seq = [b1.at(i)["label"].tolist() for i in range(5)]
  assert [b2.at(i)["label"].tolist() for i in reversed(range(5))][::-1] == seq
  assert sorted(seq[0] + seq[1]) == sorted(set(seq[0] + seq[1]))  # no repeats within an epoch
  assert Batches(x, y, 64, seed=0).at(3)["label"].shape == (10,)
