"""Path-string surgery: selection, labels, split/combine, merge with readable diffs."""
import numpy as np
import pytest

from jtransfer import surgery
from jtransfer.errors import InputError

TREE = {"stem": {"conv": {"kernel": np.ones((3, 3, 1, 4))}, "bn": {"scale": np.ones(4)}},
        "stage1/block0": {"conv1": {"conv": {"kernel": np.ones((3, 3, 4, 4))}}},
        "head": {"kernel": np.ones((4, 2)), "bias": np.zeros(2)}}


def test_paths_keep_keys_with_slashes():
  assert "stage1/block0/conv1/conv/kernel" in surgery.paths(TREE)
  a, b = surgery.split(TREE, surgery.mask(TREE, ["stage1/.*"]))
  assert list(a) == ["stage1/block0"]
  back = surgery.combine(a, b)
  assert surgery.paths(back) and sorted(surgery.paths(back)) == sorted(surgery.paths(TREE))


def test_select_unmatched_rule_is_named():
  assert surgery.select(TREE, ["head/.*"]) == ["head/kernel", "head/bias"]
  with pytest.raises(InputError, match="rule 'heda/.*' matches no parameter path"):
    surgery.select(TREE, ["heda/.*"])
  with pytest.raises(InputError, match="not a valid regex"):
    surgery.select(TREE, ["(("])


def test_label_tree_first_match_and_errors():
  labels = surgery.label_tree(TREE, [("head/.*", "head"), (".*", "frozen")])
  assert labels["head"]["bias"] == "head" and labels["stem"]["bn"]["scale"] == "frozen"
  with pytest.raises(InputError, match="unlabelled.*stem/conv/kernel"):
    surgery.label_tree(TREE, [("head/.*", "head")])
  with pytest.raises(InputError, match=r"\['fc/.*'\] match no parameter"):
    surgery.label_tree(TREE, [("head/.*", "h"), (".*", "f"), ("fc/.*", "x")])


def test_combine_rejects_overlap():
  with pytest.raises(InputError, match="more than one tree"):
    surgery.combine(TREE, {"head": {"bias": np.zeros(2)}})


def test_merge_params_loads_and_keeps_dont_load():
  loaded = {k: v for k, v in TREE.items()}
  loaded = surgery.map_with_path(lambda p, v: v * 2, loaded)
  loaded["head"] = {"kernel": np.ones((4, 9)), "bias": np.zeros(9)}  # another class count
  merged = surgery.merge_params(TREE, loaded, dont_load=["head/.*"])
  assert merged["stem"]["bn"]["scale"][0] == 2
  assert merged["head"]["kernel"].shape == (4, 2) and merged["head"]["kernel"][0, 0] == 1


def test_merge_params_lists_every_problem():
  loaded = surgery.map_with_path(lambda p, v: v, TREE)
  del loaded["stem"]["bn"]
  loaded["extra"] = {"w": np.ones(3)}
  loaded["head"] = {"kernel": np.ones((4, 9)), "bias": np.zeros(2)}
  with pytest.raises(InputError) as e:
    surgery.merge_params(TREE, loaded)
  msg = str(e.value)
  assert "missing in checkpoint: stem/bn/scale" in msg
  assert "not in model: extra/w" in msg
  assert "shape: head/kernel model (4, 2) vs checkpoint (4, 9)" in msg


def test_restrict_and_count_and_conv_units():
  small = surgery.restrict_to(TREE, {"head": {"kernel": 0, "bias": 0}})
  assert surgery.paths(small) == ["head/kernel", "head/bias"]
  assert surgery.count(TREE) == 9 * 4 + 4 + 9 * 16 + 8 + 2
  assert surgery.conv_units(TREE) == ["stem", "stage1/block0/conv1"]


def test_filter_distances_by_hand():
  """Per output channel, the L2 norm of the kernel's change; units only in `start` count."""
  start = {"a": {"conv": {"kernel": np.zeros((1, 1, 2, 2))}},
           "b": {"conv": {"kernel": np.ones((3, 3, 1, 1))}}, "head": {"kernel": np.zeros((2, 2))}}
  moved = {"a": {"conv": {"kernel": np.array([[[[3.0, 0.0], [4.0, 1.0]]]])}},
           "b": {"conv": {"kernel": np.ones((3, 3, 1, 1))}}, "head": {"kernel": np.ones((2, 2))}}
  d = surgery.filter_distances(moved, start)
  np.testing.assert_allclose(d["a"], [5.0, 1.0])   # channel 0: (3, 4); channel 1: (0, 1)
  np.testing.assert_allclose(d["b"], [0.0])
  assert surgery.mean_filter_distance(moved, start) == pytest.approx(2.0)  # (5 + 1 + 0) / 3
