"""Cost of DELTA against plain fine-tuning, and of its attention precompute.

  JAX_PLATFORMS=cpu python -m bench.bench_delta [--arch resnet_s] [--batch 64] [--repeats 20]

Prints median train-step times (resnet_s, 28x28x1, batch 64 by default), measured round-robin,
of the registered 'finetune' strategy (Adam, BN running stats), 'l2' (SGD + weight decay, BN
batch stats: DELTA's training mode without a regulariser), 'l2sp', 'delta_noatt' and 'delta',
each relative to both baselines ('/live': the source maps recomputed by a source forward every
step instead of looked up from the run's table); then the attention precompute (L2-FE probe +
per-channel ablation of every tapped channel) on `--att-images` training images, cold (with
compilation) and warm, relative to one eval forward pass over the same images. Weights are
random: the timings do not depend on them.
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np

from bench.common import round_robin_medians
from jtransfer import models
from jtransfer.methods import delta, transfer
from jtransfer.train import init_state, make_train_step


def random_source(arch: str, shape=(28, 28, 1), classes: int = 5) -> transfer.Source:
  model = models.get_model(arch, classes)
  variables = jax.tree.map(np.asarray, models.init_model(model, jax.random.PRNGKey(0), shape))
  return transfer.Source(arch, models.model_config(model), variables, shape, (0.3,), (0.3,))


def median_time(fn, repeats: int) -> float:
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def make_step(source, name: str, images, labels, config=None) -> callable:
  """A closure running one compiled train step of strategy `name` (3 warm-up steps done),
  with DELTA's `config` knob when given."""
  setup = transfer.get_strategy(name).build(source, 5, 1000,
                                            **({"config": config} if config else {}))
  params, stats = setup.init(0, images, labels)
  step = make_train_step(setup.loss_fn, setup.optimizer)
  box = [init_state(params, stats, setup.optimizer, 0, 0.01)]
  batch = {"image": images, "label": labels}

  def one():
    box[0], m = step(box[0], batch)
    jax.block_until_ready(m["loss"])

  for _ in range(3):
    one()
  return one


def step_times(source, names, images, labels, repeats: int) -> dict[str, float]:
  """Median step time per strategy, measured round-robin so load changes hit all alike.

  'NAME/live' is NAME with the source maps recomputed every step (no per-run table).
  """
  steps = {}
  for name in names:
    base, _, live = name.partition("/")
    config = delta.Config(source_cache_mb=0.0) if live else None
    steps[name] = make_step(source, base, images, labels, config)
  return round_robin_medians(steps, repeats, warmup=0)  # make_step warmed each up


def attention_times(source, images, labels, repeats: int) -> dict:
  model = transfer.target_model(source, 5)
  taps = delta.resolve_taps(source, model, delta.Config())
  computer = delta.AttentionComputer(source, model, taps, delta.Config())
  # Cold: nothing compiled yet (the step timings above compiled the same functions).
  for cached in (delta.ablation_fn, delta._probe_step, delta._features_fn):  # noqa: SLF001
    cached.cache_clear()
  delta._ATTENTION_CACHE.clear()  # noqa: SLF001
  t0 = time.perf_counter()
  computer(images, labels)
  cold = time.perf_counter() - t0
  delta._ATTENTION_CACHE.clear()  # noqa: SLF001 (time the computation, not the cache)
  t0 = time.perf_counter()
  weights = computer(images, labels)
  warm = time.perf_counter() - t0
  forward = transfer.eval_forward(model, source.mean, source.std)
  params, stats = transfer.init_target(source, model, 0)
  jax.block_until_ready(forward(params, stats, images))
  fwd = median_time(lambda: jax.block_until_ready(forward(params, stats, images)), repeats)
  channels = sum(len(w) for w in weights.values())
  return dict(cold=cold, warm=warm, forward=fwd, channels=channels, taps=list(taps))


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--arch", default="resnet_s")
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--repeats", type=int, default=20)
  p.add_argument("--att-images", type=int, default=128)
  p.add_argument("--strategies",
                 default="finetune,l2,l2sp,delta_noatt,delta,delta_noatt/live,delta/live",
                 help="comma list; NAME/live recomputes the source maps every step")
  args = p.parse_args(argv)
  source = random_source(args.arch)
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (args.batch, 28, 28, 1), dtype=np.uint8)
  labels = (np.arange(args.batch) % 5).astype(np.int32)
  print(f"{args.arch} 28x28x1 batch {args.batch}, median of {args.repeats} steps, "
        f"{jax.devices()[0].platform}")
  times = step_times(source, args.strategies.split(","), images, labels, args.repeats)
  print("| strategy | ms/step | x finetune | x l2 |")
  print("|---|---|---|---|")
  for name, t in times.items():
    rel = lambda base: f"{t / times[base]:.2f}" if base in times else "-"
    print(f"| {name} | {1000 * t:.1f} | {rel('finetune')} | {rel('l2')} |")
  att_images = rng.integers(0, 256, (args.att_images, 28, 28, 1), dtype=np.uint8)
  att_labels = (np.arange(args.att_images) % 5).astype(np.int32)
  a = attention_times(source, att_images, att_labels, args.repeats)
  print(f"\nattention on {args.att_images} images, {a['channels']} channels of {a['taps']}:")
  print(f"  cold (with compilation) {a['cold']:.2f} s, warm {a['warm']:.2f} s; one eval forward "
        f"{1000 * a['forward']:.1f} ms; warm / forward = {a['warm'] / a['forward']:.0f}x "
        f"({a['channels']} ablations + the probe)")


if __name__ == "__main__":
  from jtransfer.cli_process import prepare
  prepare()  # before the first compilation and the first step
  main()
