"""DELTA's channel attention against a plain numpy loop of channel ablations: default and
configured taps, chunking, and BatchNorm's mode in the probe (the authors' `channel_eval.py`)."""

import jax
import numpy as np
import pytest

from jtransfer import models, surgery
from jtransfer.data.preprocess import normalize
from jtransfer.errors import InputError
from jtransfer.methods import delta, transfer
from delta_helpers import tiny_source, uint8_images


# ----------------------------------------------------------------------------- attention
def _loop_attention(model, params, stats, batches, taps, temperature=5.0):
  """One plain forward per (tap, channel, batch), numpy CE, numpy z-score and softmax."""
  out = {}
  forward = jax.jit(lambda p, x: models.apply_model(model, p, stats, x)[0])
  for tap in taps:
    path = f"{tap}/conv/kernel"
    channels = surgery.flatten(params)[path].shape[-1]

    def ce(p, x, y, w):
      logits = np.asarray(forward(p, x), np.float64)
      logp = logits - np.log(np.sum(np.exp(logits - logits.max(1, keepdims=True)), 1,
                                    keepdims=True)) - logits.max(1, keepdims=True)
      return np.sum(-logp[np.arange(len(y)), y] * w) / np.sum(w)

    inc = np.zeros(channels)
    for x, y, w in batches:
      base = ce(params, x, y, w)
      for j in range(channels):
        def zero(p, v, j=j):
          if p != path:
            return v
          v = np.array(v)
          v[..., j] = 0.0
          return v
        inc[j] += (ce(surgery.map_with_path(zero, params), x, y, w) - base) / len(batches)
    z = (inc - inc.mean()) / inc.std()
    e = np.exp(z / temperature)
    out[tap] = e / e.sum()
  return out


@pytest.mark.parametrize("arch", ["resnet_s", "vgg_s"])
def test_attention_weights_match_plain_loop(arch):
  source = tiny_source(arch)
  model = source.model   # the 2-class target model; the source variables hold its params
  params, stats = source.variables["params"], source.variables.get("batch_stats", {})
  taps = delta.default_taps(arch, source.config)
  images, labels = uint8_images(7), np.array([0, 1, 1, 0, 1, 0, 0])
  config = delta.Config(att_batch_size=4, att_batches=2, att_max_images=12)  # a padded batch
  batches = delta._attention_batches(images, labels, source.mean, source.std, config)
  assert [float(w.sum()) for _, _, w in batches] == [4.0, 3.0]
  got = delta.attention_weights(model, params, stats, batches, taps, max_images=12)
  want = _loop_attention(model, params, stats, batches, taps)
  assert set(got) == set(taps)
  for tap in taps:
    np.testing.assert_allclose(got[tap], want[tap], rtol=2e-4, atol=1e-6, err_msg=tap)


def test_default_taps():
  assert delta.default_taps("resnet_s", models.model_config(models.get_model("resnet_s", 5))) \
      == ("stage1/block1/conv2", "stage2/block1/conv2", "stage3/block1/conv2")
  assert delta.default_taps("vgg_s", models.model_config(models.get_model("vgg_s", 5))) \
      == ("conv1_2", "conv2_2", "conv3_2")
  assert delta.default_taps("resnet50", models.model_config(models.get_model("resnet50", 5))) \
      == ("stage1/block2/conv3", "stage2/block3/conv3", "stage3/block5/conv3",
          "stage4/block2/conv3")
  with pytest.raises(InputError):
    delta.default_taps("alexnet", {"widths": [1]})


def test_configured_taps_are_checked():
  source = tiny_source()
  config = delta.Config(taps={"resnet_s": ("stage2/block0/conv1",)})
  setup = delta.build_setup(source, 2, 10, "fm", config)
  p, _ = setup.init(0, uint8_images(4), np.array([0, 1, 0, 1]))
  assert list(p["frozen"]["source"]["maps"]) == ["stage2/block0/conv1"]
  config = delta.Config(taps={"resnet_s": ("stage9/block0/conv1",)})
  with pytest.raises(InputError, match="stage9"):
    delta.build_setup(source, 2, 10, "fm", config)


