"""jtransfer.api on tiny arrays: fit / evaluate / tune / score_sources / prune_cwl, checked
against independent computations (numpy accuracy, a direct forward, the registered setup)."""
import jax
import numpy as np
import pytest

from jtransfer import api, models
from jtransfer.errors import InputError
from jtransfer.methods import transferability

SHAPE = (28, 28, 1)


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, (16, *SHAPE), dtype=np.uint8)
  y = np.arange(16) % 2
  x[y == 1] //= 4  # a learnable difference: class 1 is darker
  return x, y


@pytest.fixture(scope="module")
def source():
  return api.random_source("vgg_s", SHAPE, num_classes=3)


def test_as_images_follows_the_data_rule():
  f = np.array([0.0, 0.5, 1.0]).reshape(1, 3, 1, 1)
  np.testing.assert_array_equal(api.as_images(f).ravel(), [0, 128, 255])
  with pytest.raises(InputError, match=r"in \[0, 1\]"):
    api.as_images(f * 2)
  with pytest.raises(InputError, match="dtype int64"):
    api.as_images(np.zeros((1, 2, 2, 1), np.int64))


def test_source_from_model_checks_variables():
  model = models.get_model("vgg_s", 3)
  v = models.init_model(model, jax.random.PRNGKey(0), SHAPE)
  s = api.source_from_model("vgg_s", model, v, SHAPE)
  assert s.mean == (0.5,) and s.input_shape == SHAPE
  other = models.init_model(models.get_model("vgg_s", 4), jax.random.PRNGKey(0), SHAPE)
  with pytest.raises(InputError, match="head"):  # a 4-class head is not this model's
    api.source_from_model("vgg_s", model, other, SHAPE)


def test_fit_freeze_converged_keeps_backbone_and_best_state(data, source):
  x, y = data
  r = api.fit(source, "freeze", (x, y), (x, y), lr=0.05,
              budget=api.Converged(cap=6, patience=4, eval_every=2), batch_size=8)
  h = r.history
  assert h["stopped"] in ("patience", "cap") and h["curve"]
  best = max(a for _, a in h["curve"])
  assert h["best_step"] == next(s for s, a in h["curve"] if a == best)
  # the kept state is the best one: evaluate agrees with the curve and with a numpy argmax
  acc = api.evaluate(r, x, y)
  assert acc == pytest.approx(best) == h["val_acc"]
  assert acc == np.mean(np.argmax(api.predict(r, x), axis=1) == y)
  # frozen: every conv param is the source's; the new head has 2 outputs
  src = source.variables["params"]
  np.testing.assert_array_equal(r.variables["params"]["conv1_1"]["conv"]["kernel"],
                                src["conv1_1"]["conv"]["kernel"])
  assert r.variables["params"]["head"]["kernel"].shape[-1] == 2


def test_bad_inputs_are_one_sentence(data, source):
  x, y = data
  with pytest.raises(InputError, match="no knob"):
    api.fit(source, "freeze", (x, y), lr=0.1, knobs={"alpha": 1.0})
  with pytest.raises(InputError, match="budget"):
    api.fit(source, "freeze", (x, y), lr=0.1, budget=5)
  with pytest.raises(InputError, match="lr"):
    api.fit(source, "freeze", (x, y), lr=-1.0)
  with pytest.raises(InputError, match="source model takes"):
    api.fit(source, "freeze", (x[:, :20, :20], y), lr=0.1)
  with pytest.raises(InputError, match="unknown strategy"):
    api.fit(source, "nope", (x, y), lr=0.1)


def test_tune_picks_the_best_validation_point(data, source):
  x, y = data
  t = api.tune(source, "freeze", (x, y), (x, y), lrs=(1e-4, 0.05), budget=api.FixedSteps(3),
               max_extend=0, batch_size=16)
  assert [row["lr"] for row in t.table] == [1e-4, 0.05]
  accs = [row["val_acc"] for row in t.table]
  assert t.lr == t.table[int(np.argmax(accs))]["lr"] and t.val_acc == max(accs)


def test_score_sources_matches_a_direct_forward(data, source):
  x, y = data
  scores = api.score_sources([source], x, y, metrics=("logme", "leep"))
  logits, _, taps = models.apply_model(source.model, source.variables["params"], {},
                                       (x.astype(np.float32) / 255 - 0.5) / 0.5,
                                       taps=("features",))
  feats = np.asarray(taps["features"]).reshape(len(x), -1)
  want = transferability.logme(feats, y, variant="published")
  assert scores["0"]["logme"] == pytest.approx(want, rel=1e-4)
  z = np.asarray(logits, np.float64)
  p = np.exp(z - z.max(1, keepdims=True))
  assert scores["0"]["leep"] == pytest.approx(
      transferability.leep(p / p.sum(1, keepdims=True), y), rel=1e-4)
  with pytest.raises(InputError, match="unknown metric"):
    api.score_sources([source], x, y, metrics=("accuracy",))


def test_prune_cwl_needs_scales_and_prunes_by_sigma(data, source):
  x, y = data
  with pytest.raises(InputError, match="CWL scales"):
    api.prune_cwl(source.variables, 0.5, config=source.config)
  r = api.fit(source, "freeze_cwl", (x, y), lr=0.05, budget=api.FixedSteps(2))
  sigma = r.variables["params"]["cwl"]
  tau = float(np.median(np.abs(sigma["conv1_1"])))
  out = api.prune_cwl(r, tau)
  want = int(np.sum(np.abs(sigma["conv1_1"]) >= tau))
  assert out.kept["conv1_1"][0] == max(want, 1)
  assert out.config["conv_widths"][0][0] == out.kept["conv1_1"][0]
