"""Tests for jtransfer.methods.retrieval (MAC, ranking, revisitop AP/mAP, ground-truth files)."""
import json
import os
import pickle

import jax
import numpy as np
import pytest

from jtransfer.errors import InputError
from jtransfer.methods import retrieval as R


def _loop_ap(ranked, ok, junk):
  """Independent loop transcription of revisitop's compute_map/compute_ap for one query."""
  ranked = list(ranked)
  pos = [i for i, x in enumerate(ranked) if x in set(ok)]
  jpos = [i for i, x in enumerate(ranked) if x in set(junk)]
  shifted = [p - sum(1 for q in jpos if q < p) for p in pos]
  ap = 0.0
  for j, rank in enumerate(shifted):
    p0 = 1.0 if rank == 0 else j / rank
    p1 = (j + 1) / (rank + 1)
    ap += (p0 + p1) / (2.0 * len(ok))
  return ap


# ---------------------------------------------------------------- MAC and ranking


def test_mac_hand_made_map():
  fm = np.zeros((2, 2, 2, 2), np.float32)
  fm[0, :, :, 0] = [[1, 2], [3, 0]]  # max 3
  fm[0, :, :, 1] = [[0, 4], [0, 0]]  # max 4 -> (3, 4) / 5
  # image 1 is all zeros: the guard must give a zero vector, not NaN
  out = np.asarray(R.mac_descriptor(fm))
  np.testing.assert_allclose(out, [[0.6, 0.8], [0.0, 0.0]], atol=1e-7)
  np.testing.assert_allclose(np.asarray(jax.jit(R.mac_descriptor)(fm)), out, atol=1e-7)


def _one_conv_vgg():
  """vgg_s with one 2-channel 3x3 conv unit: channel 0 copies the input, channel 1 negates it;
  then a 2x2 max pool (the 'last_conv' tap) and no dense layer."""
  from jtransfer import models
  model = models.get_model("vgg_s", 2, conv_widths=((2,),), dense_widths=())
  kernel = np.zeros((3, 3, 1, 2), np.float32)
  kernel[1, 1, 0] = [1.0, -1.0]
  params = {"conv1_1": {"conv": {"kernel": kernel, "bias": np.zeros(2, np.float32)}},
            "head": {"kernel": np.zeros((18, 2), np.float32), "bias": np.zeros(2, np.float32)}}
  return model, params


def test_mac_from_model_reads_the_last_conv_output_not_the_pooled_map():
  from jtransfer.methods import retrieval_run
  model, params = _one_conv_vgg()
  x = np.zeros((1, 7, 7, 1), np.float32)
  x[0, 6, 6, 0] = 5.0    # last row and column: the 2x2 pool of the 7x7 map (-> 3x3) drops it
  x[0, 0, 0, 0] = -2.0   # channel 1 = ReLU(-x) = 2 here, inside the pooled area
  # Last conv output = (ReLU(x), ReLU(-x)): channel maxima (5, 2); pooled map: (0, 2).
  conv = np.asarray(R.mac_from_model(model, params, {}, x))
  np.testing.assert_allclose(conv, [[5 / np.sqrt(29), 2 / np.sqrt(29)]], rtol=1e-6)
  np.testing.assert_allclose(np.asarray(R.mac_from_model(model, params, {}, x, tap="pooled")),
                             [[0.0, 1.0]], atol=1e-7)
  # The experiment's jitted descriptor honours the same choice (mean 2/255, std 1/255: the
  # normalised image is pixels - 2, i.e. x again).
  images = np.full((1, 7, 7, 1), 2, np.uint8)
  images[0, 6, 6, 0], images[0, 0, 0, 0] = 7, 0
  for tap, want in (("conv", [[5, 2]]), ("pooled", [[0, 2]])):
    fn = retrieval_run.mac_fn(model, (2 / 255,), (1 / 255,), tap)
    got = np.asarray(fn(params, {}, images))
    np.testing.assert_allclose(got, np.asarray(want) / np.linalg.norm(want), rtol=1e-5, atol=1e-6)
  with pytest.raises(InputError, match="tap"):
    R.mac_from_model(model, params, {}, x, tap="fc7")
  with pytest.raises(InputError, match="tap"):
    retrieval_run.mac_fn(model, (0.0,), (1.0,), "fc7")


def test_mac_rejects_wrong_rank():
  with pytest.raises(InputError):
    R.mac_descriptor(np.zeros((2, 3, 4)))


