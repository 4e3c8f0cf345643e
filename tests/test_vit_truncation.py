"""Truncation points on a ViT (`truncate_after='block{i}'`): the truncated target model against
a hand-run of the blocks, the token-grid map the selection metrics read, and
experiments.truncation's smoke setting on a random vit_s28 source."""
import json
import os

import jax
import numpy as np
import pytest

from jtransfer import models
from jtransfer.errors import InputError
from jtransfer.methods import selection, transfer
from model_helpers import random_variables

CONFIG = dict(dim=16, depth=3, heads=2, patch_size=4, pos_grid=(3, 3))
SHAPE = (12, 12, 1)


def _layer_norm(x, p, eps=1e-6):
  """torch.nn.LayerNorm over the last axis, in numpy float64."""
  x = np.asarray(x, np.float64)
  mu = x.mean(-1, keepdims=True)
  var = ((x - mu) ** 2).mean(-1, keepdims=True)
  return (x - mu) / np.sqrt(var + eps) * np.asarray(p["scale"]) + np.asarray(p["bias"])


@pytest.mark.parametrize("pool", ["token", "mean"])
def test_truncated_vit_equals_hand_run_of_the_blocks(pool):
  """Cut after block1 of three: the target model built from the source (its block2 dropped,
  norm and head kept) gives the logits of the source's block1 tokens (run by the full model
  and read from its tap), put through the final LayerNorm by hand, pooled (CLS or mean of the
  patch tokens) and multiplied by the head; 'last_conv' is the normed patch tokens on the 3x3
  grid and 'features' the pooled vector."""
  model = models.get_model("vit_s28", 4, pool=pool, **CONFIG)
  source = transfer.Source("vit_s28", models.model_config(model),
                           random_variables(model, SHAPE), SHAPE, (0.5,), (0.25,))
  cut = transfer.target_model(source, 4, truncate_after="block1")
  params, _ = transfer.init_target(source, cut, 0, dont_load=())
  assert "block2" not in params and "block1" in params and "norm" in params
  x = np.random.default_rng(0).normal(size=(2, *SHAPE)).astype(np.float32)

  def forwards(p, src, x):
    logits, _, taps = models.apply_model(cut, p, None, x, taps=["last_conv", "features"])
    _, full = selection.apply_with_taps(model, src, None, x, ["block1"])
    _, sel = selection.apply_with_taps(cut, p, None, x, [selection.LAST_CONV_OUTPUT])
    return logits, taps, full, sel

  logits, taps, full, sel = jax.jit(forwards)(params, source.variables["params"], x)
  normed = _layer_norm(full["block1"], params["norm"])
  pooled = normed[:, 0] if pool == "token" else normed[:, 1:].mean(1)
  want = pooled @ np.asarray(params["head"]["kernel"]) + np.asarray(params["head"]["bias"])
  np.testing.assert_allclose(logits, want, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(taps["features"], pooled, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(taps["last_conv"], normed[:, 1:].reshape(2, 3, 3, 16),
                             rtol=1e-5, atol=1e-5)
  # the selection code's map of a transformer is that tap, truncated or not
  np.testing.assert_allclose(sel[selection.LAST_CONV_OUTPUT], taps["last_conv"], rtol=1e-6,
                             atol=1e-6)
  with pytest.raises(InputError, match="truncate_after 'block3' is not a layer"):
    models.abstract_variables(transfer.target_model(source, 4, truncate_after="block3"), SHAPE)


@pytest.mark.slow  # 21 s at load ~10, 94 s at ~17 (two points x three LRs); the cut itself is
# tested above in the default suite
def test_truncation_module_smoke_on_vit_s28(tmp_path):
  """experiments.truncation --tiny on a random vit_s28 source cut after block0 and block1:
  both points fine-tuned and scored, S1..S6 on the 7x7 token grid."""
  from experiments import truncation
  config = dict(dim=16, depth=2, heads=2)
  model = models.get_model("vit_s28", 3, **config)
  shape = (28, 28, 1)
  source = transfer.Source("vit_s28", models.model_config(model),
                           random_variables(model, shape), shape, (0.5,), (0.25,),
                           {"source_spec": "random"})
  transfer.save_source(str(tmp_path / "src"), source)
  out = tmp_path / "out"
  assert truncation.main(["--tiny", "--arch", "vit_s28", "--source", f"ckpt:{tmp_path / 'src'}",
                          "--points", "block0,block1", "--target", "digits:0,1,2",
                          "--out", str(out), "--quiet"]) == 0
  records = truncation.rows(json.load(open(os.path.join(out, "results.json"))))
  assert [r["point"] for r in records] == ["block0", "block1"]
  assert all(r["map_shape"] == [7, 7, 16] and np.isfinite(r["S6"]) for r in records)
  assert "| digits:0,1,2 |" in (out / "report.md").read_text()


def test_swin_is_refused_in_one_sentence(tmp_path, capsys):
  """--arch swin_t: exit 2 with one 'error:' line before --out is made."""
  from experiments import truncation
  with pytest.raises(InputError, match="Swin models cannot be truncated"):
    truncation._truncatable(models.get_model("swin_t", 2))
  assert truncation.main(["--arch", "swin_t", "--out", str(tmp_path / "x")]) == 2
  assert "error: --arch: Swin models cannot be truncated" in capsys.readouterr().err
  assert not (tmp_path / "x").exists()
