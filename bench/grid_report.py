"""bench/bench_grid.py's report: wall time per arm, where the time goes, the reading of the
ratio, and accuracy parity of the two arms' runs."""
from __future__ import annotations

import math
import os
import platform
from collections import defaultdict

from bench.common import command
from bench.grid_jax import STRATEGIES, STUDY, TARGETS, GridConfig, study_config
from jtransfer.study import grid as grid_lib
from jtransfer.study import records as rec


def chosen(records: list[dict], config: GridConfig) -> dict:
  """(arch, target, shots, strategy) -> the LR the (version-2) records' tuning runs choose
  (`jtransfer.study.grid.choices`, the runner's rule)."""
  plan = grid_lib.plan(STUDY, study_config(config, config.targets, "unused"))
  return {cell: t["choice"]["lr"] for cell, t in grid_lib.choices(records, plan).items()}


def _row(r: dict) -> dict:
  """A version-2 record as a flat report row (`records.flat`) with its seconds."""
  return dict(rec.flat(r), seconds=r.get("seconds", 0.0))


def tuned_eval(records: list[dict], lrs: dict) -> dict:
  """(arch, target, shots, strategy, repeat) -> test accuracy of the evaluation run at the
  chosen LR (None when it failed)."""
  out = {}
  for r in map(_row, records):
    cell = (r["arch"], r["target"], r["shots"], r["arm"])
    if r["role"] == "eval" and lrs.get(cell) == r["lr"]:
      out[cell + (r["repeat"],)] = r["test_acc"] if r["status"] == "ok" else None
  return out


def _split(records: list[dict]) -> dict:
  """Seconds, runs, steps by strategy and by role."""
  out = defaultdict(lambda: dict(seconds=0.0, runs=0, steps=0, patience=0))
  for r in map(_row, records):
    for group in (r["arm"], r["role"], "all"):
      g = out[group]
      g["seconds"] += r["seconds"]
      g["runs"] += 1
      g["steps"] += r.get("steps") or 0
      g["patience"] += r.get("stopped") == "patience"
  return out


def _paired_line(what: str, a: list, b: list) -> str:
  from jtransfer.protocol import stats
  if not a:
    return f"| {what} | 0 | - | - | - |"
  pr = stats.paired(a, b)
  ci = "-" if math.isnan(pr.lo) else f"[{100 * pr.lo:+.2f}, {100 * pr.hi:+.2f}]"
  holds = "-" if math.isnan(pr.lo) else ("yes" if pr.lo <= 0 <= pr.hi else "**no**")
  return (f"| {what} | {pr.n} | {100 * pr.mean:+.2f} | {ci} | {pr.wins}/{pr.ties}/{pr.losses} "
          f"| {holds} | {100 * max(abs(x - y) for x, y in zip(a, b)):.2f} |")


