"""Smoke tests: each CWL experiment module's main() end to end with tiny flags."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from experiments import cwl_kronecker, cwl_pruning, cwl_retrieval, cwl_tables
from jtransfer.errors import InputError
from jtransfer.methods import retrieval_run, transfer
from jtransfer.study import flags as study_flags
from jtransfer.study import publish


@pytest.fixture(scope="module")
def source_dir(tiny_source_dir):
  """The session's tiny vgg_s source (conftest: pretrain(..., epochs=0.02, max_train=256))."""
  return tiny_source_dir("vgg_s")


def _outputs(out, *names):
  for n in names:
    assert os.path.getsize(os.path.join(out, n)) > 0, n


@pytest.mark.slow
def test_tables(source_dir, tmp_path):
  out = str(tmp_path / "t")
  argv = ["--arch", "vgg_s", "--source", f"ckpt:{source_dir}", "--target", "digits",
          "--shots", "1", "--repeats", "2", "--strategies", "freeze,freeze_cwl",
          "--lrs", "0.01", "--steps", "2", "--test-per-class", "3", "--val-per-class", "1",
          "--out", out, "--quiet"]
  assert cwl_tables.main(argv) == 0
  _outputs(out, "report.md", "results.json", "results.jsonl", "accuracy_vs_shots.png")
  report = open(os.path.join(out, "report.md")).read()
  assert "Table I" in report and "Freeze + CWL" in report and "Δ Freeze + CWL" in report
  assert "Table II" not in report  # neither finetune strategy ran
  records = json.load(open(os.path.join(out, "results.json")))
  assert len(records) == 4 and {r["arm"] for r in records} == {"freeze", "freeze_cwl"}
  # resume skips finished runs; a second run without --resume refuses the directory
  assert cwl_tables.main(argv + ["--resume"]) == 0
  assert len(json.load(open(os.path.join(out, "results.json")))) == 4
  assert cwl_tables.main(argv) == 2


def test_pruning(source_dir, tmp_path, capsys):
  out = str(tmp_path / "p")
  argv = ["--source", f"ckpt:{source_dir}", "--target", "digits", "--shots", "1",
          "--repeats", "2", "--val-per-class", "2", "--steps", "4", "--patience", "2",
          "--eval-every", "2", "--lr", "0.05", "--taus", "0.97", "--ft-epochs", "1",
          "--ft-lrs", "1e-4,1e-3", "--tune-extend", "0", "--latency-runs", "1",
          "--latency-batches", "2", "--test-per-class", "3", "--out", out]
  assert cwl_pruning.main(argv) == 0
  # progress on stderr (not --quiet): the plan by kind, then done/total after each run
  err = capsys.readouterr().err
  assert "cwl_pruning: 4 runs planned (2 unpruned runs (draws), 2 pruned runs (taus x draws))" \
      in err
  assert "[1/4, ETA" in err and "[4/4, last run] draw 1 tau=0.97" in err
  _outputs(out, "report.md", "results.json", "summary.json", "compression_per_layer.png",
           "sigma_hist.png")
  saved = json.load(open(os.path.join(out, "results.json")))
  assert {(r["version"], r["arm"]) for r in saved} == {(2, "unpruned"), (2, "pruned")}
  records = cwl_pruning.rows(saved)
  by_key = {(r["repeat"], r["tau"]): r for r in records}
  assert set(by_key) == {(0, None), (0, 0.97), (1, None), (1, 0.97)}
  r0 = by_key[(0, 0.97)]
  assert r0["feat_frac"] < 1.0 and r0["params_frac"] < 1.0
  assert set(r0["ft"]) == {"1"} and "latency_ms" in r0 and "latency_ms" not in by_key[(1, 0.97)]
  assert by_key[(0, None)]["latency_timing"] == r0["latency_timing"] == "interleaved"
  # the finetuning LR is the grid point with the best validation accuracy, per draw
  for r in records:
    grid = {lr: v["1"] for lr, v in r["ft_grid"]}
    assert set(grid) == {1e-4, 1e-3}
    best = max(sorted(grid), key=lambda lr: grid[lr]["val_acc"])
    assert r["ft"]["1"]["lr"] == best and r["ft"]["1"]["test_acc"] == grid[best]["test_acc"]
  base = by_key[(0, None)]
  assert base["transfer"]["stopped"] in ("patience", "cap") and base["transfer"]["steps"] <= 4
  saved = transfer.load_source(os.path.join(out, "models", "tau_0.97"))
  widths = [w for stage in saved.config["conv_widths"] for w in stage]
  assert widths == [k for k, _ in r0["kept"].values()]
  report = open(os.path.join(out, "report.md")).read()
  assert "## Claims" in report and "pruning by |sigma| keeps accuracy" in report
  assert "all timed together round-robin" in report
  claims = json.load(open(os.path.join(out, "summary.json")))["claims"]
  assert claims[0]["cells"][0]["paired"]["n"] == 2
  # the report regenerates from results.json alone, byte for byte
  assert publish.check(out) == []
  # a kill left draw 0 half recorded (its pruned net's line lost): the resume reruns that net
  # and times it alone, and says so rather than claiming it was timed with the unpruned one
  jsonl = os.path.join(out, "results.jsonl")
  lines = open(jsonl).readlines()
  kept = [l for l in lines if not ('"index": 0' in l and '"tau": 0.97' in l)]
  assert len(kept) == len(lines) - 1
  open(jsonl, "w").writelines(kept)
  assert cwl_pruning.main(argv + ["--resume"]) == 0
  err = capsys.readouterr().err
  assert "4 runs planned" in err and "3 already saved, skipped" in err
  assert "[4/4, last run] draw 0 tau=0.97" in err
  records = cwl_pruning.rows(json.load(open(os.path.join(out, "results.json"))))
  by_key = {(r["repeat"], r["tau"]): r for r in records}
  assert by_key[(0, 0.97)]["latency_timing"] == "interleaved, resumed draw"
  assert by_key[(0, None)]["latency_timing"] == "interleaved"
  assert "only among themselves" in open(os.path.join(out, "report.md")).read()
  assert publish.check(out) == []


