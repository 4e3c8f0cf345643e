"""Cost of DELTA's channel attention: suffix-only ablation against the whole-network one.

  JAX_PLATFORMS=cpu python -m bench.bench_attention --arch resnet18 --size 64 --images 20
  JAX_PLATFORMS=cpu python -m bench.bench_attention --arch resnet50 --size 224 --images 20 \\
      --calls 1

DELTA's attention (jtransfer.methods.delta) ablates every output channel of every tapped conv
and measures the CE increase. Ablating output channel j of a tap changes nothing before that
tap, so `delta.ablation_fn` masks the tap's conv *output* (its bias stays) inside one vmapped
call: the prefix runs once per call and only the suffix after the tap runs per channel. The
previous implementation masked the *kernel* (`kernel_ablation_fn` below, kept here as the
baseline): under vmap that materialises one kernel copy per channel and reruns the network
from the tap's conv on, and on XLA:CPU it measured about one whole forward per channel.

For each tap this prints the channels, the chunk (channels per vectorised call, bounded by
`--max-images` = chunk x images), the warm time of one call with each implementation and the
projected time for all the tap's channels, in CPU seconds of this process (robust to other
jobs' load, unlike wall time) and in units of one eval forward over the same images. Then the L2-FE probe of the
'authors' BN mode: the step-by-step loop against the closed form (`_probe_one_batch`), and the
peak resident memory of the process (`--calls` limits the timed calls per tap; the projection
multiplies the mean call time by the number of calls the tap needs). Weights are random: the
timings do not depend on them.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import resource
import statistics
import time

import jax
import numpy as np

from jtransfer import models, surgery
from jtransfer.methods import delta, transfer


def kernel_ablation_fn(model, kernel_path: str):
  """The previous ablation: each vmapped row multiplies the tap's kernel by its mask."""
  def ce_of(params, stats, x, labels, weights):
    logits, _, _ = models.apply_model(model, params, stats, x)
    return delta._weighted_ce(logits, labels, weights)  # noqa: SLF001

  @jax.jit
  def fn(params, stats, x, labels, weights, masks):
    base = ce_of(params, stats, x, labels, weights)

    def ablated(mask):
      p = surgery.map_with_path(lambda path, v: v * mask if path == kernel_path else v, params)
      return ce_of(p, stats, x, labels, weights)

    return jax.vmap(ablated)(masks) - base

  return fn


def timed(fn, *args, repeats: int = 1) -> float:
  """Median CPU seconds (all of this process's threads) of `repeats` warm calls.

  CPU time rather than wall time: on a machine shared with other jobs, a call's wall time
  depends on their load, its CPU time much less (XLA:CPU's threads are this process's).
  """
  jax.block_until_ready(fn(*args))  # compile
  times = []
  for _ in range(repeats):
    t0 = time.process_time()
    jax.block_until_ready(fn(*args))
    times.append(time.process_time() - t0)
  return statistics.median(times)


