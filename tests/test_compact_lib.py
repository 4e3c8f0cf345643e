"""jtransfer.methods.compact and compact_runs: teacher pruning, student widths, the compact
source cache, the stopping rule, and one teacher with its students on a tiny draw."""
import os
from types import SimpleNamespace as NS

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from model_helpers import small_variables

from jtransfer import models, surgery
from jtransfer.errors import InputError
from jtransfer.inputs import source_from_model
from jtransfer.methods import compact, compact_runs, distill


_fast_init = small_variables


@pytest.fixture(autouse=True)
def fast_init(monkeypatch):
  monkeypatch.setattr(models, "init_model", _fast_init)


# ----------------------------------------------------------------------------- pruning
def test_channel_scores_and_prune_teacher_keep_the_top_channels():
  model = models.get_model("vgg_s", 3, conv_widths=((6,), (5,)), dense_widths=())
  params = _fast_init(model, jax.random.PRNGKey(0), (8, 8, 1))["params"]
  scores = compact.channel_scores(params)
  k1 = np.asarray(params["conv1_1"]["conv"]["kernel"])
  np.testing.assert_allclose(scores["conv1_1"], np.abs(k1).sum((0, 1, 2)))  # filter L1 norm
  p, _, cfg = compact.prune_teacher(params, {}, models.model_config(model), 0.5, "group")
  assert cfg["conv_widths"] == [[3], [3]]  # ceil(0.5 * 6), ceil(0.5 * 5)
  top = np.sort(np.argsort(-scores["conv1_1"])[:3])
  np.testing.assert_array_equal(p["conv1_1"]["conv"]["kernel"], k1[..., top])
  small = models.from_config("vgg_s", cfg)
  assert small.apply({"params": p}, jnp.zeros((2, 8, 8, 1))).shape == (2, 3)
  # BN nets score channels by |BN scale|
  bn = {"u": {"conv": {"kernel": np.ones((1, 1, 2, 3), np.float32)},
              "bn": {"scale": np.array([-3.0, 1.0, 2.0]), "bias": np.zeros(3)}}}
  np.testing.assert_array_equal(compact.channel_scores(bn)["u"], [3.0, 1.0, 2.0])


def test_top_fraction_rounds_up_keeps_one_and_breaks_ties_by_index():
  keep = compact.top_fraction({"a": np.array([1.0, 5.0, 5.0, 0.0]), "b": np.array([2.0])},
                              0.4)
  # ceil(0.4 * 4) = 2 channels: the two 5s; ceil(0.4 * 1) = 1
  np.testing.assert_array_equal(keep["a"], [False, True, True, False])
  np.testing.assert_array_equal(keep["b"], [True])
  keep = compact.top_fraction({"a": np.array([3.0, 3.0, 3.0])}, 0.01)
  np.testing.assert_array_equal(keep["a"], [True, False, False])  # at least one, lowest index
  with pytest.raises(InputError, match=r"\(0, 1\]"):
    compact.top_fraction({"a": np.ones(2)}, 0.0)


def test_prune_teacher_ranks_cwl_teachers_by_sigma_and_folds_the_scales():
  """A CWL teacher: channels ranked by |sigma|, not by the kernel; the kept kernels carry
  their scale (cwl.apply_cwl), so the pruned net computes what the scaled one did."""
  from jtransfer.methods import cwl
  model = models.get_model("vgg_s", 3, conv_widths=((4,), (2,)), dense_widths=())
  params = _fast_init(model, jax.random.PRNGKey(0), (8, 8, 1))["params"]
  sigma = {"conv1_1": np.array([0.1, -2.0, 0.5, 3.0], np.float32),
           "conv2_1": np.array([1.0, 1.0], np.float32)}
  with_scales = {**params, cwl.CWL_KEY: sigma}
  p, _, cfg = compact.prune_teacher(with_scales, {}, models.model_config(model), 0.5)
  assert cfg["conv_widths"] == [[2], [1]]
  k1 = np.asarray(params["conv1_1"]["conv"]["kernel"])
  np.testing.assert_allclose(p["conv1_1"]["conv"]["kernel"], k1[..., [1, 3]] * sigma[
      "conv1_1"][[1, 3]], rtol=1e-6)
  assert cwl.CWL_KEY not in p