def test_rank_order_and_ties():
  q = np.array([[1.0, 0.0]], np.float32)
  db = np.array([[0, 1], [1, 0], [0.6, 0.8], [-1, 0], [1, 0]], np.float32)
  # sims = [0, 1, 0.6, -1, 1]; the tie between 1 and 4 goes to the lower index
  np.testing.assert_array_equal(R.rank_database(q, db), [[1, 4, 2, 0, 3]])
  np.testing.assert_array_equal(R.rank_database(q, db, top_k=2), [[1, 4]])


def test_rank_batched_matches_numpy():
  rng = np.random.default_rng(0)
  q = np.asarray(R.l2_normalize(rng.normal(size=(37, 16)).astype(np.float32)))
  db = np.asarray(R.l2_normalize(rng.normal(size=(50, 16)).astype(np.float32)))
  want = np.argsort(-(q @ db.T), axis=1, kind="stable")
  np.testing.assert_array_equal(R.rank_database(q, db, batch_size=8), want)  # 37 = 4*8 + 5 (pad)
  np.testing.assert_array_equal(R.rank_database(q, db, batch_size=8, top_k=7), want[:, :7])


def test_rank_bad_input():
  with pytest.raises(InputError):
    R.rank_database(np.zeros((2, 3)), np.zeros((4, 5)))
  with pytest.raises(InputError):
    R.rank_database(np.zeros((2, 3)), np.zeros((4, 3)), top_k=5)


# ---------------------------------------------------------------- AP


def test_ap_no_junk_hand():
  ranked = [3, 0, 4, 1, 2]
  # positives 0 and 1 at 0-based ranks r = 1, 3; P = 2
  # trapezoid: j=0: (0/1 + 1/2)/2 = 1/4; j=1: (1/3 + 2/4)/2 = 5/12; (1/4 + 5/12)/2 = 1/3
  assert R.average_precision_trapezoid(ranked, [0, 1]) == pytest.approx(1 / 3)
  # plain: (1/2 + 2/4)/2 = 1/2
  assert R.average_precision_plain(ranked, [0, 1]) == pytest.approx(0.5)


def test_ap_junk_is_skipped_hand():
  ranked = [3, 0, 4, 1, 2]
  # junk 3 removed -> [0, 4, 1, 2]; r = 0, 2
  # trapezoid: j=0: (1 + 1)/2 = 1; j=1: (1/2 + 2/3)/2 = 7/12; (19/12)/2 = 19/24
  assert R.average_precision_trapezoid(ranked, [0, 1], junk=[3]) == pytest.approx(19 / 24)
  # plain: (1 + 2/3)/2 = 5/6
  assert R.average_precision_plain(ranked, [0, 1], junk=[3]) == pytest.approx(5 / 6)
  # junk ranked after every positive changes nothing: [0, 3, 1] -> r = 0, 1 -> AP = 1
  assert R.average_precision_trapezoid([0, 3, 1], [0, 1], junk=[3]) == pytest.approx(1.0)


def test_ap_missing_positive_counts_in_denominator():
  # truncated list [0, 5, 1]; positive 9 never retrieved; r = 0, 2; P = 3
  # trapezoid: (1 + 7/12)/3 = 19/36; plain: (1 + 2/3)/3 = 5/9
  assert R.average_precision_trapezoid([0, 5, 1], [0, 1, 9]) == pytest.approx(19 / 36)
  assert R.average_precision_plain([0, 5, 1], [0, 1, 9]) == pytest.approx(5 / 9)


def test_ap_perfect_and_empty():
  assert R.average_precision_trapezoid([2, 1, 0, 3], [1, 2]) == pytest.approx(1.0)
  assert R.average_precision_plain([2, 1, 0, 3], [1, 2]) == pytest.approx(1.0)
  assert np.isnan(R.average_precision_trapezoid([0, 1], []))


def test_ap_matches_loop_reference_random():
  rng = np.random.default_rng(1)
  for _ in range(50):
    ranked = rng.permutation(30)
    ids = rng.permutation(30)
    ok, junk = ids[:rng.integers(1, 8)], ids[8:8 + rng.integers(0, 6)]
    got = R.average_precision_trapezoid(ranked, ok, junk)
    assert got == pytest.approx(_loop_ap(ranked, ok, junk), abs=1e-12)


# ---------------------------------------------------------------- mAP and setups