def test_pruning_claims_by_hand():
  """Claims pair the pruned + finetuned model with the unpruned one (and its finetuned
  control) by draw, per tau and epoch count."""
  plan = cwl_pruning.PUBLISHER.validate(
      study_flags.parse(cwl_pruning.STUDY, ["--ft-epochs", "1,30", "--taus", "0.4,0.8"]))
  recs = []
  for rep, shift in ((0, 0.0), (1, 0.02), (2, 0.01)):
    ft = lambda a1, a30: {"1": dict(lr=1e-4, edges=[], val_acc=0.5, test_acc=a1 + shift),
                          "30": dict(lr=1e-4, edges=[], val_acc=0.5, test_acc=a30 + shift)}
    recs.append(dict(tau=None, repeat=rep, acc=0.90 + shift, val_acc=0.9, ft=ft(0.91, 0.92),
                     transfer=dict(steps=100, best_step=50, stopped="patience")))
    for tau, (a0, a1, a30) in ((0.4, (0.89, 0.90, 0.91)), (0.8, (0.50, 0.80, 0.86))):
      recs.append(dict(tau=tau, repeat=rep, acc=a0 + shift, val_acc=0.5, ft=ft(a1, a30),
                       params_frac=0.5, feat_frac=0.7, kept={"conv1_1": [3, 8]}))
  res = cwl_pruning.claim_results(recs)
  cells = {(c["cell"]["tau"], c["cell"]["epochs"]): c for c in res[0]["cells"]}
  assert cells[(0.4, 30)]["paired"]["mean"] == pytest.approx(0.01)
  assert cells[(0.4, 30)]["verdict"] == "reproduced"  # +1 point, every draw
  assert cells[(0.8, 1)]["paired"]["mean"] == pytest.approx(-0.10)
  assert cells[(0.8, 1)]["verdict"] == "refuted"
  control = {(c["cell"]["tau"], c["cell"]["epochs"]): c for c in res[1]["cells"]}
  assert control[(0.4, 1)]["paired"]["mean"] == pytest.approx(-0.01)
  text, summary = cwl_pruning.make_report(plan, recs)
  assert summary["claims"] == json.loads(json.dumps(res))
  assert "| 0.4 | 0.900 (0.008) | 0.910 (0.008) | 0.920 (0.008) | 50% | 70% | - | - |" in text
  assert "| - | 0.910 (0.008) | 0.920 (0.008) | 0.930 (0.008) | 100% | 100% | - | - |" in text
  assert "Only 1 k-shot draw" not in text and "## Claims" in text


def test_retrieval_embedded(source_dir, tmp_path):
  out = str(tmp_path / "r")
  argv = ["--source", f"ckpt:{source_dir}", "--target", "digits", "--queries", "1",
          "--db-per-class", "4", "--repeats", "2", "--strategies", "freeze,freeze_cwl",
          "--steps", "2", "--out", out, "--quiet"]
  assert cwl_retrieval.main(argv) == 0
  _outputs(out, "report.md", "results.json", "map.png")
  records = json.load(open(os.path.join(out, "results.json")))
  assert all(r["version"] == 2 and r["knobs"].keys() == {"lr"} for r in records)
  assert {r["arm"] for r in records} == {"freeze", "freeze_cwl"}
  assert all(0 < r["outcome"]["map"] <= 1 for r in records)
  # Table III's claim, paired by query draw
  claim = json.load(open(os.path.join(out, "summary.json")))["claims"][0]
  by = {(r["arm"], r["draw"]["index"]): r["outcome"]["map"] for r in records}
  diffs = [by[("freeze_cwl", i)] - by[("freeze", i)] for i in (0, 1)]
  assert claim["pooled"]["paired"]["n"] == 2
  assert claim["pooled"]["paired"]["mean"] == pytest.approx(np.mean(diffs))
  assert "One LR per strategy" in open(os.path.join(out, "report.md")).read()
  assert publish.check(out) == []