# ----------------------------------------------------------------------------- attention BN mode
def _loop_attention_batch_stats(model, params, stats, batches, taps, temperature=5.0):
  """`_loop_attention` with every forward (base and ablated) in train mode: BN normalises with
  the batch's own statistics."""
  out = {}
  forward = jax.jit(lambda p, x: models.apply_model(model, p, stats, x, train=True)[0])
  for tap in taps:
    path = f"{tap}/conv/kernel"
    channels = surgery.flatten(params)[path].shape[-1]

    def ce(p, x, y):
      logp = np.asarray(jax.nn.log_softmax(forward(p, x)), np.float64)
      return -np.mean(logp[np.arange(len(y)), y])

    inc = np.zeros(channels)
    for x, y, _ in batches:
      base = ce(params, x, y)
      for j in range(channels):
        kernel = np.array(surgery.flatten(params)[path])
        kernel[..., j] = 0.0
        ablated = surgery.map_with_path(lambda q, v: kernel if q == path else v, params)
        inc[j] += (ce(ablated, x, y) - base) / len(batches)
    z = (inc - inc.mean()) / inc.std()
    e = np.exp(z / temperature)
    out[tap] = e / e.sum()
  return out


def _attention(mode, images, labels, **changes):
  source = tiny_source()
  model = transfer.target_model(source, 2)
  config = delta.Config(att_bn=mode, att_batch_size=4, att_batches=2, att_head_min_steps=5,
                        att_max_images=16, **changes)
  return delta.AttentionComputer(source, model, delta.default_taps("resnet_s", source.config),
                                 config)(images, labels)


def test_attention_bn_mode_is_honoured():
  import dataclasses
  from jtransfer.train import evaluate
  images, labels = uint8_images(7, seed=3), np.array([0, 1, 1, 0, 1, 0, 0])
  source = tiny_source()
  model = transfer.target_model(source, 2)
  taps = delta.default_taps("resnet_s", source.config)
  config = delta.Config(att_bn="train", att_batch_size=4, att_batches=2, att_head_min_steps=5,
                        att_max_images=16)
  got = {mode: _attention(mode, images, labels) for mode in delta.ATT_BN_MODES}
  for a, b in (("eval", "train"), ("eval", "authors"), ("authors", "train")):
    assert any(not np.allclose(got[a][t], got[b][t], rtol=1e-3) for t in taps), (a, b)
  # 'train': the probe in train mode, then every ablation forward with batch statistics, on
  # unpadded batches (4 + 3 images): a plain loop over channels gives the same weights.
  params, stats = transfer.init_target(source, model, 0)
  head, probe_stats = delta.train_probe_bn_train(model, params, stats, images, labels,
                                                 source.mean, source.std, config)
  batches = delta._attention_batches(images, labels, source.mean, source.std, config, pad=False)
  assert [len(y) for _, y, _ in batches] == [4, 3]
  want = _loop_attention_batch_stats(model, dict(params, head=head), stats, batches, taps)
  for t in taps:
    np.testing.assert_allclose(got["train"][t], want[t], rtol=2e-4, atol=1e-6, err_msg=t)
  # 'authors': the same probe, then eval-mode ablation with the running statistics the probe's
  # train-mode forwards left (padded batches: eval mode ignores the zero-weight copies).
  padded = delta._attention_batches(images, labels, source.mean, source.std, config)
  want = _loop_attention(model, dict(params, head=head), probe_stats, padded, taps)
  for t in taps:
    np.testing.assert_allclose(got["authors"][t], want[t], rtol=2e-4, atol=1e-6, err_msg=t)
  # 'eval': the source's running statistics, as before the option existed.
  feats = evaluate.predict_logits(delta._features_fn(model, source.mean, source.std), params,
                                  stats, images)
  eval_head = delta.train_probe(params["head"], feats, labels,
                                dataclasses.replace(config, att_bn="eval"))
  want = _loop_attention(model, dict(params, head=eval_head), stats, padded, taps)
  for t in taps:
    np.testing.assert_allclose(got["eval"][t], want[t], rtol=2e-4, atol=1e-6, err_msg=t)
  with pytest.raises(InputError, match="att_bn"):
    delta.Config(att_bn="running").validate()