def peak_rss_gb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--arch", default="resnet18")
  p.add_argument("--size", type=int, default=64)
  p.add_argument("--images", type=int, default=20, help="attention images (one batch)")
  p.add_argument("--classes", type=int, default=4)
  p.add_argument("--max-images", type=int, default=4096, help="delta.Config.att_max_images")
  p.add_argument("--max-mb", type=float, default=delta.Config.att_max_mb,
                 help="delta.Config.att_max_mb")
  p.add_argument("--calls", type=int, default=0,
                 help="timed calls per tap and implementation (0: all of the tap's chunks)")
  p.add_argument("--impl", default="both", choices=("both", "new", "old"),
                 help="time both ablations, or one (a separate process per implementation "
                      "gives each one's peak memory)")
  p.add_argument("--skip-probe", action="store_true")
  args = p.parse_args(argv)

  shape = (args.size, args.size, 3)
  model = models.get_model(args.arch, args.classes)
  variables = jax.tree.map(np.asarray, models.init_model(model, jax.random.PRNGKey(0), shape))
  params, stats = variables["params"], variables.get("batch_stats", {})
  rng = np.random.default_rng(0)
  x = rng.normal(size=(args.images, *shape)).astype(np.float32)
  labels = (np.arange(args.images) % args.classes).astype(np.int32)
  weights = np.ones(args.images, np.float32)
  taps = delta.default_taps(args.arch, models.model_config(model))
  forward = jax.jit(lambda p, s, x: models.apply_model(model, p, s, x)[0])
  fwd = timed(forward, params, stats, x, repeats=3)
  print(f"{args.arch} {args.size}x{args.size}x3, {args.images} images, "
        f"{jax.devices()[0].platform}; one eval forward {1000 * fwd:.0f} ms of CPU time")
  print("| tap | channels | chunk | calls | suffix-only: CPU s/call | x forward, all channels | "
        "kernel mask: CPU s/call | x forward, all channels | speed-up |")
  print("|---|---|---|---|---|---|---|---|---|")
  flat = surgery.flatten(params)
  map_bytes = delta.tap_map_bytes(model, params, stats, shape, taps)
  totals = {"new": 0.0, "old": 0.0}
  for tap in taps:
    channels = flat[f"{tap}/conv/kernel"].shape[-1]
    chunk = delta.channel_chunk(channels, args.images, args.max_images, map_bytes[tap],
                                args.max_mb)
    calls = -(-channels // chunk)
    timed_calls = calls if args.calls <= 0 else min(calls, args.calls)
    masks = np.ones((chunk, channels), np.float32)
    masks[np.arange(chunk), np.arange(chunk)] = 0.0
    row = {}
    impls = {"new": delta.ablation_fn(model, tap), "old": kernel_ablation_fn(
        model, f"{tap}/conv/kernel")}
    for name, fn in impls.items():
      if args.impl not in ("both", name):
        continue
      per_call = timed(fn, params, stats, x, labels, weights, masks, repeats=timed_calls)
      row[name] = per_call
      totals[name] += per_call * calls
    fmt = lambda name: (f"{row[name]:.2f} | {row[name] * calls / fwd:.0f}" if name in row
                        else "- | -")
    speed = f"{row['old'] / row['new']:.1f}x" if len(row) == 2 else "-"
    print(f"| {tap} | {channels} | {chunk} | {calls} | {fmt('new')} | {fmt('old')} | {speed} |",
          flush=True)
  print("\nall taps: " + "; ".join(
      f"{label} {totals[k]:.1f} CPU s = {totals[k] / fwd:.0f} forwards"
      for k, label in (("new", "suffix-only"), ("old", "kernel mask")) if args.impl in ("both", k))
      + (f" ({totals['old'] / totals['new']:.1f}x)" if args.impl == "both" else ""))
  if not args.skip_probe:
    source = transfer.Source(args.arch, models.model_config(model), variables, shape,
                             (0.0,) * 3, (1.0,) * 3)
    target = transfer.target_model(source, args.classes)
    tparams, tstats = transfer.init_target(source, target, 0)
    images = rng.integers(0, 256, (args.images, *shape), dtype=np.uint8)
    config = delta.Config()
    probe = functools.partial(delta.train_probe_bn_train, target, tparams, tstats, images,
                              labels, source.mean, source.std)
    t0 = time.process_time()
    jax.block_until_ready(probe(dataclasses.replace(config, att_probe_loop=True)))
    loop = time.process_time() - t0
    t0 = time.process_time()
    jax.block_until_ready(probe(config))
    closed = time.process_time() - t0
    print(f"'authors' probe ({config.att_head_min_steps} steps, every batch all "
          f"{args.images} images): loop {loop:.1f} CPU s = {loop / fwd:.0f} forwards, closed form "
          f"{closed:.1f} CPU s = {closed / fwd:.1f} forwards")
  print(f"peak resident memory of this process: {peak_rss_gb():.2f} GB")


if __name__ == "__main__":
  from jtransfer.cli_process import prepare
  prepare()  # before the first compilation and the first step
  main()