def report(config: GridConfig, argv, arms: dict, load: tuple) -> str:
  """bench/GRID.md from the arms' results and the load averages (start, end)."""
  p = config.protocol
  cap = p.steps
  lines = ["# Table I grid wall time under the protocol", "", "```", command("bench_grid", argv),
           "```", ""]
  import jax
  tv = ""
  if "torch" in arms:
    import torch
    probe = arms["torch"]["probe"]
    tv = (f", torch {torch.__version__} with {arms['torch']['threads']} intra-op thread(s)" +
          (" (probe step, ms: " + ", ".join(f"{n} thread(s) {ms:.1f}" for n, ms in probe.items())
           + ")" if probe else ""))
  lines += [
      f"{platform.machine()}, {os.cpu_count()} cores, jax {jax.__version__} "
      f"({jax.default_backend()}){tv}. **Measured on a shared machine** (other engineers' jobs "
      f"running): 1/5/15-min load average {load[0]} at the start, {load[1]} at the end; figures "
      "are from this one run and only their ratios are comparable.", "",
      f"Grid: {config.text('archs')} x {config.text('targets')} x k={config.text('shots')} x "
      f"{{freeze, freeze_cwl}}, the "
      f"paper's freeze LR grid (1e-3, 5e-3, 1e-2, 5e-2, extended up to {p.tune_extend} values "
      f"at an edge); {p.tune_draws} tuning draw(s) and {p.repeats} evaluation draw(s) "
      f"per cell; evaluation draws at the chosen LR"
      f"{' and at every grid LR (--paper-grid)' if p.paper_grid else ' only'}. Runs stop when "
      f"validation accuracy ({p.val_per_class}/class) has not improved for {p.patience} "
      f"steps, checked every {p.eval_every}, at most {cap}; best validation state kept; test "
      f"<= {p.test_per_class}/class. Batch min({p.batch_size}, k-shot set). The two arms "
      "alternate by arch (one `cwl_tables` invocation per arch, then PyTorch's runs of it).", ""]
  full = dict(archs="vgg_s,resnet_s", targets=";".join(TARGETS), shots="1,3,5,10",
              tune_repeats=2, repeats=10)
  here = dict(archs=config.text("archs"), targets=config.text("targets"),
              shots=config.text("shots"), tune_repeats=str(p.tune_draws), repeats=str(p.repeats))
  cut = [f"--{k.replace('_', '-')} {full[k]} (here {here[k]})" for k in full
         if here[k] != str(full[k])]
  if cut:
    lines += ["Reduced from cwl_tables' full Table I to fit the time budget: " + "; ".join(cut)
              + ".", ""]
  torch_wall = arms["torch"]["wall"] if "torch" in arms else float("nan")
  names = {"jtransfer": "jtransfer (`cwl_tables`, Freeze on cached features)",
           "plain": "jtransfer plain (`--no-feature-cache`)",
           "processes": "jtransfer processes (one pinned 1-thread process per target)",
           "torch": "PyTorch loop (full forward every step, one run at a time)"}
  lines += ["## Wall time", "",
            "| arm | runs (tune + eval) | steps trained / cap | stopped by patience | wall s | "
            "Freeze runs s | Freeze+CWL runs s | PyTorch wall / this |",
            "|---|---|---|---|---|---|---|---|"]
  for arm, res in arms.items():
    sp = _split(res["records"])
    a = sp["all"]
    per = (f"{sp['freeze']['seconds']:.0f} | {sp['freeze_cwl']['seconds']:.0f}"
           if arm != "processes" else "- | -")
    lines.append(f"| {names[arm]} | {a['runs']} ({sp['tune']['runs']} + {sp['eval']['runs']}) | "
                 f"{a['steps'] / max(1, a['runs'] * cap):.0%} | "
                 f"{a['patience']}/{a['runs']} | {res['wall']:.1f} | {per} | "
                 f"**{torch_wall / res['wall']:.2f}x** |")
  lines.append("")
  if "jtransfer" in arms and "torch" in arms:
    lines += split_section(arms, cap)
    lines += parity_section(arms, config)
    lines += reading(arms)
  lines += ["Not timed: batched runs (`--batch-runs`). The grid runner trains runs one at a time "
            "under early stopping (a vmapped group would have to run until its slowest run "
            "stops, and each run stops at its own step), so `--batch-runs 64` would time the "
            "same thing as the jtransfer arm; batching also measured 0.75-0.89x of one run at "
            "a time on this 2-core CPU at fixed length (docs/decisions.md).", ""]
  return "\n".join(lines)


