"""Path rules shared by the parameter-efficient methods (LoRA, SSF, norm tuning, partial tuning,
Conv-Adapter): which kernels a method touches, and how parameters group into blocks by depth.

Everything is decided from parameter PATHS, never from module classes, so the same rules serve
the CNNs of `jtransfer.models` (`stage1/block0/conv1/conv/kernel`, `conv1_1/conv/kernel`) and
transformers whose Dense kernels read `block3/attn/qkv/kernel`, `block3/mlp/fc1/kernel`.

Depth (partial tuning, layer-wise LR decay): a parameter belongs to the block named by the
first of `BLOCK_RULES` matching its path: the path prefix ending in a `blockN` component
(ResNet `stage2/block1`, a transformer's `block3`), else its top-level module (`stem`, VGG's
`conv2_1`, a transformer's `patch_embed`), else the top-level leaf itself (`cls_token`). Blocks
are ordered as the forward pass first calls a module inside them (`forward_order`, recorded by a
Flax method interceptor on an abstract forward; a top-level leaf such as `cls_token` belongs to
the root module, called first). The `head` is never a block: every method here trains it.
"""
from __future__ import annotations

import re
from typing import Any, Mapping, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jtransfer import surgery
from jtransfer.errors import InputError

HEAD_RULE = "head/.*"
BLOCK_RULES = (r"(.*?block\d+)/.*", r"([^/]+)/.*", r"([^/]+)")
# Transformers (Dense kernels under an 'attn' module) and CNNs (conv units) differ in which
# kernels a reparametrisation touches by default.
TRANSFORMER_HINT = re.compile(r"(.*/)?attn/.*kernel")


def is_transformer(params: Mapping[str, Any]) -> bool:
  """Whether the tree has attention kernels (`.../attn/.../kernel`), i.e. is a transformer."""
  return any(TRANSFORMER_HINT.fullmatch(p) for p in surgery.paths(params))


def select_kernels(params: Mapping[str, Any], rules: Sequence[str], what: str) -> list[str]:
  """Paths of rank-2 (Dense) or rank-4 (conv) kernels matched in full by `rules`, head excluded.

  Raises:
    InputError: a rule is not a regex, or the rules select no kernel.
  """
  flat = surgery.flatten(params)
  chosen = surgery.select(params, rules, what=what, must_match=False)
  kernels = [p for p in chosen if p.endswith("kernel") and np.ndim(flat[p]) in (2, 4)
             and not re.fullmatch(HEAD_RULE, p)]
  if not kernels:
    raise InputError(f"{what} rules {list(rules)} select no Dense or conv kernel (head "
                     f"excluded); some paths: {', '.join(list(flat)[:8])}")
  return kernels


def block_of(path: str) -> str:
  """The block a parameter path belongs to (see the module docstring)."""
  for rule in BLOCK_RULES:
    m = re.fullmatch(rule, path)
    if m:
      return m.group(1)
  raise AssertionError(path)  # the last rule matches any path without '/'


def forward_order(model: nn.Module, input_shape: Sequence[int]) -> list[str]:
  """Module paths ('/'-joined, '' for the root) in the order the forward first calls them
  (an abstract trace: nothing is computed)."""
  order: list[str] = []

  def record(next_fun, args, kwargs, context):
    path = "/".join(context.module.path)
    if context.method_name == "__call__" and path not in order:
      order.append(path)
    return next_fun(*args, **kwargs)

  def run():
    with nn.intercept_methods(record):
      return model.init(jax.random.PRNGKey(0), jnp.zeros((1, *input_shape)), train=False)

  jax.eval_shape(run)
  return order


def blocks(params: Mapping[str, Any], order: Sequence[str]) -> list[str]:
  """The model's blocks in forward order, head excluded: depth i is `blocks(...)[i]`.

  Args:
    params: the model's params (paths only).
    order: `forward_order` of the model.
  """
  first = {}
  for path in surgery.paths(params):
    if re.fullmatch(HEAD_RULE, path):
      continue
    b = block_of(path)
    module = path.rpartition("/")[0]
    # The first call of any module holding this param (its own module, or an ancestor when the
    # param belongs to the root, e.g. a class token).
    at = min((i for i, m in enumerate(order) if module == m or module.startswith(m + "/")
              or m == ""), default=len(order))
    calls = [i for i, m in enumerate(order) if m == module]
    first[b] = min(first.get(b, len(order)), calls[0] if calls else at)
  return sorted(first, key=lambda b: first[b])


def depth_groups(params: Mapping[str, Any], order: Sequence[str]
                 ) -> tuple[list[tuple[str, ...]], tuple[str, ...]]:
  """(groups by depth, tail): the unit of depth for partial tuning and LR decay.

  In a model with numbered blocks (`...blockN`), what comes before the first one is one group
  (ResNet's stem; a ViT's cls_token, pos_embed and patch_embed: BEiT's layer 0), each block and
  anything between blocks is its own group, and what comes after the last one (a ViT's final
  norm) is the tail, which trains with the head (BEiT gives it the head's layer id). Without
  numbered blocks (VGG) every block is a group and the tail is empty.
  """
  names = blocks(params, order)
  numbered = [i for i, b in enumerate(names) if re.fullmatch(r".*block\d+", b)]
  if not numbered:
    return [(b,) for b in names], ()
  first, last = numbered[0], numbered[-1]
  lead = [tuple(names[:first])] if first else []
  return lead + [(b,) for b in names[first:last + 1]], tuple(names[last + 1:])


def group_rule(group: Sequence[str]) -> str:
  """The regex matching every parameter path of the blocks in `group`."""
  return "|".join(f"(?:{block_rule(b)})" for b in group)


def block_rule(block: str) -> str:
  """The regex matching every parameter path of `block` (as `block_of` assigns them)."""
  return re.escape(block) + "(/.*)?"


def module_io_shapes(model: nn.Module, input_shape: Sequence[int], rule: str,
                     what: str) -> dict[str, tuple[tuple, tuple]]:
  """{module path: (input shape, output shape)} at batch 1 of every module whose path matches
  `rule` in full (its first call; an abstract trace).

  Raises:
    InputError: no module matches (`what` names the method in the message).
  """
  shapes: dict = {}

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    path = "/".join(context.module.path)
    if context.method_name == "__call__" and re.fullmatch(rule, path) and path not in shapes:
      shapes[path] = (tuple(args[0].shape), tuple(out.shape))
    return out

  def run():
    with nn.intercept_methods(record):
      return model.init(jax.random.PRNGKey(0), jnp.zeros((1, *input_shape)), train=False)

  jax.eval_shape(run)
  if not shapes:
    raise InputError(f"{what}: no module path of {type(model).__name__} matches {rule!r}")
  return shapes


def on_module_outputs(by_path: Mapping[str, Any], transform):
  """A Flax method interceptor rewriting the `__call__` output of the modules named in `by_path`.

  Args:
    by_path: module path ('stage1/block0', 'block3/mlp') -> that module's entry (the added
      params it uses).
    transform: (entry, module, the call's first input, its output) -> the new output.

  Every method that adds a computation at a module's output (SSF, Conv-Adapter, the
  transformer adapters, LoRA's branch form) finds its modules the same way: by path, never by
  class, so one rule serves CNNs and transformers.
  """
  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    path = "/".join(context.module.path)
    if context.method_name != "__call__" or path not in by_path:
      return out
    return transform(by_path[path], context.module, args[0], out)
  return interceptor