# database of 8 images; query 0: easy [1, 4], hard [2], junk [0]; query 1: easy [7] only.
_GND = [{"easy": [1, 4], "hard": [2], "junk": [0]},
        {"easy": [7], "hard": [], "junk": []}]
_RANKS = np.array([[0, 2, 5, 1, 3, 4, 6, 7],
                   [7, 0, 1, 2, 3, 4, 5, 6]])


def test_setup_selection():
  assert R.revisited_setup(_GND, "easy")[0] == {"ok": [1, 4], "junk": [0, 2]}
  assert R.revisited_setup(_GND, "medium")[0] == {"ok": [1, 4, 2], "junk": [0]}
  assert R.revisited_setup(_GND, "hard")[0] == {"ok": [2], "junk": [0, 1, 4]}
  with pytest.raises(InputError):
    R.revisited_setup(_GND, "extreme")


def test_easy_medium_hard_hand():
  res = R.evaluate_revisited(_RANKS, _GND, kappas=(1, 5, 10))
  # Easy, q0: junk {0, 2} removed -> [5, 1, 3, 4, 6, 7]; r = 1, 3 -> (1/4 + 5/12)/2 = 1/3
  # q1: 7 first -> 1.  mAP = (1/3 + 1)/2 = 2/3
  np.testing.assert_allclose(res["easy"].aps, [1 / 3, 1.0])
  assert res["easy"].map == pytest.approx(2 / 3)
  # Medium, q0: junk {0} removed -> [2, 5, 1, 3, 4, 6, 7]; r = 0, 2, 4
  # j=0: 1; j=1: (1/2 + 2/3)/2 = 7/12; j=2: (2/4 + 3/5)/2 = 11/20; sum 32/15; /3 = 32/45
  np.testing.assert_allclose(res["medium"].aps, [32 / 45, 1.0])
  assert res["medium"].map == pytest.approx((32 / 45 + 1) / 2)
  # Hard, q0: junk {0, 1, 4} removed -> [2, ...]; r = 0 -> 1. q1 has no hard positive: skipped
  assert res["hard"].aps[0] == pytest.approx(1.0) and np.isnan(res["hard"].aps[1])
  assert res["hard"].map == pytest.approx(1.0) and res["hard"].num_skipped == 1
  assert res["easy"].num_skipped == 0
  # precision@k, Medium q0: 1-based ranks [1, 3, 5]; k capped at the last positive's rank (5):
  # P@1 = 1/1, P@5 = 3/5, P@10 -> k = min(5, 10) = 5 -> 3/5 (revisitop's cap)
  np.testing.assert_allclose(res["medium"].prs[0], [1.0, 0.6, 0.6])


def test_map_all_skipped_and_bad_input():
  res = R.compute_map(_RANKS, [{"ok": []}, {"ok": [], "junk": [1]}])
  assert np.isnan(res.map) and res.num_skipped == 2
  with pytest.raises(InputError):
    R.compute_map(_RANKS, [{"ok": [1]}])  # one gnd entry for two ranking rows
  with pytest.raises(InputError):
    R.compute_map(_RANKS, R.revisited_setup(_GND, "easy"), ap_kind="11-point")


def test_map_plain_kind():
  res = R.compute_map(_RANKS, R.revisited_setup(_GND, "easy"), ap_kind="plain")
  # q0 Easy: r = 1, 3 -> (1/2 + 2/4)/2 = 1/2; q1: 1
  np.testing.assert_allclose(res.aps, [0.5, 1.0])


# ---------------------------------------------------------------- ground-truth files


def _gnd_data():
  return {"imlist": ["a", "b", "c", "d"], "qimlist": ["q0", "q1"],
          "gnd": [{"bbx": np.array([1.0, 2.0, 30.5, 40.0]), "easy": np.array([0, 2]),
                   "hard": np.array([1]), "junk": np.array([], dtype=np.int64)},
                  {"bbx": [0.0, 0.0, 5.0, 5.0], "easy": [3], "hard": [], "junk": [0, 1]}]}


_WANT = {"imlist": ["a", "b", "c", "d"], "qimlist": ["q0", "q1"],
         "gnd": [{"bbx": [1.0, 2.0, 30.5, 40.0], "easy": [0, 2], "hard": [1], "junk": []},
                 {"bbx": [0.0, 0.0, 5.0, 5.0], "easy": [3], "hard": [], "junk": [0, 1]}]}


class _Evil:

  def __reduce__(self):
    return (os.system, ("echo pwned",))


