"""Tests for the sparse-transfer stages moved out of experiments.sparse_transfer:
jtransfer.methods.hybrid_measure (rates, removed share), hybrid_source (Sparse-SourceNet and
its cache), hybrid_run (target draws, the knowledge loss, one unit's pieces)."""
import jax
import numpy as np
import pytest
from model_helpers import random_variables

from jtransfer import models, surgery
from jtransfer.data import Dataset, ImageSet
from jtransfer.data.fewshot import cap_per_class
from jtransfer.errors import InputError
from jtransfer.methods import hybrid, hybrid_run, hybrid_source, sparsity, transfer
from jtransfer.methods.hybrid_measure import (fc_removed, kernel_total, main_rate,
                                              removed_share)
from jtransfer.protocol import Budget, fit_converged

SHAPE = (16, 16, 1)
CFG = dict(conv_widths=((4,), (6,), (8,)), dense_widths=(12, 10))
MEAN, STD = (0.4,), (0.3,)


# ----------------------------------------------------------------------------- measurements
def test_main_rate_hand_case():
  params = {"main": {"a": {"kernel": np.array([[1.0, 0.0], [0.0, 0.0]]),
                           "bias": np.array([5.0, 0.0])},
                     "b": {"kernel": np.zeros(3)}},
            "extra": {"c": {"kernel": np.zeros((4, 4))}}}  # never measured
  assert kernel_total(params) == 7  # 4 + 3 kernel entries; biases and 'extra' excluded
  assert main_rate(params) == pytest.approx(6 / 7)
  # after neuron pruning the dense count of the unpruned net stays the denominator
  assert main_rate(params, dense_total=10) == pytest.approx(1 - 1 / 10)


def test_removed_share_hand_case_and_fc_table():
  table = {"fc6": {"neurons": [256, 128]}, "fc7": {"neurons": [256, 64]},
           "head": {"neurons": [10, 10]}}
  assert fc_removed(table) == (512, 192)
  assert removed_share(table) == pytest.approx(320 / 512)  # the head is not an fc layer here
  assert removed_share(table, ("fc6",)) == pytest.approx(0.5)
  before = {"main": {"fc6": {"kernel": np.ones((3, 4))}, "fc7": {"kernel": np.ones((4, 2))}}}
  after = {"main": {"fc6": {"kernel": np.ones((3, 1))}, "fc7": {"kernel": np.ones((1, 2))}}}
  # fc6 keeps 1 of its 4 outputs, fc7 both of its 2
  assert removed_share(hybrid.fc_table(before, after, ["fc6", "fc7"])) == pytest.approx(3 / 6)


# ----------------------------------------------------------------------------- fixtures
def _variables(model, seed=0):
  return random_variables(model, SHAPE, seed, gain=1.5)


@pytest.fixture(scope="module")
def source():
  model = models.get_model("vgg_s", 5, **CFG)
  return transfer.Source("vgg_s", models.model_config(model), _variables(model), SHAPE, MEAN,
                         STD)


def _data(classes, per_class, seed, name="toy"):
  rng = np.random.default_rng(seed)
  labels = np.repeat(np.arange(classes), per_class).astype(np.int32)
  images = rng.integers(0, 256, size=(len(labels), *SHAPE), dtype=np.uint8)
  names = tuple(str(c) for c in range(classes))
  return Dataset(name, ImageSet(images, labels, names),
                 ImageSet(images[::-1].copy(), labels[::-1].copy(), names))


def _accuracy(source, params, s: ImageSet) -> float:
  # independent: the model's own forward and numpy's argmax
  x = (s.images.astype(np.float32) / 255.0 - MEAN[0]) / STD[0]
  logits, _, _ = models.apply_model(source.model, params, {}, x)
  return float(np.mean(np.argmax(np.asarray(logits), -1) == s.labels))


# ----------------------------------------------------------------------------- source stage
def test_source_sets_caps():
  data = _data(5, 12, 0)
  train, test = hybrid_source.source_sets(data, 20, 3)
  assert len(train) == 20 and np.all(np.diff(train.labels) >= 0)  # a subset, in split order
  assert np.bincount(test.labels).tolist() == [3] * 5
  assert len(hybrid_source.source_sets(data, 0, 0)[0]) == 60  # 0 = all


def test_sparse_source_cache(source, tmp_path):
  masks = sparsity.magnitude_masks(source.variables["params"], 0.6)
  params = sparsity.apply_masks(source.variables["params"], masks)
  assert hybrid_source.load_sparse_source(str(tmp_path / "none")) is None
  path = str(tmp_path / "sparse")
  hybrid_source.save_sparse_source(path, source, params)
  got, got_masks = hybrid_source.load_sparse_source(path)
  for p, v in surgery.flatten(params).items():
    np.testing.assert_array_equal(surgery.flatten(got)[p], v)
  kernels = {p: m for p, m in surgery.flatten(got_masks).items() if p.endswith("kernel")}
  assert len(kernels) == 6  # conv1_1, conv2_1, conv3_1, fc6, fc7, head
  for p, m in kernels.items():  # the masks are the zeros
    np.testing.assert_array_equal(m, surgery.flatten(params)[p] != 0)
  assert transfer.load_source(path).meta["sparse_source"] is True


