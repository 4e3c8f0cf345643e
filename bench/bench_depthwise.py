"""Depthwise convolutions on XLA:CPU: the grouped convolution against shifted sums.

  JAX_PLATFORMS=cpu python -m bench.bench_depthwise [--repeats 5] [--size 224] [--batch 64]

1. Layers: one depthwise conv of MobileNet / EfficientNet / ConvNeXt shapes, forward and
   gradient (w.r.t. input and kernel), as `lax.conv_general_dilated(feature_group_count=C)`
   and as `models.common.depthwise_conv`; median of `--repeats` calls, timed round-robin.
2. Models: the jitted eval forward of each depthwise backbone (`--archs`, random weights) at
   `--size` px and `--batch`, built once with DEPTHWISE_IMPL = 'conv' and once with 'shift';
   and the compact 28 px MobileNetV2 student of compact_transfer (COMPACT_CONFIGS) at batch
   128 (eval) and a train step at batch 50 (Adam, BN in train mode), as that experiment runs.
Writes a markdown table to stdout.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from bench.common import round_robin_medians
from jtransfer import models
from jtransfer.methods.distill import COMPACT_CONFIGS
from jtransfer.models import common
from jtransfer.train import adam, init_state, make_optimizer, make_train_step
from jtransfer.train.evaluate import cross_entropy

# (batch, height = width, channels, kernel, stride): MobileNetV2 224 px blocks 2, 4, 14,
# EfficientNet-B0's 5x5 at 14 px, ConvNeXt-T's 7x7 at stages 1 and 4.
LAYERS = ((64, 112, 96, 3, 2), (64, 56, 144, 3, 1), (64, 14, 576, 3, 1), (64, 14, 480, 5, 1),
          (64, 56, 96, 7, 1), (64, 7, 768, 7, 1), (1, 56, 144, 3, 1))
DEPTHWISE_ARCHS = ("mobilenet_v2", "mobilenet_v3_large", "mobilenet_v3_small",
                   "efficientnet_b0", "convnext_tiny")


def _grouped(x, k, stride, pad):
  return jax.lax.conv_general_dilated(x, k, (stride, stride), pad,
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                      feature_group_count=x.shape[-1])


def layer_table(layers, repeats: int) -> None:
  print("| N x H x W x C | kernel/stride | fwd conv ms | fwd shift ms | shift/conv | "
        "grad conv ms | grad shift ms | shift/conv |")
  print("|---|---|---|---|---|---|---|---|")
  g = np.random.default_rng(0)
  for n, h, c, k, s in layers:
    x = jnp.asarray(g.normal(size=(n, h, h, c)), jnp.float32)
    w = jnp.asarray(g.normal(size=(k, k, 1, c)), jnp.float32)
    pad = ((k // 2, k // 2), (k // 2, k // 2))
    calls = {}
    for name, f in (("conv", _grouped), ("shift", common.depthwise_conv)):
      fwd = jax.jit(lambda x, w, f=f: f(x, w, s, pad))
      grad = jax.jit(jax.grad(lambda x, w, f=f: jnp.sum(f(x, w, s, pad) ** 2), (0, 1)))
      calls[f"fwd_{name}"] = lambda fwd=fwd: fwd(x, w).block_until_ready()
      calls[f"grad_{name}"] = lambda grad=grad: jax.block_until_ready(grad(x, w))
    t = round_robin_medians(calls, repeats)
    ms = {key: 1000 * v for key, v in t.items()}
    print(f"| {n}x{h}x{h}x{c} | {k}x{k}/{s} | {ms['fwd_conv']:.1f} | {ms['fwd_shift']:.1f} | "
          f"{t['fwd_shift'] / t['fwd_conv']:.2f} | {ms['grad_conv']:.1f} | "
          f"{ms['grad_shift']:.1f} | {t['grad_shift'] / t['grad_conv']:.2f} |", flush=True)


def _with_impl(impl: str, build):
  """`build()` traced and compiled with DEPTHWISE_IMPL = impl (read at trace time)."""
  old = common.DEPTHWISE_IMPL
  common.DEPTHWISE_IMPL = impl
  try:
    return build()
  finally:
    common.DEPTHWISE_IMPL = old


def forward_call(model, shape, batch):
  v = models.init_model(model, jax.random.PRNGKey(0), shape)
  p, s = v["params"], v.get("batch_stats", {})
  x = jnp.asarray(np.random.default_rng(0).normal(size=(batch, *shape)), jnp.float32)
  compiled = jax.jit(lambda p, s, x: models.apply_model(model, p, s, x)[0]).lower(
      p, s, x).compile()
  return lambda: compiled(p, s, x).block_until_ready()


def train_call(model, shape, batch):
  v = models.init_model(model, jax.random.PRNGKey(0), shape)
  g = np.random.default_rng(0)
  batch_ = {"image": jnp.asarray(g.normal(size=(batch, *shape)), jnp.float32),
            "label": jnp.asarray(g.integers(0, 5, batch), jnp.int32)}

  def loss_fn(params, stats, b, rng):
    logits, new_stats, _ = models.apply_model(model, params, stats, b["image"], train=True,
                                              rng=rng)
    loss = cross_entropy(logits, b["label"])
    return loss, ({"ce": loss}, new_stats)

  opt = make_optimizer(v["params"], [(".*", "all")], {"all": adam(1e-3)})
  step = make_train_step(loss_fn, opt)
  state = [init_state(v["params"], v.get("batch_stats", {}), opt, 0)]

  def call():
    state[0], m = step(state[0], batch_)
    jax.block_until_ready(m)

  call()  # compile now, under this DEPTHWISE_IMPL
  return call


def model_table(archs, size: int, batch: int, repeats: int,
                student_batches: tuple[int, int] = (128, 50)) -> None:
  rows = [(f"{a} eval", lambda a=a: forward_call(models.get_model(a, 1000), (size, size, 3),
                                                 batch), f"{size} px, b{batch}")
          for a in archs]
  student = lambda: models.get_model("mobilenet_v2", 5, **COMPACT_CONFIGS["mobilenet_v2"])
  be, bt = student_batches
  rows += [("compact MobileNetV2 student eval", lambda: forward_call(student(), (28, 28, 1), be),
            f"28 px, b{be}"),
           ("compact MobileNetV2 student train step",
            lambda: train_call(student(), (28, 28, 1), bt), f"28 px, b{bt}")]
  print("\n| model | input | conv ms | shift ms | shift/conv |")
  print("|---|---|---|---|---|")
  for name, build, where in rows:
    calls = {impl: _with_impl(impl, build) for impl in ("conv", "shift")}
    t = round_robin_medians(calls, repeats)
    print(f"| {name} | {where} | {1000 * t['conv']:.1f} | {1000 * t['shift']:.1f} | "
          f"{t['shift'] / t['conv']:.2f} |", flush=True)


def main(argv=None) -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--repeats", type=int, default=5)
  p.add_argument("--size", type=int, default=224)
  p.add_argument("--batch", type=int, default=64)
  p.add_argument("--archs", default=",".join(DEPTHWISE_ARCHS))
  p.add_argument("--layers", default="all", help="'all', or 'none' to skip the layer table")
  p.add_argument("--student-batches", default="128,50",
                 help="eval and train-step batch sizes of the compact student rows")
  args = p.parse_args(argv)
  print(f"{jax.devices()[0].platform}, {jax.device_count()} device(s)\n")
  if args.layers != "none":
    layer_table(LAYERS, args.repeats)
  be, bt = (int(b) for b in args.student_batches.split(","))
  model_table([a for a in args.archs.split(",") if a], args.size, args.batch, args.repeats,
              (be, bt))


if __name__ == "__main__":
  from jtransfer.cli_process import prepare
  prepare()  # before the first compilation and the first step
  main()
