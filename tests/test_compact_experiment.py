"""experiments.compact_transfer: flags, costs, pruning hook, and main() end to end (tiny)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import compact_transfer as ct
from experiments import pretrain
from jtransfer import models, surgery
from jtransfer.methods import distill, transfer


def _fast_init(model, rng, shape):
  """models.init_model without compiling Flax's random initialisers (seconds per config on
  2 cores); only shapes and finite values matter to these tests."""
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, *shape))))
  gen = np.random.default_rng(0)
  fill = lambda p, a: (np.ones(a.shape, np.float32) if p.endswith("var") else
                       (0.1 * gen.normal(size=a.shape)).astype(np.float32))
  return {k: surgery.map_with_path(fill, t) for k, t in shapes.items()}


@pytest.fixture(autouse=True)
def fast_init(monkeypatch):
  monkeypatch.setattr(models, "init_model", _fast_init)


@pytest.fixture(scope="module")
def sources(tiny_source_dir, tmp_path_factory):
  """(teacher source dir, compact source dir): tiny vgg_s sources, the compact one at half
  width (pretrain(..., epochs=0.02, max_train=256, model_config=...))."""
  path = str(tmp_path_factory.mktemp("compact-src") / "model")
  src = pretrain.pretrain("vgg_s", "fmnist:0,2,3,4,6", epochs=0.02, max_train=256,
                          batch_size=64, progress=False,
                          model_config=distill.compact_config("vgg_s"))
  transfer.save_source(path, src)
  return tiny_source_dir("vgg_s"), path


def _tiny(big, small, out, *extra):
  return ["--arch", "vgg_s", "--source", f"ckpt:{big}", "--student-source", f"ckpt:{small}",
          "--target", "digits", "--shots", "2", "--repeats", "1", "--teacher-steps", "2",
          "--student-steps", "2", "--latency-batches", "1", "--latency-runs", "1",
          "--test-per-class", "3", "--out", out, "--quiet", *extra]


# ----------------------------------------------------------------------------- flags
@pytest.mark.parametrize("extra,match", [
    (["--variants", "teacher,bogus"], "--variants"),
    (["--lam", "1.5"], "lambda"),
    (["--temperature", "0"], "temperature"),
    (["--prune-keep", "0"], "--prune-keep"),
    (["--student-steps", "0"], "--student-steps"),
    (["--latency-batches", "1,x"], "--latency-batches"),
    (["--student-config", "[1, 2]"], "JSON object"),
    (["--student-config", "{bad"], "not valid JSON"),
])
def test_bad_flags(extra, match, capsys):
  assert ct.main(["--target", "digits", "--out", "/nonexistent/x", *extra]) == 2
  assert match in capsys.readouterr().err


def test_checkpoint_flag_conflicts(capsys):
  argv = ["--source", "ckpt:/x", "--out", "/nonexistent/x"]
  assert ct.main(argv) == 2  # finetune/distill_ft need a compact source
  assert "--student-source" in capsys.readouterr().err
  assert ct.main(argv + ["--student-source", "ckpt:/y", "--student-config", "{}"]) == 2
  assert "conflicts" in capsys.readouterr().err


# ----------------------------------------------------------------------------- pieces
def test_cost_counts_matmul_flops():
  """FLOPs per image of x @ W are 2 * D * K (XLA counts a multiply-add as two)."""
  w = np.ones((16, 3), np.float32)
  forward = lambda p, s, x: x.reshape(x.shape[0], -1).astype(jnp.float32) @ p["w"]
  for batches in ([1, 4], [4]):
    c = ct.cost(forward, {"w": w}, {}, (4, 4, 1), batches, runs=2)
    assert 2 * 16 * 3 <= c["flops"] <= 2 * 16 * 3 + 2 * 16
    assert set(c["latency_ms"]) == {str(b) for b in batches}
    assert all(v > 0 for v in c["latency_ms"].values())


def test_prune_teacher_keeps_top_channels():
  model = models.get_model("vgg_s", 3, conv_widths=((6,), (5,)), dense_widths=())
  variables = _fast_init(model, jax.random.PRNGKey(0), (8, 8, 1))
  params = variables["params"]
  scores = ct.channel_scores(params)
  k1 = np.asarray(params["conv1_1"]["conv"]["kernel"])
  np.testing.assert_allclose(scores["conv1_1"], np.abs(k1).sum((0, 1, 2)))
  p, s, cfg = ct.prune_teacher(params, {}, models.model_config(model), 0.5, "group")
  assert cfg["conv_widths"] == [[3], [3]]  # ceil(0.5 * 6), ceil(0.5 * 5)
  top = np.sort(np.argsort(-scores["conv1_1"])[:3])
  np.testing.assert_array_equal(p["conv1_1"]["conv"]["kernel"], k1[..., top])
  small = models.from_config("vgg_s", cfg)
  x = jnp.zeros((2, 8, 8, 1))
  assert small.apply({"params": p}, x).shape == (2, 3)
  # BN nets score channels by |BN scale|
  bn = {"u": {"conv": {"kernel": np.ones((1, 1, 2, 3), np.float32)},
              "bn": {"scale": np.array([-3.0, 1.0, 2.0]), "bias": np.zeros(3)}}}
  np.testing.assert_array_equal(ct.channel_scores(bn)["u"], [3.0, 1.0, 2.0])


# ----------------------------------------------------------------------------- end to end
def test_main_minimal(tiny_source_dir, tmp_path):
  """Teacher and distilled student with augmentation (the teacher closed over in the loss)."""
  big = tiny_source_dir("vgg_s")
  out = str(tmp_path / "m")
  argv = ["--arch", "vgg_s", "--source", f"ckpt:{big}", "--target", "digits", "--shots", "2",
          "--repeats", "1", "--teacher-steps", "2", "--student-steps", "2",
          "--latency-batches", "1", "--latency-runs", "1", "--test-per-class", "3",
          "--variants", "teacher,distill", "--augment", "crop", "--out", out, "--quiet"]
  assert ct.main(argv) == 0
  records = {r["variant"]: r for r in json.load(open(os.path.join(out, "results.json")))}
  assert set(records) == {"teacher", "distill"}
  t, s = records["teacher"], records["distill"]
  assert s["params"] < t["params"] / 3 and s["flops"] < t["flops"] / 2
  assert s["config"]["conv_widths"] == [[16, 16], [32, 32], [64, 64]]
  assert s["config"]["dense_widths"] == [] and t["config"]["dense_widths"] == []
  assert 0 <= s["agreement"] <= 1 and "agreement" not in t
  report = open(os.path.join(out, "report.md")).read()
  assert "| teacher |" in report and "| distill |" in report
  assert os.path.getsize(os.path.join(out, "accuracy_vs_flops.png")) > 0


@pytest.mark.slow
def test_main_all_variants(sources, tmp_path):
  big, small = sources
  out = str(tmp_path / "a")
  argv = _tiny(big, small, out, "--repeats", "2", "--latency-batches", "1,2")
  assert ct.main(argv) == 0
  for name in ("report.md", "results.json", "results.jsonl", "summary.json",
               "accuracy_vs_flops.png"):
    assert os.path.getsize(os.path.join(out, name)) > 0, name
  records = json.load(open(os.path.join(out, "results.json")))
  assert len(records) == 2 * len(ct.VARIANTS)
  by = {(r["variant"], r["repeat"]): r for r in records}
  teacher = by[("teacher", 0)]
  for v in ct.VARIANTS[1:]:
    r = by[(v, 0)]
    assert r["params"] < teacher["params"] and r["flops"] < teacher["flops"], v
    assert set(r["latency_ms"]) == {"1", "2"}
  assert "acc_before_ft" in by[("pruned", 0)]
  assert by[("pruned", 0)]["config"]["conv_widths"] == [[16, 16], [32, 32], [64, 64]]
  report = open(os.path.join(out, "report.md")).read()
  for v in ct.VARIANTS:
    assert f"| {v} |" in report
  for line in ("distill vs scratch", "distill_ft vs finetune", "pruned_distill vs pruned"):
    assert line in report
  # --resume skips every finished run; without it the directory is refused
  assert ct.main(argv + ["--resume"]) == 0
  assert len(json.load(open(os.path.join(out, "results.json")))) == 2 * len(ct.VARIANTS)
  assert ct.main(argv) == 2