@pytest.mark.slow  # ~10 CPU-s: compiles the source's SGD step
def test_prune_source_rows(source):
  data = _data(5, 8, 1)
  cfg = hybrid_source.SourcePruning((0.4, 0.7), steps=2, lr=0.01, batch_size=8, max_train=0,
                                    test_per_class=4, scope="layer")
  seen = []
  params, masks, rows = hybrid_source.prune_source(source, data, cfg, seen.append)
  assert seen == rows and [r.round for r in rows] == [0, 1, 2]
  test = cap_per_class(data.test, 4)
  assert rows[0].acc == pytest.approx(_accuracy(source, source.variables["params"], test))
  assert rows[0].acc_pruned is None and rows[0].layers == {}
  assert rows[-1].acc == pytest.approx(_accuracy(source, params, test))
  for r, want in zip(rows[1:], (0.4, 0.7)):
    assert r.target == want and r.sparsity == pytest.approx(want, abs=0.02)
  # pruned entries stay exactly zero and the masks say so
  for p, m in surgery.flatten(masks).items():
    if m is not None:
      assert not np.any(surgery.flatten(params)[p][~m])


# ----------------------------------------------------------------------------- run unit
def test_draw_target_small_class():
  data = _data(3, 10, 2)
  logs = []
  d = hybrid_run.draw_target(data, 0, 100, 4, 2, logs.append)
  assert d.shots == 6 and len(d.images) == 18 and len(d.val) == 12 and len(d.test) == 6
  assert "6 training images per class" in logs[0]
  with pytest.raises(InputError, match="leaves no training images"):
    hybrid_run.draw_target(data, 0, 5, 10, 2)


def test_knowledge_loss_matches_hybrid_loss(source):
  """Lambda and tau from the batch give hybrid.loss_fn's value at the same lambda, tau."""
  sp = sparsity.magnitude_masks(source.variables["params"], 0.5)
  sp_params = sparsity.apply_masks(source.variables["params"], sp)
  hy, params, _ = hybrid.init_hybrid(source, 3, hybrid.variant_config("hybrid", lam=0.7,
                                                                       tau=2.5), 1, sp_params, sp)
  rng = np.random.default_rng(4)
  batch = {"image": rng.integers(0, 256, size=(4, *SHAPE), dtype=np.uint8),
           "label": np.array([0, 1, 2, 1])}
  full = dict(batch, lam=np.full(4, 0.7, np.float32), tau=np.full(4, 2.5, np.float32))
  # jitted: op by op, the hybrid's three branches dispatch hundreds of small ops
  want, _ = jax.jit(lambda p: hybrid.loss_fn(hy)(p, {}, batch, None))(params)
  loss = jax.jit(jax.value_and_grad(lambda p: hybrid_run.knowledge_loss(hy)(p, {}, full, None),
                                    has_aux=True))
  (got, (parts, _)), grads = loss(params)
  np.testing.assert_allclose(got, want, rtol=1e-6)
  np.testing.assert_allclose(got, parts["ce"] + 0.7 * parts["kd"], rtol=1e-6)
  assert np.all(np.asarray(grads["reference"]["head"]["kernel"]) == 0)  # the reference is fixed
  assert np.any(np.asarray(grads["extra"]["head"]["kernel"]) != 0)


@pytest.mark.slow  # ~20 CPU-s: compiles a K+ and a K- train step and the pruned structures
def test_unit_run(source):
  data = _data(3, 12, 5)
  params, masks, _ = hybrid_source.prune_source(
      source, _data(5, 6, 6), hybrid_source.SourcePruning((0.5,), steps=1, batch_size=8,
                                                          max_train=0, test_per_class=2))
  cfg = hybrid_run.UnitSettings(batch_size=8, steps=4, target_rates=(0.6, 0.8), target_steps=2,
                                scope="layer", neuron_layers=("fc6",), neuron_frac=0.5,
                                neuron_steps=1, neuron_images_per_class=2)

  def converge(state, step_fn, batch_at, val, cap, on_step=None):
    return fit_converged(state, step_fn, batch_at, val, Budget.from_flags(cap, 2, 2), on_step)

  draw = hybrid_run.draw_target(data, 0, 6, 3, 3)
  unit = hybrid_run.Unit(source, (params, masks), draw, 0, cfg, hybrid_run.Compiled(), converge)
  hp = dict(lr=1e-3, lam=1.0, tau=4.0)
  tune = unit.transfer("hybrid", hp, test=False)[3]
  assert tune["role"] == "tune" and tune["test_acc"] is None and tune["stopped"] != "fixed"
  got = []
  tuned = {v: (hp if hybrid.VARIANTS[v][1] else dict(lr=1e-3, lam=None, tau=None))
           for v in ("standard", "hybrid")}
  unit.run(got.append, tuned, ("standard", "hybrid"))
  kinds = [r["kind"] for r in got]
  assert kinds == ["transfer"] * 2 + ["target_prune"] * 4 + ["neuron"]
  std, hyb = got[0], got[1]
  assert std["rate"] == 0.0 and hyb["rate"] > 0.3  # the sparse source's zeros below fc7
  for r in got[2:6]:
    assert r["sparsity"] >= r["rate"] - 1e-3 and 1 <= r["retrain_steps"] <= 2
    assert 0.0 <= r["test_acc"] <= 1.0
  neuron = got[-1]
  assert neuron["table"]["fc6"]["neurons"][0] == 12 and neuron["rate"] >= neuron["rate_before"]
  assert neuron["level"] == std["val_acc"] and neuron["from_rate"] in (0.6, 0.8)