def reading(arms: dict) -> list[str]:
  """What moved the ratio, from the numbers above."""
  j, t = arms["jtransfer"], arms["torch"]
  sj, st = _split(j["records"]), _split(t["records"])
  jf, jc = sj["freeze"]["seconds"], sj["freeze_cwl"]["seconds"]
  tf, tc = st["freeze"]["seconds"], st["freeze_cwl"]["seconds"]
  jw, tw = j["wall"], t["wall"]
  out = ["## Reading", ""]
  out.append(f"- **Ratio {tw / jw:.2f}x** (PyTorch {tw:.0f} s / jtransfer {jw:.0f} s). "
             f"PyTorch minus jtransfer: {tw - jw:+.0f} s, of which Freeze runs {tf - jf:+.0f} s, "
             f"Freeze+CWL runs {tc - jc:+.0f} s, outside runs "
             f"{(tw - st['all']['seconds']) - (jw - sj['all']['seconds']):+.0f} s.")
  out.append(f"- **Cached features (Freeze)**: {tf / max(jf, 1e-9):.1f}x. jtransfer's Freeze step "
             "is a head matmul on features computed once per image; PyTorch's runs the frozen "
             "backbone forward on every step and every validation check. Were jtransfer's Freeze "
             f"runs as slow as PyTorch's, the ratio would be {tw / (jw - jf + tf):.2f}x.")
  out.append(f"- **Freeze+CWL** (the same work per step in both: forward and backward-data "
             f"through every layer): {tc / max(jc, 1e-9):.2f}x; it is "
             f"{jc / jw:.0%} of jtransfer's wall time, so it bounds the ratio: with Freeze free, "
             f"the ratio could reach at most {tw / max(jw - jf, 1e-9):.2f}x.")
  out.append(f"- **Compilation**: {j['compile_s']:.0f} s, {j['compile_s'] / jw:.0%} of "
             f"jtransfer's wall time (one step and forward per arch, strategy and batch shape; "
             f"LR and seed do not recompile); without it the ratio would be "
             f"{tw / max(jw - j['compile_s'], 1e-9):.2f}x.")
  out.append(f"- **Validation and test forwards**: jtransfer {j['eval_s']:.0f} s "
             f"({j['eval_s'] / jw:.0%}), PyTorch {t['eval_s']:.0f} s ({t['eval_s'] / tw:.0%}); "
             "a check every eval-every steps is a forward over the validation set (Freeze: a "
             "matmul on cached features in jtransfer).")
  out.append("- **Early stopping** is the protocol in both arms, not a lever of one: it cuts "
             "both arms' steps alike (above), so it moves the ratio only through the costs that "
             "do not scale with steps (compilation, data, features).")
  return out + [""]


def split_section(arms: dict, cap: int) -> list[str]:
  """Where the time goes: seconds by kind of run, per-step cost, what early stopping saves."""
  j, t = arms["jtransfer"], arms["torch"]
  sj, st = _split(j["records"]), _split(t["records"])
  out = ["## Where the time goes", "",
         "Per-run seconds summed (a run: its training steps, validation forwards, test forward; "
         "for jtransfer also the compilations and the Freeze features it triggers); 'outside "
         "runs' = wall minus those (data and source loading, report writing).", "",
         "| | jtransfer s | PyTorch s | PyTorch / jtransfer |", "|---|---|---|---|"]

  def row(label, a, b):
    ratio = f"{b / a:.2f}x" if a > 0 else "-"
    out.append(f"| {label} | {a:.1f} | {b:.1f} | {ratio} |")

  for label, g in (("Freeze runs", "freeze"), ("Freeze+CWL runs", "freeze_cwl"),
                   ("tuning runs", "tune"), ("evaluation runs", "eval")):
    row(label, sj[g]["seconds"], st[g]["seconds"])
  row("validation + test forwards (inside runs)", j["eval_s"], t["eval_s"])
  out.append(f"| compilation (trace + lower + XLA compile, inside runs) | "
             f"{j['compile_s']:.1f} | - | - |")
  out.append(f"| Freeze backbone features (once per image, inside runs) | {j['features_s']:.1f} "
             "| - | - |")
  row("outside runs", j["wall"] - sj["all"]["seconds"], t["wall"] - st["all"]["seconds"])
  out.append("")
  out += ["Steps per run and per-step cost (seconds of a strategy's runs / its steps trained; "
          "includes that strategy's forwards and compiles):", "",
          "| strategy | jtransfer mean steps | PyTorch mean steps | jtransfer ms/step | "
          "PyTorch ms/step | PyTorch / jtransfer |", "|---|---|---|---|---|---|"]
  for g in STRATEGIES:
    a, b = sj[g], st[g]
    if not a["runs"] or not b["runs"]:
      continue
    ma, mb = 1000 * a["seconds"] / max(1, a["steps"]), 1000 * b["seconds"] / max(1, b["steps"])
    out.append(f"| {g} | {a['steps'] / a['runs']:.0f} | {b['steps'] / b['runs']:.0f} | "
               f"{ma:.2f} | {mb:.2f} | {mb / ma:.1f}x |")
  out.append("")
  # Early stopping: both arms use it (it is the protocol); what it saves against the cap, if
  # each run's seconds scaled with its steps (an estimate: fixed per-run costs do not scale).
  at_cap = {name: sum(r["seconds"] * cap / r["steps"] for r in map(_row, res["records"])
                      if r.get("steps"))
            for name, res in (("jtransfer", j), ("torch", t))}
  out += [f"Early stopping (both arms): runs trained {sj['all']['steps'] / (sj['all']['runs'] * cap):.0%}"
          f" (jtransfer) and {st['all']['steps'] / (st['all']['runs'] * cap):.0%} (PyTorch) of "
          f"the {cap}-step cap. Every run at the cap would take about "
          f"{at_cap['jtransfer']:.0f} s (jtransfer) and {at_cap['torch']:.0f} s (PyTorch) of run "
          f"time (run seconds scaled by cap / steps), {at_cap['torch'] / max(at_cap['jtransfer'], 1e-9):.2f}x.",
          ""]
  return out