@pytest.mark.slow
def test_retrieval_revisited_path(source_dir, tmp_path):
  # A fake revisited dataset: 6 database images, 2 queries of 2 landmarks, with bbx crops.
  folder = tmp_path / "jpg"
  folder.mkdir()
  rng = np.random.default_rng(0)
  names = [f"img_{i}" for i in range(6)] + ["tower_000001", "bridge_000002"]
  for n in names:
    Image.fromarray(rng.integers(0, 255, (40, 36), dtype=np.uint8)).save(folder / f"{n}.png")
  gnd = {"imlist": names[:6], "qimlist": names[6:],
         "gnd": [{"easy": [0, 1], "hard": [2], "junk": [3], "bbx": [2, 3, 30, 33]},
                 {"easy": [4], "hard": [5], "junk": [], "bbx": None}]}
  gnd_path = tmp_path / "gnd.json"
  gnd_path.write_text(json.dumps(gnd))
  out = str(tmp_path / "rv")
  argv = ["--source", f"ckpt:{source_dir}", "--gnd", str(gnd_path), "--images", str(folder),
          "--ext", ".png", "--strategies", "freeze,freeze_cwl", "--steps", "1",
          "--out", out, "--quiet"]
  assert cwl_retrieval.main(argv) == 0
  report = open(os.path.join(out, "report.md")).read()
  assert "| Easy | Medium | Hard | Mean |" in report
  records = json.load(open(os.path.join(out, "results.json")))
  assert all(0 < r["outcome"][s] <= 1 for r in records for s in ("easy", "medium", "hard"))
  # a flatten head cannot take another input size
  assert cwl_retrieval.main(argv[:-3] + ["--image-size", "32,32", "--out", out + "2"]) == 2


def test_kronecker(source_dir, tmp_path):
  out = str(tmp_path / "k")
  assert cwl_kronecker.main(["--source", f"ckpt:{source_dir}", "--layers", "2", "--out", out,
                             "--quiet"]) == 0
  _outputs(out, "report.md", "results.json", "filter_gram.png", "kron_error.png")
  rows = sorted(json.load(open(os.path.join(out, "results.json"))),
                key=lambda r: r["extra"]["index"])  # one record per conv layer, in order
  assert [r["cell"]["layer"] for r in rows][:2] == ["conv1_1", "conv1_2"]
  assert all(r["outcome"]["relative_error"][-1] < 1e-6 for r in rows)  # full rank is exact
  assert publish.check(out) == []  # report.md regenerates from results.json


def test_bad_flags(tmp_path):
  assert cwl_pruning.main(["--taus", "-1", "--out", str(tmp_path / "a")]) == 2
  assert cwl_pruning.main(["--ft-lrs", "0,1e-4", "--out", str(tmp_path / "a")]) == 2
  assert cwl_pruning.main(["--val-per-class", "0", "--out", str(tmp_path / "a")]) == 2
  assert cwl_tables.main(["--strategies", "nope", "--out", str(tmp_path / "b")]) == 2
  assert cwl_retrieval.main(["--gnd", "x.json", "--out", str(tmp_path / "c")]) == 2
  # Several LRs for a strategy would be chosen on test mAP: refused, one sentence naming it.
  for lrs in ("paper", "1e-3,1e-2"):
    with pytest.raises(InputError, match="freeze_cwl 2 learning rates|has no validation split"):
      study_flags.parse(cwl_retrieval.STUDY, ["--lrs", lrs])
  assert study_flags.parse(cwl_retrieval.STUDY, ["--lrs", "1e-3"]).extra.lr_plan()
  assert not os.path.exists(tmp_path / "e")
  assert cwl_retrieval.main(["--lrs", "paper", "--out", str(tmp_path / "e")]) == 2
  assert cwl_kronecker.main(["--ranks", "a", "--out", str(tmp_path / "d")]) == 2