def _probe_inputs(seed):
  """(source, 2-class target model, its params and BN stats, 6 images, balanced labels)."""
  source = tiny_source()
  model = transfer.target_model(source, 2)
  params, stats = transfer.init_target(source, model, 0)
  return source, model, params, stats, uint8_images(6, seed=seed), np.array([0, 1] * 3)


def test_authors_probe_moves_running_stats_by_torch_momentum():
  # One probe step over all 6 images: the stem's running mean becomes 0.9 * source mean + 0.1 *
  # the batch mean of the stem's raw conv output (torch momentum 0.1), which the ablation then
  # uses in eval mode.
  source, model, params, stats, images, labels = _probe_inputs(seed=4)
  config = delta.Config(att_batch_size=6, att_head_epochs=1, att_head_min_steps=1)
  _, new_stats = delta.train_probe_bn_train(model, params, stats, images, labels, source.mean,
                                            source.std, config)
  _, _, taps = models.apply_model(model, params, stats,
                                  normalize(images, source.mean, source.std), taps=("stem",))
  raw = np.asarray(taps["stem"], np.float64)
  want = 0.9 * np.asarray(stats["stem"]["bn"]["mean"]) + 0.1 * raw.mean(axis=(0, 1, 2))
  np.testing.assert_allclose(new_stats["stem"]["bn"]["mean"], want, rtol=1e-5, atol=1e-6)
  want_var = 0.9 * np.asarray(stats["stem"]["bn"]["var"]) + 0.1 * raw.var(axis=(0, 1, 2))
  np.testing.assert_allclose(new_stats["stem"]["bn"]["var"], want_var, rtol=1e-4, atol=1e-6)


def test_authors_probe_closed_form_equals_the_step_loop():
  # Every probe batch holds all 6 images: 40 identical steps; the closed form (2 forwards)
  # must give the loop's head and running statistics.
  import dataclasses
  source, model, params, stats, images, labels = _probe_inputs(seed=5)
  config = delta.Config(att_batch_size=8, att_head_epochs=1, att_head_min_steps=40)
  got = delta.train_probe_bn_train(model, params, stats, images, labels, source.mean,
                                   source.std, config)
  want = delta.train_probe_bn_train(model, params, stats, images, labels, source.mean,
                                    source.std, dataclasses.replace(config, att_probe_loop=True))
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5)
  # The statistics did move (40 steps of momentum 0.9: within 1.5% of the batch statistics).
  assert not np.allclose(got[1]["stem"]["bn"]["mean"], stats["stem"]["bn"]["mean"])


def test_channel_chunks_are_even_and_bounded():
  assert delta.channel_chunk(256, 20, 4096) == 128      # room for 204: two calls of 128
  assert delta.channel_chunk(64, 20, 4096) == 64
  assert delta.channel_chunk(512, 20, 4096) == 171      # 3 calls, 1 padded row
  assert delta.channel_chunk(10, 1000, 100) == 1        # at least one channel per call
  # the memory bound: 4 images of a 3.2 MB map (resnet50's stage1 tap at 224 px) in 512 MB
  # leave room for 160 images, 40 channels per call
  assert delta.channel_chunk(256, 4, 4096, 56 * 56 * 256 * 4, 512.0) == 37  # 7 calls of 37
  assert delta.channel_chunk(256, 4, 4096, 56 * 56 * 256 * 4, 1e9) == 256
  for c, b, m in [(960, 32, 4096), (7, 3, 10), (2048, 64, 4096)]:
    k = delta.channel_chunk(c, b, m)
    assert k * b <= max(m, b) and -(-c // k) * k - c < k