class _EvilFile:

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def test_pickle_refused_by_default(tmp_path):
  path = tmp_path / "gnd_roxford5k.pkl"
  path.write_bytes(pickle.dumps(_gnd_data()))
  with pytest.raises(InputError, match="allow_pickle=True"):
    R.load_gnd_pickle(path)
  with pytest.raises(InputError, match="allow_pickle=True"):
    R.load_gnd(path)
  with pytest.raises(InputError, match="allow_pickle=True"):
    R.gnd_pickle_to_json(path, tmp_path / "gnd.json")
  assert not (tmp_path / "gnd.json").exists()


@pytest.mark.parametrize("protocol", [0, 2, 4, 5])
def test_pickle_allowed_reads_numpy(tmp_path, protocol):
  path = tmp_path / "gnd.pkl"
  path.write_bytes(pickle.dumps(_gnd_data(), protocol=protocol))
  assert R.load_gnd_pickle(path, allow_pickle=True) == _WANT


def test_malicious_pickle_refused_even_when_allowed(tmp_path, capfd):
  path = tmp_path / "evil.pkl"
  path.write_bytes(pickle.dumps(_Evil()))
  with pytest.raises(InputError, match="not allowed"):
    R.load_gnd_pickle(path, allow_pickle=True)
  assert "pwned" not in capfd.readouterr().out
  # hidden inside otherwise valid ground truth, with a side effect we can check for
  marker = tmp_path / "marker"
  data = _gnd_data()
  data["gnd"][0]["bbx"] = _EvilFile(marker)
  path.write_bytes(pickle.dumps(data, protocol=2))
  with pytest.raises(InputError):
    R.gnd_pickle_to_json(path, tmp_path / "out.json", allow_pickle=True)
  assert not marker.exists() and not (tmp_path / "out.json").exists()


def test_json_round_trip(tmp_path):
  pkl, js = tmp_path / "gnd_rparis6k.pkl", tmp_path / "gnd_rparis6k.json"
  pkl.write_bytes(pickle.dumps(_gnd_data()))
  written = R.gnd_pickle_to_json(pkl, js, allow_pickle=True)
  assert written == _WANT
  assert R.load_gnd_json(js) == _WANT
  assert R.load_gnd(js) == _WANT
  assert json.loads(js.read_text()) == _WANT
  R.save_gnd_json(_WANT, tmp_path / "again.json")
  assert R.load_gnd_json(tmp_path / "again.json") == _WANT


def test_json_bad_structure(tmp_path):
  path = tmp_path / "bad.json"
  path.write_text(json.dumps({"imlist": ["a"], "qimlist": ["q"],
                              "gnd": [{"easy": [5], "hard": [], "junk": []}]}))
  with pytest.raises(InputError, match="outside"):
    R.load_gnd_json(path)
  with pytest.raises(InputError):
    R.load_gnd_json(tmp_path / "missing.json")


# ---------------------------------------------------------------- embedded tasks


def test_labels_to_gnd():
  gnd = R.labels_to_gnd(np.array([0, 1]), np.array([1, 0, 0, 1, 2]))
  assert gnd == [{"easy": [1, 2], "hard": [], "junk": []},
                 {"easy": [0, 3], "hard": [], "junk": []}]
  gnd = R.labels_to_gnd(np.array([0, 1]), np.array([1, 0, 0, 1, 2]), np.array([2, -1]))
  assert gnd[0] == {"easy": [1], "hard": [], "junk": [2]}


def test_embedded_task_end_to_end():
  # two well separated classes; queries are the database itself, own entry is junk
  feats = np.array([[1, 0.2], [1, 0.05], [0.2, 1], [0.05, 1]], np.float32)  # >= 0, like ReLU maps
  labels = np.array([0, 0, 1, 1])
  ranks, gnd = R.embedded_retrieval_task(feats, labels, feats, labels,
                                         query_db_index=np.arange(4))
  assert ranks.shape == (4, 4) and np.all(ranks[:, 0] == np.arange(4))
  res = R.evaluate_revisited(ranks, gnd, setups=("easy", "hard"), ap_kind="plain")
  assert res["easy"].map == pytest.approx(1.0)
  assert res["hard"].num_skipped == 4
  maps = np.zeros((4, 3, 3, 2), np.float32)  # feature maps go through MAC
  maps[:, 1, 1] = feats
  ranks_m, _ = R.embedded_retrieval_task(maps, labels, maps, labels)
  np.testing.assert_array_equal(ranks_m, ranks)
