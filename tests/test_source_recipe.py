"""The pretraining recipe per family (jtransfer/sources.py): SGD for the CNNs, AdamW (decay on
kernels only) for the transformers, and cache folders that keep the CNN sources' old keys."""
import hashlib
import json
import os

import jax
import numpy as np
import pytest

from jtransfer import models, sources, surgery
from jtransfer.errors import InputError


@pytest.mark.parametrize("arch,recipe", [("resnet_s", "sgd"), ("vgg_s", "sgd"),
                                         ("mobilenet_v2", "sgd"), ("vit_s28", "adamw"),
                                         ("vit_b16", "adamw"), ("swin_t", "adamw")])
def test_recipe_per_family(arch, recipe):
  assert sources.recipe_for(arch) == recipe


def test_adamw_decays_kernels_only_by_hand():
  """With zero gradients AdamW's update is -lr * wd * param on the decayed leaves (Adam's own
  term is 0 / (0 + eps) = 0) and 0 on the rest: here every kernel decays, and no bias, norm
  scale, class token or position embedding does."""
  model = models.get_model("vit_s28", 3)
  params = models.init_model(model, jax.random.PRNGKey(0), (28, 28, 1))["params"]
  tx = sources._optimizer("adamw", 0.5, 0.1, params)
  zeros = jax.tree.map(np.zeros_like, params)
  updates, _ = tx.update(zeros, tx.init(params), params)
  flat_p, flat_u = surgery.flatten(params), surgery.flatten(updates)
  kernels = [k for k in flat_p if k.endswith("kernel")]
  assert len(kernels) == 1 + 4 * 4 + 1  # patch embed, 4 blocks x (qkv, proj, fc1, fc2), head
  for path, p in flat_p.items():
    want = -0.5 * 0.1 * np.asarray(p) if path.endswith("kernel") else np.zeros_like(p)
    np.testing.assert_allclose(flat_u[path], want, rtol=1e-6, atol=1e-12, err_msg=path)


def test_sgd_cache_keys_are_the_old_ones_and_adamw_differs(tmp_path):
  old = hashlib.sha1(b"resnet_s|fmnist:0,2,3,4,6|2.0|0").hexdigest()[:10]
  assert sources.cache_dir("resnet_s", "fmnist:0,2,3,4,6", 2.0, 0, str(tmp_path)) == \
      os.path.join(str(tmp_path), "sources", f"resnet_s-{old}")
  sgd = sources.cache_dir("vit_s28", "fmnist:0,2,3,4,6", 2.0, 0, str(tmp_path))
  adamw = sources.cache_dir("vit_s28", "fmnist:0,2,3,4,6", 2.0, 0, str(tmp_path), "adamw")
  assert sgd != adamw  # a ViT source pretrained with SGD before the recipe is not reused


def test_source_for_pretrains_a_transformer_with_adamw(tmp_path, monkeypatch):
  calls = []

  def fake(arch, spec, **kw):
    calls.append(kw)
    raise InputError("stop here")  # what source_for passes is all this test needs

  monkeypatch.setattr(sources, "pretrain", fake)
  for arch in ("vit_s28", "resnet_s"):
    with pytest.raises(InputError, match="stop here"):
      sources.source_for(arch, "digits:0,1,2", root=str(tmp_path), progress=False)
  assert [(c["optimizer"], c["lr"]) for c in calls] == [("adamw", 1e-3), ("sgd", 0.05)]


def test_unknown_optimizer_is_one_sentence():
  with pytest.raises(InputError, match="unknown pretraining optimizer 'lamb'; expected one of "
                     "sgd, adamw"):
    sources.pretrain("vgg_s", "digits:0,1", optimizer="lamb")


def test_tiny_adamw_pretraining_learns_and_records_its_recipe(tmp_path):
  log = str(tmp_path / "metrics.jsonl")
  source = sources.pretrain("vit_s28", "digits:0,1", epochs=3, max_train=128, batch_size=32,
                            optimizer="adamw", progress=False, log_path=log)
  assert source.meta["optimizer"] == "adamw" and source.meta["weight_decay"] == 0.05
  with open(log) as f:
    last = json.loads(f.read().splitlines()[-1])
  # two classes: an untrained head's cross-entropy is about ln 2 and chance accuracy 0.5
  assert last["step"] == 12 and last["ce"] < 0.5 * np.log(2)
  assert source.meta["source_test_acc"] > 0.5