# ----------------------------------------------------------------------------- student
def test_student_config_prefers_the_compact_sources_own():
  assert compact.student_config("vgg_s") == distill.COMPACT_CONFIGS["vgg_s"]
  assert compact.student_config("vgg_s", {"dense_widths": []})["dense_widths"] == []
  src = NS(config={"conv_widths": [[4]], "num_classes": 5})
  assert compact.student_config("vgg_s", {"dense_widths": [9]}, src) == {"conv_widths": [[4]]}


def test_compact_source_pretrains_once_then_reads_the_cache(tmp_path):
  model = models.get_model("vgg_s", 5, conv_widths=((4,),), dense_widths=())
  variables = _fast_init(model, jax.random.PRNGKey(0), (8, 8, 1))
  calls = []

  def pretrain(arch, spec, *, epochs, seed, progress, model_config):
    calls.append((arch, spec, epochs, seed, model_config))
    return source_from_model(arch, model, variables, (8, 8, 1))

  config = {"conv_widths": [[4]]}
  kw = dict(epochs=0.5, seed=3, cache_root=str(tmp_path), pretrain=pretrain, progress=False)
  a = compact.compact_source("vgg_s", "digits", config, **kw)
  b = compact.compact_source("vgg_s", "digits", config, **kw)
  assert calls == [("vgg_s", "digits", 0.5, 3, config)]  # the second came from the cache
  assert b.config == a.config and a.arch == "vgg_s"
  path = compact.compact_cache_dir(str(tmp_path), "vgg_s", "digits", config, 0.5, 3)
  assert os.path.isdir(path) and path.startswith(str(tmp_path / "sources" / "vgg_s-compact-"))
  # every input that makes the source is in its key
  others = [("resnet_s", "digits", config, 0.5, 3), ("vgg_s", "fmnist", config, 0.5, 3),
            ("vgg_s", "digits", {}, 0.5, 3), ("vgg_s", "digits", config, 1.0, 3),
            ("vgg_s", "digits", config, 0.5, 4)]
  assert len({compact.compact_cache_dir("r", *o) for o in others} | {path}) == 6
  # a checkpoint of another arch is refused
  with pytest.raises(InputError, match="not the student arch resnet_s"):
    compact.compact_source("resnet_s", f"ckpt:{path}", None, **kw)


# ----------------------------------------------------------------------------- runs
def test_converge_stops_by_patience_or_trains_the_cap():
  """The protocol's stopping rule keeps the best validation state; patience 0 trains exactly
  the cap and keeps the last."""
  acc = [0.0, 0.2, 0.6, 0.4, 0.4, 0.9, 0.9, 0.9]  # validation accuracy after each step

  def step_fn(state, batch):
    return NS(step=state.step + 1, params={"t": state.step + 1}, batch_stats={}), {"finite": 1}

  def forward(params, stats, images):  # the first acc[t] of the images right (class 0)
    out = np.zeros((len(images), 2), np.float32)
    out[int(round(acc[params["t"]] * len(images))):, 1] = 1
    return out

  val = (np.zeros((10, 2, 2, 1), np.uint8), np.zeros(10, np.int64))
  start = NS(step=0, params={"t": 0}, batch_stats={})
  trainer = NS(settings=compact_runs.RunSettings(patience=2, eval_every=1))
  converge = compact_runs.CompactTrainer.converge
  state, info = converge(trainer, start, step_fn, lambda i: None, forward, val, 7)
  assert info == dict(steps=4, best_step=2, stopped="patience") and state.params["t"] == 2
  trainer = NS(settings=compact_runs.RunSettings(patience=0, eval_every=1))
  state, info = converge(trainer, start, step_fn, lambda i: None, forward, val, 7)
  assert info == dict(steps=7, best_step=7, stopped="fixed") and state.params["t"] == 7


