"""The zoo's library (`jtransfer.zoo.members`, `jtransfer.zoo.training`): the lr schedule against
its closed form, horizontal splits, the zoo's members from their text form, random-init
references. The zoo command end to end is in test_model_selection.py."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jtransfer import models
from jtransfer.data import ImageSet
from jtransfer.errors import InputError
from jtransfer.methods import transfer
from jtransfer.train import init_state, make_optimizer, make_train_step, sgd
from jtransfer.zoo import members, training


def test_fit_step_decay_follows_the_papers_shape():
  # loss = w with plain SGD: each step moves w by exactly -lr_t, so w_end = -sum(lr_t).
  params = {"w": jnp.zeros(())}
  opt = make_optimizer(params, [(".*", "all")], {"all": sgd(1.0, momentum=0.0)},
                       injected_lr=True)
  step = make_train_step(lambda p, s, b, r: (p["w"], ({}, s)), opt)
  config = training.TrainConfig(lr=0.5)
  state = init_state(params, {}, opt, 0, config.lr)
  state = training.fit_step_decay(state, step, lambda i: {}, 30, config)
  lrs = [0.5 * 0.1 ** sum(i >= b for b in (7, 14, 21, 28)) for i in range(30)]
  assert int(state.step) == 30
  np.testing.assert_allclose(float(state.params["w"]), -sum(lrs), rtol=1e-6)


def _kept(s, per_class, fraction):
  """Indices kept by horizontal_subset (each image holds its own index as its pixel)."""
  marked = ImageSet(np.arange(len(s)).astype(np.uint8).reshape(-1, 1, 1, 1), s.labels,
                    s.class_names)
  kept = members.horizontal_subset(marked, per_class, fraction, seed=3)
  return kept.images.ravel().tolist(), np.bincount(kept.labels).tolist()


def test_horizontal_subset_is_stratified_and_nested():
  labels = np.repeat(np.arange(3), [10, 20, 7]).astype(np.int32)
  s = ImageSet(np.zeros((37, 1, 1, 1), np.uint8), labels, ("a", "b", "c"))
  full, full_counts = _kept(s, 10, 1.0)
  part, part_counts = _kept(s, 10, 0.3)
  assert full_counts == [10, 10, 7]           # capped at per_class, all of the small class
  assert part_counts == [3, 3, 2]             # round(0.3 * min(10, n_c))
  assert set(part) <= set(full)               # smaller fractions are subsets of larger ones
  assert len(set(full)) == len(full)


def test_zoo_specs_and_bad_flags():
  specs = members.zoo_specs(["vgg_s", "resnet_s_narrow"], [(0, 2, 3, 4, 6), (0, 2, 4)],
                              [1.0, 0.3])
  assert [s.name for s in specs] == [
      "vgg_s-c0_2_3_4_6-f100", "vgg_s-c0_2_3_4_6-f30", "vgg_s-c0_2_4-f100",
      "resnet_s_narrow-c0_2_3_4_6-f100", "resnet_s_narrow-c0_2_3_4_6-f30",
      "resnet_s_narrow-c0_2_4-f100"]
  assert specs[3].arch == "resnet_s" and specs[3].config["stage_widths"] == (16, 32, 64)
  assert len(members.zoo_specs(list(members.FAMILIES), [(0, 2, 3, 4, 6), (0, 2, 4),
                                                            (3, 4, 6)], [1, 0.3, 0.1])) == 15
  with pytest.raises(InputError, match="families"):
    members.zoo_specs(["alexnet_s"], [(0, 1)], [1.0])
  with pytest.raises(InputError, match="fraction"):
    members.zoo_specs(["vgg_s"], [(0, 1)], [1.5])


def test_scratch_member_is_an_untrained_copy_of_the_family():
  variables = models.init_model(models.get_model("resnet_s", 3, stage_widths=(8, 8, 8),
                                                 stem_width=8), jax.random.PRNGKey(5),
                                (12, 12, 1))
  model = models.get_model("resnet_s", 3, stage_widths=(8, 8, 8), stem_width=8)
  spec = members.ZooSpec("resnet_s_narrow", (0, 2, 3), 1.0)
  like = members.Member(spec, "p", transfer.Source(
      "resnet_s", models.model_config(model), jax.tree.map(np.asarray, variables), (12, 12, 1),
      (0.3,), (0.2,), dict(source_test_acc=0.9, class_names=["a", "b", "c"], steps=7,
                           n_train=30, zoo=dict(family="resnet_s_narrow", fraction=1.0))))
  ref = members.scratch_member(like, seed=0)
  assert ref.name == "resnet_s_narrow-scratch" and ref.spec.fraction == 0
  assert (ref.source.mean, ref.source.std, ref.source.config) == ((0.3,), (0.2,),
                                                                   like.source.config)
  assert ref.source.meta["source_test_acc"] is None and ref.source.meta["steps"] == 0
  want = models.init_model(model, jax.random.PRNGKey(0), (12, 12, 1))
  same = jax.tree.map(lambda a, b: np.array_equal(np.asarray(a), b), dict(want),
                      ref.source.variables)
  assert all(jax.tree.leaves(same))                 # the seed's init, untouched
  assert jax.tree.structure(ref.source.variables) == jax.tree.structure(like.source.variables)


def test_parse_zoo_reads_the_text_form_and_refuses_bad_input():
  specs = members.parse_zoo("vgg_s, resnet_s", "0,2,3;4,6", "1,0.5", "fmnist")
  assert [s.name for s in specs] == ["vgg_s-c0_2_3-f100", "vgg_s-c0_2_3-f50", "vgg_s-c4_6-f100",
                                     "resnet_s-c0_2_3-f100", "resnet_s-c0_2_3-f50",
                                     "resnet_s-c4_6-f100"]
  for args, match in ((("vgg_s", "0,x", "1", "fmnist"), "expected integers"),
                      (("vgg_s", "0,1;2", "1", "fmnist"), "at least 2 classes"),
                      (("vgg_s", "0,1", "1", "fmnist:0,1"), "without a class list"),
                      (("nope", "0,1", "1", "fmnist"), "unknown")):
    with pytest.raises(InputError, match=match):
      members.parse_zoo(*args)


def test_cap_per_class_keeps_the_first_images_of_each_class():
  from jtransfer.data.fewshot import cap_per_class
  labels = np.array([1, 0, 1, 0, 0, 2, 1], np.int32)
  s = ImageSet(np.arange(7, dtype=np.uint8).reshape(-1, 1, 1, 1), labels, ("a", "b", "c"))
  assert cap_per_class(s, 2).images.ravel().tolist() == [0, 1, 2, 3, 5]   # split order kept
  assert cap_per_class(s, 0) is s
