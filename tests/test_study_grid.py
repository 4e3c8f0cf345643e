"""A study's grid (jtransfer.study.grid, draws): resolved arms, cells and shards, tuning from
records against a hand-derived choice, evaluation points, the keys a complete grid holds."""
import numpy as np

from experiments import cwl_tables, fewshot
from jtransfer.methods import transfer
from jtransfer.study import draws, flags, grid, records


def _plan(study, *argv):
  return grid.plan(study, flags.parse(study, list(argv)))


def test_arms_resolve_their_lr_grids():
  p = _plan(fewshot.STUDY, "--strategies", "freeze,finetune,l2sp")
  assert p.arm("freeze").lrs == (1e-2, 5e-2) and p.arm("finetune").lrs == (1e-4, 1e-3)
  l2sp = transfer.get_strategy("l2sp")
  reduced = l2sp.paper_lrs[1::2] or l2sp.paper_lrs  # every other paper LR, at least one
  assert p.arm("l2sp").lrs == reduced
  assert p.arm("l2sp").grid == {"lr": reduced, **l2sp.knobs}
  assert p.arm("l2sp").folds == l2sp.cv_folds  # --cv-folds auto: its paper's
  # cwl_tables pairs a strategy and its CWL variant on the same two LRs
  c = _plan(cwl_tables.STUDY, "--lrs", "reduced")
  assert c.arm("freeze_cwl").lrs == c.arm("freeze").lrs == (1e-2, 5e-2)
  assert _plan(fewshot.STUDY, "--lrs", "1e-3,1e-2").arm("freeze").lrs == (1e-3, 1e-2)


def test_cells_and_shards_partition_the_grid():
  argv = ("--arch", "vgg_s,resnet_s", "--target", "digits", "--shots", "1,5,10")
  whole = _plan(fewshot.STUDY, *argv)
  assert [tuple(c.values()) for c in whole.cells[:4]] == [
      ("vgg_s", "digits", 1), ("vgg_s", "digits", 5), ("vgg_s", "digits", 10),
      ("resnet_s", "digits", 1)]
  parts = [_plan(fewshot.STUDY, *argv, "--shard", f"{i}/4").mine for i in range(4)]
  assert sorted(tuple(c.values()) for part in parts for c in part) == \
      sorted(tuple(c.values()) for c in whole.cells)
  assert [len(p) for p in parts] == [2, 2, 1, 1]


def _tuning_records(plan, cell, arm, val):
  """Tuning records of `arm` with validation accuracy val(lr) on every tuning draw."""
  a = plan.arm(arm)
  return [records.make(arm, cell, d, {"lr": lr}, {"status": "ok", "val_acc": val(lr)})
          for lr in a.lrs for d in draws.tuning_draws(plan.config.protocol.tune_draws, a.folds)]


def test_choice_from_records_is_the_best_mean_and_extends_a_winning_edge():
  p = _plan(fewshot.STUDY, "--strategies", "freeze", "--lrs", "1e-3,1e-2,1e-1",
            "--tune-repeats", "2", "--arch", "vgg_s", "--target", "digits", "--shots", "5",
            "--tune-extend", "1")
  cell = dict(p.cells[0])
  # by hand: 1e-2 scores best, an inner point: no extension
  recs = _tuning_records(p, cell, "freeze", lambda lr: {1e-3: 0.2, 1e-2: 0.6, 1e-1: 0.4}[lr])
  t = grid.choose(grid.by_key(recs), p, cell, p.arm("freeze"))
  assert t["choice"] == {"lr": 1e-2} and t["score"] == 0.6 and t["edges"] == []
  # the last LR wins: the grid grows past it, a run the records lack (no choice yet)
  recs = _tuning_records(p, cell, "freeze", lambda lr: lr)
  requested: set = set()
  assert grid.choose(grid.by_key(recs), p, cell, p.arm("freeze"), requested=requested) is None
  missing = requested - set(grid.by_key(recs))
  # (reading stops at the first run it lacks)
  assert {dict(k[5])["lr"] for k in missing} == {1.0} and len(missing) == 1
  # training what is missing (the runner) completes the choice
  trained = []
  t = grid.choose(grid.by_key(recs), p, cell, p.arm("freeze"),
                  run_missing=lambda k: trained.append(k) or {"status": "ok", "val_acc": 0.0})
  assert missing <= set(trained) and len(trained) == 2  # lr 1.0 on both tuning draws
  assert {dict(k[5])["lr"] for k in trained} == {1.0} and t["choice"] == {"lr": 0.1}
  assert t["grid"]["lr"] == [1e-3, 1e-2, 1e-1, 1.0]


def test_eval_points_and_grid_keys():
  # --paper-grid spelled out: the demo grid turned it off by default
  p = _plan(fewshot.STUDY, "--strategies", "freeze", "--lrs", "1e-3,1e-2", "--repeats", "3",
            "--arch", "vgg_s", "--target", "digits", "--shots", "5", "--paper-grid")
  cell = dict(p.cells[0])
  # a tie: the smaller LR, and no extension (an edge that does not beat its neighbour)
  recs = _tuning_records(p, cell, "freeze", lambda lr: 0.5)
  tuned = grid.choose(grid.by_key(recs), p, cell, p.arm("freeze"))
  assert tuned["choice"] == {"lr": 1e-3}
  # --paper-grid: every LR at the paper's knobs, the tuned one among them
  assert grid.eval_points(p, p.arm("freeze"), tuned) == [{"lr": 1e-3}, {"lr": 1e-2}]
  keys = grid.grid_keys(recs, p)
  evals = [k for k in keys if k[2] == "eval"]
  assert len(evals) == 2 * 3 and set(keys) - set(evals) == set(grid.by_key(recs))
  off = _plan(fewshot.STUDY, "--strategies", "freeze", "--lrs", "1e-3,1e-2", "--repeats", "3",
              "--arch", "vgg_s", "--target", "digits", "--shots", "5", "--no-paper-grid")
  tuned = grid.choose(grid.by_key(recs), off, cell, off.arm("freeze"))
  assert grid.eval_points(off, off.arm("freeze"), tuned) == [{"lr": 1e-3}]
  assert len([k for k in grid.grid_keys(recs, off) if k[2] == "eval"]) == 3


def test_draw_seeds_and_disjoint_draws():
  # the seed formula by hand; tuning draws (negative repeats) never share an evaluation seed
  assert draws.draw_seed(2, 5, -1) == (2 * 1_000_003 + 5 * 1009 - 1) % 2 ** 31
  labels = np.repeat(np.arange(3), 40)
  d = draws.cell_draws(labels, 3, 2, 0, repeats=2, tune_draws=2, val_per_class=4)
  assert sorted(d) == [-2, -1, 0, 1]
  assert len({s for s, _, _ in d.values()}) == 4
  for _, tr, va in d.values():
    assert np.array_equal(np.bincount(labels[tr], minlength=3), [2, 2, 2])
    assert not set(tr) & set(va) and len(va) == 12