def parity_section(arms: dict, config: GridConfig) -> list[str]:
  """jtransfer minus PyTorch accuracy: at each arm's chosen LR and on the same runs."""
  j, t = arms["jtransfer"], arms["torch"]
  lr_j, lr_t = chosen(j["records"], config), chosen(t["records"], config)
  ej, et = tuned_eval(j["records"], lr_j), tuned_eval(t["records"], lr_t)
  out = ["## Accuracy parity (jtransfer minus PyTorch)", "",
         "Points of accuracy; per run: mean, 95% CI (Student t over runs, "
         "`jtransfer.protocol.stats.paired`), wins/ties/losses of jtransfer, whether the CI holds "
         "0, the largest |difference|. Failed runs (non-finite) are left out and counted.", "",
         "| runs compared | n | mean | 95% CI | w/t/l | CI holds 0 | max abs |",
         "|---|---|---|---|---|---|---|"]
  for label, strats in (("evaluation runs, each arm at its own chosen LR: test accuracy",
                         STRATEGIES),
                        ("  Freeze only", ("freeze",)), ("  Freeze+CWL only", ("freeze_cwl",))):
    keys = sorted(k for k in ej if k[3] in strats and ej[k] is not None and
                  et.get(k) is not None)
    out.append(_paired_line(label, [ej[k] for k in keys], [et[k] for k in keys]))
  tj = {rec.key(r): _row(r) for r in j["records"]}
  pairs = [(tj.get(rec.key(r)), _row(r)) for r in t["records"]]
  same = [(a, b) for a, b in pairs if a and a["status"] == "ok" and b["status"] == "ok"]
  tune = [(a, b) for a, b in same if a["role"] == "tune"]
  ev = [(a, b) for a, b in same if a["role"] == "eval"]
  out.append(_paired_line("tuning runs, same draw and LR: validation accuracy",
                          [a["val_acc"] for a, _ in tune], [b["val_acc"] for _, b in tune]))
  out.append(_paired_line("evaluation runs, same draw and LR: test accuracy",
                          [a["test_acc"] for a, _ in ev], [b["test_acc"] for _, b in ev]))
  steps = [(a["steps"], b["steps"]) for a, b in same]
  cells = sorted(set(lr_j) & set(lr_t))
  agree = sum(lr_j[c] == lr_t[c] for c in cells)
  failed = {n: sum(r["status"] != "ok" for r in map(_row, res["records"]))
            for n, res in arms.items()}
  out += ["", f"Chosen LR equal in {agree}/{len(cells)} cells"
          + (": " + "; ".join(f"{'/'.join(map(str, c))}: {lr_j[c]:g} vs {lr_t[c]:g}"
                              for c in cells if lr_j[c] != lr_t[c]) if agree < len(cells) else "")
          + f". Runs stopping at the same step in both arms: "
          f"{sum(a == b for a, b in steps)}/{len(steps)}. Failed runs: "
          + ", ".join(f"{n} {v}" for n, v in failed.items()) + ".", ""]
  return out


