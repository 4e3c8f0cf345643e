"""Tests for jtransfer.methods.retrieval_run: the embedded task's draw, batched description,
scoring against hand-computed mAP, and the image-size check."""
import numpy as np
import pytest

from jtransfer import models
from jtransfer.data.base import Dataset, ImageSet
from jtransfer.errors import InputError
from jtransfer.methods import retrieval_run, transfer
from model_helpers import random_variables


def _dataset(per_class=(8, 6), classes=3):
  rng = np.random.default_rng(0)
  names = tuple(str(c) for c in range(classes))
  sets = []
  for n in per_class:
    labels = np.repeat(np.arange(classes), n).astype(np.int32)
    sets.append(ImageSet(rng.integers(0, 256, (len(labels), 4, 4, 1), dtype=np.uint8), labels,
                         names))
  return Dataset("toy", *sets)


def test_embedded_task_draws_queries_from_train_and_the_database_from_test():
  data = _dataset()
  q, ql, db, dbl, k = retrieval_run.embedded_task(data, queries=2, db_per_class=4, seed=3)
  assert k == 3 and len(q) == 6 and np.bincount(ql).tolist() == [2, 2, 2]
  assert np.bincount(dbl).tolist() == [4, 4, 4]
  # the database is the first 4 test images of each class
  want = np.concatenate([data.test.images[data.test.labels == c][:4] for c in range(3)])
  np.testing.assert_array_equal(db, want)
  train_rows = {x.tobytes() for x in data.train.images}
  assert all(x.tobytes() in train_rows for x in q)
  again = retrieval_run.embedded_task(data, 2, 4, 3)
  np.testing.assert_array_equal(again[0], q)  # a pure function of the seed


def test_describe_pads_the_last_batch_and_keeps_order():
  images = np.arange(10 * 2, dtype=np.uint8).reshape(10, 2)
  shapes = []

  def fn(params, stats, x):
    shapes.append(x.shape)
    return x.astype(np.float32) * params

  got = retrieval_run.describe(fn, 2.0, None, images, batch=4)
  np.testing.assert_array_equal(got, images * 2.0)
  assert set(shapes) == {(4, 2)}  # one compiled shape


def test_score_matches_a_hand_computed_trapezoid_ap():
  # one query; cosine ranking of the database puts its positives (label 0) at ranks 0 and 2:
  # revisitop's trapezoid AP = ((1 + 1) / 2 + (1/2 + 2/3) / 2) / 2 = 19/24
  q = np.array([[1.0, 0.0]])
  db = np.array([[1.0, 0.0], [0.9, 0.44], [0.6, 0.8], [0.0, 1.0]])
  db /= np.linalg.norm(db, axis=1, keepdims=True)
  got = retrieval_run.score(q, db, np.array([0]), np.array([0, 1, 0, 1]))
  assert got == {"map": pytest.approx(19 / 24)}
  # Revisited setups (ranking db0, db1, db2, db3), junk removed before AP: easy = {0}, junk
  # {1, 3} -> AP 1; medium = {0, 3}, junk {1}: ranks 0 and 2 -> 19/24; hard = {3}, junk
  # {0, 1}: rank 1 -> (0 + 1/2) / 2 = 1/4.
  gnd = [{"easy": [0], "hard": [3], "junk": [1]}]
  got = retrieval_run.score(q, db, gnd=gnd)
  assert got == pytest.approx({"easy": 1.0, "medium": 19 / 24, "hard": 0.25})


def test_check_image_size():
  model = models.get_model("vgg_s", 3, conv_widths=((4,), (6,)), dense_widths=())
  v = random_variables(model, (16, 16, 1), 0)
  source = transfer.Source("vgg_s", models.model_config(model), v, (16, 16, 1), (0.3,),
                           (0.3,), {})
  assert retrieval_run.check_image_size(source, None) == (16, 16, 1)
  assert retrieval_run.check_image_size(source, (16, 16)) == (16, 16, 1)
  with pytest.raises(InputError, match="image-size"):
    retrieval_run.check_image_size(source, (24, 24))


def test_mac_fn_rejects_an_unknown_tap():
  with pytest.raises(InputError, match="MAC tap"):
    retrieval_run.mac_fn(None, (0.0,), (1.0,), "fc7")