class _Test:
  """A test split that fails the test when read, unless allowed."""

  def __init__(self, images, labels):
    self._images, self._labels, self.open = images, labels, False

  @property
  def images(self):
    assert self.open, "the test split was read"
    return self._images

  @property
  def labels(self):
    assert self.open, "the test split was read"
    return self._labels


@pytest.mark.slow  # ~60 s on 2 loaded cores: seven compiled train steps and forwards
def test_teacher_and_students_on_a_tiny_draw():
  """A teacher and every variant on one draw: a tuning draw never reads test and is not
  measured; on an evaluation draw the students are smaller than the teacher, agree with it on
  some fraction of test, and the pruned ones keep half the teacher's channels."""
  shape, k = (8, 8, 1), 3
  big = models.get_model("vgg_s", 4, conv_widths=((8,), (8,)), dense_widths=())
  source = source_from_model("vgg_s", big, _fast_init(big, None, shape), shape)
  small = models.get_model("vgg_s", 4, conv_widths=((2,), (2,)), dense_widths=())
  student_src = source_from_model("vgg_s", small, _fast_init(small, None, shape), shape)
  settings = compact_runs.RunSettings(
      arch="vgg_s", student_arch="vgg_s", teacher_steps=2, student_steps=2, eval_every=1,
      patience=1, batch_size=6, latency_batches=(1,), latency_runs=1)
  trainer = compact_runs.CompactTrainer(settings, source, student_src)
  gen = np.random.default_rng(0)
  images = gen.integers(0, 256, (12, *shape), dtype=np.uint8)
  labels = np.arange(12) % k
  test = _Test(images[:6], labels[:6])
  tune = compact_runs.Draw(0, images[:6], labels[:6], (images[6:], labels[6:]))
  assert tune.role == "tune"
  teacher, out, key = compact_runs.run_teacher(trainer, k, tune, 1e-3, "")
  assert key is None and out["test_acc"] is None and "params" not in out
  assert 0 <= out["val_acc"] <= 1 and out["stopped"] in ("patience", "cap")
  assert teacher.logits.shape == (6, k) and teacher.pred is None
  out, key = compact_runs.run_variant(trainer, "distill", k, tune, 1e-3, {"T": 2.0, "lam": 0.5},
                                      teacher)
  assert key is None and out["test_acc"] is None and "agreement" not in out
  with pytest.raises(InputError, match="needs the teacher"):
    compact_runs.run_variant(trainer, "pruned", k, tune, 1e-3, {}, None)

  test.open = True
  ev = compact_runs.Draw(1, images[:6], labels[:6], (images[6:], labels[6:]), test)
  teacher, t_out, t_key = compact_runs.run_teacher(trainer, k, ev, 1e-3, "")
  assert t_key == ("teacher", k) and teacher.pred.shape == (6,)
  assert t_out["params"] == surgery.count(teacher.params) and t_out["flops"] > 0
  outs = {}
  for variant in compact.VARIANTS[1:]:
    knobs = {"T": 2.0, "lam": 0.5} if variant in compact.KD else {}
    with_teacher = teacher if variant in compact.NEEDS_TEACHER else None
    outs[variant], key = compact_runs.run_variant(trainer, variant, k, ev, 1e-3, knobs,
                                                  with_teacher)
    assert key is not None and 0 <= outs[variant]["test_acc"] <= 1
    assert outs[variant]["params"] < t_out["params"], variant
    assert ("agreement" in outs[variant]) == (variant in compact.NEEDS_TEACHER), variant
  assert outs["pruned"]["config"]["conv_widths"] == [[4], [4]]
  assert "acc_before_ft" in outs["pruned_distill"] and "acc_before_ft" not in outs["distill"]
  assert outs["scratch"]["config"]["conv_widths"] == [[2], [2]]  # the compact source's widths
  trainer.retime([t_key, ("student", k)])
  assert set(trainer.latency(t_key)) == {"1"} and trainer.latency(("student", k))["1"] > 0