def _records():
  """Synthetic grid: freeze / freeze_cwl, 2 LRs, 2 repeats, k=1; accuracies chosen by hand."""
  acc = {("freeze", 0.01): (0.50, 0.60), ("freeze", 0.05): (0.40, 0.40),
         ("freeze_cwl", 0.01): (0.55, 0.50), ("freeze_cwl", 0.05): (0.70, 0.80)}
  out = []
  for (s, lr), accs in acc.items():
    for rep, a in enumerate(accs):
      out.append(dict(strategy=s, arch="vgg_s", target="digits", shots=1, repeat=rep, lr=lr,
                      test_acc=a, val_acc=a if lr == 0.01 else 0.0, status="ok"))
  return out


def _report(argv, records):
  """The cwl_tables report of (version-1) records under the flags `argv`."""
  from jtransfer.study import flags, grid, report
  plan = grid.plan(cwl_tables.STUDY, flags.parse(cwl_tables.STUDY, argv))
  return report.make_report(plan, records)


def test_tables_report_by_hand():
  text, summary = _report(["--strategies", "freeze,freeze_cwl", "--repeats", "2", "--arch",
                           "vgg_s", "--target", "digits", "--shots", "1", "--lrs", "0.01,0.05"],
                          _records())
  best, val = text.split("## Validation")
  # best over LR: freeze at 0.01 -> 0.55 (0.05); freeze_cwl at 0.05 -> 0.75 (0.05)
  assert "| Freeze | 0.550 (0.050) |" in best
  assert "| Freeze + CWL | 0.750 (0.050) |" in best
  # paired: (0.70 - 0.50, 0.80 - 0.60) = +0.20 (0.00), CWL wins both repeats
  assert "+0.200 (0.000) 2/2" in best
  # validation picks lr 0.01 for both (val acc 0 at 0.05): freeze_cwl 0.525 (0.025)
  assert "| Freeze + CWL | 0.525 (0.025) |" in val
  assert "Table II" not in text
  assert summary["best_over_lr"]["vgg_s|digits|freeze_cwl|1"]["best_lr"] == 0.05


def test_tables_claims_by_hand():
  """Tuned records (one tuning draw choosing lr 0.01) -> claims, including 'more without BN'."""
  base = dict(target="digits", shots=1, lr=0.01, hp="", fold=-1, status="ok", steps=10)
  gain = {"vgg_s": (0.10, 0.12, 0.08), "resnet_s": (0.01, -0.01, 0.03)}
  recs = []
  for arch in ("vgg_s", "resnet_s"):
    for s in ("freeze", "freeze_cwl"):
      recs.append(dict(base, arch=arch, strategy=s, repeat=-1, role="tune", val_acc=0.5,
                       test_acc=None))
      for rep in range(3):
        acc = 0.6 + (gain[arch][rep] if s == "freeze_cwl" else 0.0)
        recs.append(dict(base, arch=arch, strategy=s, repeat=rep, role="eval", val_acc=acc,
                         test_acc=acc))
  text, summary = _report(["--strategies", "freeze,freeze_cwl", "--repeats", "3",
                           "--tune-repeats", "1", "--cv-folds", "0", "--arch", "vgg_s,resnet_s",
                           "--target", "digits", "--shots", "1", "--lrs", "0.01"], recs)
  res = {c["claim"]["text"]: c for c in summary["claims"]}
  table1 = res["weighting convolutions beats frozen convolutions"]
  assert table1["pooled"]["paired"]["n"] == 3  # the archs share their 3 draws: each once
  assert table1["pooled"]["paired"]["mean"] == pytest.approx((0.30 + 0.03) / 6)
  more = res["weighting helps more without BN (VGG) than with it (ResNet)"]
  # per draw: 0.10-0.01, 0.12+0.01, 0.08-0.03 = 0.09, 0.13, 0.05: all above 0
  assert more["pooled"]["paired"]["mean"] == pytest.approx(0.09)
  assert more["pooled"]["paired"]["wins"] == 3
  assert "## Claims" in text and "Tuned on validation" in text
  assert table1["pooled"]["paired"]["lo"] == table1["pooled"]["paired"]["hi"]  # 0.055 each draw


def test_retrieval_helpers():
  assert retrieval_run.landmark("all_souls_000013") == "all_souls"
  assert retrieval_run.landmark("jpg/defense_000041.jpg") == "defense"
  recs = [dict(arm="a", lr=1.0, map=0.2), dict(arm="a", lr=1.0, map=0.4),
          dict(arm="a", lr=2.0, map=0.1), dict(arm="b", lr=0.0, map=0.5)]
  s = cwl_retrieval.summarize(recs, ["map"])
  assert s["a"]["best_lr"] == 1.0 and s["a"]["map"] == pytest.approx((0.3, 0.1))
  assert s["b"]["map"] == pytest.approx((0.5, 0.0))
