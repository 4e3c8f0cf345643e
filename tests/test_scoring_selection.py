"""The selection study's scores (`jtransfer.scoring.score_outputs`, `source_scores`) against
direct jtransfer.methods.selection calls and a forward pass written out by hand."""
import jax
import numpy as np
import pytest
import scipy.special
from model_helpers import small_variables

from jtransfer import models, scoring
from jtransfer.data import normalize
from jtransfer.errors import InputError
from jtransfer.methods import selection, sfda, transfer, transrate
from jtransfer.zoo.training import Compiled


# models.init_model without compiling Flax's initialisers (seconds per config).
_fast_init = small_variables


def test_score_outputs_equal_direct_selection_calls():
  rng = np.random.default_rng(0)
  labels = np.repeat(np.arange(4), 6)
  maps = np.maximum(rng.normal(size=(24, 3, 3, 5)) * 2, 0).astype(np.float32)
  feats = rng.normal(size=(24, 7))
  logits = rng.normal(size=(24, 3)) * 3
  got = scoring.score_outputs(labels, maps, feats, logits)
  want = selection.feature_map_metrics(maps, labels)
  want.update({"LogME": selection.logme(feats, labels), "H-score": selection.h_score(feats, labels),
               "LEEP": selection.leep(scipy.special.softmax(logits, axis=1), labels),
               "NCE": selection.nce(np.argmax(logits, axis=1), labels),
               "TransRate": transrate.transrate(feats, labels), "SFDA": sfda.sfda(feats, labels)})
  assert set(got) == set(want)
  for k in want:
    np.testing.assert_allclose(got[k], want[k], rtol=1e-6, err_msg=k)
  # Without features / logits only S1..S6 are computed.
  assert set(scoring.score_outputs(labels, maps)) == set(selection.METRIC_NAMES)


def _random_source(arch="resnet_s", classes=3, **config):
  model = models.get_model(arch, classes, **config)
  variables = jax.tree.map(np.asarray, _fast_init(model, None, (28, 28, 1)))
  return transfer.Source(arch, models.model_config(model), variables, (28, 28, 1), (0.3,), (0.4,),
                         {"source_test_acc": 0.5})


def test_source_scores_equal_a_hand_written_forward_and_selection_calls():
  source = _random_source(stage_widths=(8, 8, 16), stem_width=8)
  rng = np.random.default_rng(1)
  images = rng.integers(0, 256, size=(12, 28, 28, 1), dtype=np.uint8)
  labels = np.repeat(np.arange(3), 4).astype(np.int32)
  got, outputs = scoring.source_scores(source, images, labels, Compiled())
  v = source.variables
  logits, _, taps = models.apply_model(source.model, v["params"], v["batch_stats"],
                                       normalize(images, source.mean, source.std),
                                       taps=("last_conv", "features"))
  # For a ResNet the last conv output is the 'last_conv' tap.
  conv = outputs[selection.LAST_CONV_OUTPUT]
  np.testing.assert_allclose(conv, taps["last_conv"], rtol=1e-5, atol=1e-6)
  assert conv.shape == (12, 4, 4, 16) and outputs["logits"].shape == (12, 3)
  want = selection.feature_map_metrics(np.asarray(taps["last_conv"]), labels)
  want["LogME"] = selection.logme(np.asarray(taps["features"]), labels, variant="published")
  want["LEEP"] = selection.leep(scipy.special.softmax(np.asarray(logits, np.float64), 1), labels)
  for k, w in want.items():
    np.testing.assert_allclose(got[k], w, rtol=1e-3, atol=1e-6, err_msg=k)


def test_vgg_source_scores_read_the_chosen_map_and_features():
  source = _random_source("vgg_s", conv_widths=((4,), (6,)), dense_widths=(5, 5))
  rng = np.random.default_rng(2)
  images = rng.integers(0, 256, size=(12, 28, 28, 1), dtype=np.uint8)
  labels = np.repeat(np.arange(3), 4).astype(np.int32)
  v = source.variables
  _, _, taps = models.apply_model(source.model, v["params"], {},
                                  normalize(images, source.mean, source.std),
                                  taps=("conv2_1", "last_conv", "features"))
  conv = np.maximum(np.asarray(taps["conv2_1"]), 0.0)         # last conv, ReLU, no pool: 14x14
  pooled = np.asarray(taps["last_conv"])                       # after the last 2x2 max pool
  assert conv.shape == (12, 14, 14, 6) and pooled.shape == (12, 7, 7, 6)
  compiled = Compiled()
  # Defaults: S1..S6 on the last conv output; LogME (published) / H-score on what the target
  # keeps, the flattened pooled map (the target drops fc6, fc7).
  got, outputs = scoring.source_scores(source, images, labels, compiled)
  want = selection.feature_map_metrics(conv, labels)
  flat = pooled.reshape(12, -1)
  want.update(LogME=selection.logme(flat, labels, variant="published"),
              **{"H-score": selection.h_score(flat, labels)})
  for k, w in want.items():
    np.testing.assert_allclose(got[k], w, rtol=1e-3, atol=1e-6, err_msg=k)
  np.testing.assert_allclose(outputs["features"], flat, rtol=1e-5, atol=1e-6)
  # The old choices: the pooled map, the source's fc7, exact LogME.
  got, outputs = scoring.source_scores(source, images, labels, compiled, map_tap="pooled",
                                  selection_features="source", logme_variant="exact")
  fc7 = np.asarray(taps["features"])
  want = selection.feature_map_metrics(pooled, labels)
  want.update(LogME=selection.logme(fc7, labels), **{"H-score": selection.h_score(fc7, labels)})
  for k, w in want.items():
    np.testing.assert_allclose(got[k], w, rtol=1e-3, atol=1e-6, err_msg=k)
  assert set(outputs) == {"last_conv", "features", "logits"}
  with pytest.raises(InputError, match="selection features"):
    scoring.source_scores(source, images, labels, compiled, selection_features="fc6")
