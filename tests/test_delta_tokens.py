"""DELTA on transformers (`methods/delta_tokens.py`): the default taps, the attention-weighted
distance on token maps (a hand-derived case), the channel ablation of a block output against a
numpy forward of the network's tail, and the strategies running on a ViT and a Swin."""
import jax
import numpy as np
import pytest

from jtransfer import models
from jtransfer.errors import InputError
from jtransfer.methods import delta, delta_tokens, transfer
from jtransfer.train import init_state, make_train_step
from model_helpers import random_variables

VIT = dict(dim=16, depth=2, heads=2)
SHAPE = (28, 28, 1)


def _vit_source(classes=2):
  model = models.get_model("vit_s28", classes, **VIT)
  return transfer.Source("vit_s28", models.model_config(model),
                         random_variables(model, SHAPE), SHAPE, (0.4,), (0.3,))


def test_default_taps():
  config = lambda arch, **kw: models.model_config(models.get_model(arch, 5, **kw))
  assert delta.default_taps("vit_b16", config("vit_b16")) == (
      "block2", "block5", "block8", "block11")
  assert delta.default_taps("vit_s28", config("vit_s28")) == (
      "block0", "block1", "block2", "block3")
  assert delta.default_taps("vit_s28", config("vit_s28", depth=2)) == ("block0", "block1")
  assert delta.default_taps("swin_t", config("swin_t")) == (
      "stage1/block1", "stage2/block1", "stage3/block5", "stage4/block1")


def test_attention_distance_on_token_maps_hand_case():
  # One image, 2 tokens x 2 channels, source zero: channel sums of squares 1+9 = 10 and
  # 4+16 = 20; 0.5 * (C w_0 10 / T + C w_1 20 / T) = 0.5 * (2*0.25*10/2 + 2*0.75*20/2) = 8.75.
  t = {"block0": np.array([[[1.0, 2.0], [3.0, 4.0]]], np.float32)}
  s = {"block0": np.zeros((1, 2, 2), np.float32)}
  w = {"block0": np.array([0.25, 0.75], np.float32)}
  assert float(delta.attention_distance(t, s, w)) == pytest.approx(8.75)


def _numpy_tail(h, norm, head, labels):
  """CE of the network after its last block, in numpy: final LayerNorm, class token, head."""
  h = np.asarray(h, np.float64)
  mu, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
  z = (h - mu) / np.sqrt(var + 1e-6) * norm["scale"] + norm["bias"]
  logits = z[:, 0] @ np.asarray(head["kernel"], np.float64) + head["bias"]
  logits -= logits.max(1, keepdims=True)
  logp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
  return -logp[np.arange(len(labels)), labels].mean()


def test_ablating_a_block_output_channel_equals_a_numpy_tail():
  source = _vit_source()
  model, params = source.model, source.variables["params"]
  x = np.random.default_rng(0).normal(size=(3, *SHAPE)).astype(np.float32)
  labels = np.array([0, 1, 1], np.int32)
  _, _, taps = jax.jit(lambda p: models.apply_model(model, p, None, x, taps=("block1",)))(params)
  h = np.asarray(taps["block1"])
  base = _numpy_tail(h, params["norm"], params["head"], labels)
  want = []
  for c in range(VIT["dim"]):
    ablated = h.copy()
    ablated[..., c] = 0.0  # channel c of the last block's output, at every token
    want.append(_numpy_tail(ablated, params["norm"], params["head"], labels) - base)
  fn = delta.ablation_fn(model, "block1", False, True)
  masks = 1.0 - np.eye(VIT["dim"], dtype=np.float32)
  got = np.asarray(fn(params, {}, x, labels, np.ones(3, np.float32), masks))
  np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-6)
  # attention_weights takes the channel count from the tapped map and z-scores the increases.
  weights = delta.attention_weights(model, params, {}, [(x, labels, np.ones(3, np.float32))],
                                    ("block1",))
  np.testing.assert_allclose(weights["block1"], delta.attention_from_losses(np.array(want)),
                             rtol=1e-3)


# 22 s for vit_s28 (the distance and the ablation are checked by hand above)
@pytest.mark.parametrize("arch", [pytest.param("vit_s28", marks=pytest.mark.slow),
                                  pytest.param("swin_t", marks=pytest.mark.slow)])
def test_delta_runs_on_transformers(arch):
  if arch == "swin_t":
    shape = (16, 16, 3)
    model = models.get_model("swin_t", 2, dim=8, depths=(1, 1), heads=(2, 2), window=2)
    source = transfer.Source("swin_t", models.model_config(model),
                             random_variables(model, shape), shape, (0.4,) * 3, (0.3,) * 3)
  else:
    source, shape = _vit_source(), SHAPE
  config = delta.Config(att_head_min_steps=5, att_batch_size=4, att_batches=1)
  setup = delta.build_setup(source, 2, 4, "att", config)
  images = np.random.default_rng(1).integers(0, 256, (4, *shape), dtype=np.uint8)
  labels = np.array([0, 1, 0, 1], np.int32)
  params, stats = setup.init(0, images, labels)
  taps = delta.default_taps(arch, source.config)
  att = params["frozen"]["attention"]
  assert sorted(att) == sorted(taps)
  width = {"vit_s28": {t: 16 for t in taps},
           "swin_t": {"stage1/block0": 8, "stage2/block0": 16}}[arch]
  for tap in taps:
    assert att[tap].shape == (width[tap],) and np.isclose(att[tap].sum(), 1.0)
  step = make_train_step(setup.loss_fn, setup.optimizer, donate=False)
  state = init_state(params, stats, setup.optimizer, 0, 1e-2)
  state, metrics = step(state, {"image": images, "label": labels})
  assert bool(metrics["finite"])
  bad = delta.Config(taps={arch: ("block9",)})
  with pytest.raises(InputError, match="block9"):
    delta.build_setup(source, 2, 4, "fm", bad)


def test_block_names():
  params = {"block0": {"attn": {"qkv": {"kernel": 0}}}, "stage2/block1": {"mlp": {"b": 0}},
            "norm": {"scale": 0}}
  assert delta_tokens.block_names(params) == ["block0", "stage2/block1"]
