"""Parameter-pytree surgery addressed by path strings.

A path is the '/'-joined list of dict keys down to a leaf: `stage2/block0/conv1/conv/kernel`.
Every selection (freeze, regularise, prune, load, drop) is a list of regexes matched in full
against paths, as in big_vision's `schedule` and `model_load.dont_load`. A rule that matches
nothing is an error naming the rule, because a typo there silently changes an experiment.

Trees are nested dicts (Flax's 'params' / 'batch_stats'). Some module names contain '/', so
trees are rebuilt from tuple keys, never by splitting path strings.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import numpy as np
from flax import traverse_util

from jtransfer.errors import InputError

Tree = Mapping[str, Any]


def flatten(tree: Tree) -> dict[str, Any]:
  """{path string: leaf} in tree order."""
  return {"/".join(k): v for k, v in traverse_util.flatten_dict(_to_dict(tree)).items()}


def _flat_keys(tree: Tree) -> dict[tuple[str, ...], Any]:
  return traverse_util.flatten_dict(_to_dict(tree))


def _to_dict(tree):
  if isinstance(tree, Mapping):
    return {k: _to_dict(v) for k, v in tree.items()}
  return tree


def _unflatten(flat: dict[tuple[str, ...], Any]) -> dict:
  return traverse_util.unflatten_dict(flat) if flat else {}


def paths(tree: Tree) -> list[str]:
  """All leaf paths of `tree`."""
  return list(flatten(tree))


def _compile(patterns: Iterable[str], what: str) -> list[re.Pattern]:
  out = []
  for p in patterns:
    try:
      out.append(re.compile(p))
    except re.error as e:
      raise InputError(f"{what} rule {p!r} is not a valid regex: {e}") from None
  return out


def select(tree: Tree, patterns: Sequence[str], *, what: str = "selection",
           must_match: bool = True) -> list[str]:
  """Paths of `tree` matched in full by any of `patterns`.

  Raises:
    InputError: a pattern is invalid, or (with `must_match`) matches no path.
  """
  all_paths = paths(tree)
  compiled = _compile(patterns, what)
  if must_match:
    for pattern, rx in zip(patterns, compiled):
      if not any(rx.fullmatch(p) for p in all_paths):
        raise InputError(f"{what} rule {pattern!r} matches no parameter path; some paths: "
                         f"{_sample(all_paths)}")
  return [p for p in all_paths if any(rx.fullmatch(p) for rx in compiled)]


def _sample(items: Sequence[str], n: int = 8) -> str:
  shown = ", ".join(items[:n])
  return shown + (f", ... ({len(items)} in all)" if len(items) > n else "")


def mask(tree: Tree, patterns: Sequence[str], *, what: str = "selection") -> dict:
  """A bool tree shaped like `tree`: True where the path matches one of `patterns`."""
  chosen = set(select(tree, patterns, what=what))
  return _unflatten({k: "/".join(k) in chosen for k in _flat_keys(tree)})


def label_tree(tree: Tree, rules: Sequence[tuple[str, str]], *, what: str = "optimizer") -> dict:
  """Labels each leaf with the label of the first rule whose regex matches its path.

  Args:
    tree: parameters.
    rules: (regex, label) pairs, first match wins (e.g. `[('head/.*', 'head'), ('.*', 'frozen')]`).
    what: name used in error messages.

  Raises:
    InputError: a rule matches no path, or some path matches no rule (all are listed).
  """
  compiled = _compile([r for r, _ in rules], what)
  flat = _flat_keys(tree)
  used = [False] * len(rules)
  labels, unlabelled = {}, []
  for key in flat:
    path = "/".join(key)
    for i, rx in enumerate(compiled):
      if rx.fullmatch(path):
        labels[key], used[i] = rules[i][1], True
        break
    else:
      unlabelled.append(path)
  if unlabelled:
    raise InputError(f"{what} rules leave {len(unlabelled)} parameter(s) unlabelled: "
                     f"{_sample(unlabelled)}; add a catch-all rule such as ('.*', 'frozen')")
  unused = [rules[i][0] for i, u in enumerate(used) if not u]
  if unused:
    raise InputError(f"{what} rule(s) {unused} match no parameter path (earlier rules may "
                     f"shadow them); some paths: {_sample(list(map('/'.join, flat)))}")
  return _unflatten(labels)


def split(tree: Tree, selected: Tree) -> tuple[dict, dict]:
  """Splits `tree` by a bool tree into (selected leaves, the rest), each a sparse nested dict."""
  sel_flat = _flat_keys(selected)
  a, b = {}, {}
  for key, leaf in _flat_keys(tree).items():
    (a if sel_flat.get(key, False) else b)[key] = leaf
  return _unflatten(a), _unflatten(b)


def combine(*trees: Tree) -> dict:
  """Inverse of `split`: the union of disjoint sparse trees."""
  out: dict = {}
  for tree in trees:
    for key, leaf in _flat_keys(tree).items():
      if key in out:
        raise InputError(f"combine: path {'/'.join(key)!r} is in more than one tree")
      out[key] = leaf
  return _unflatten(out)


def merge_params(init: Tree, loaded: Tree, dont_load: Sequence[str] = (),
                 *, what: str = "checkpoint") -> dict:
  """Puts `loaded` values into a fresh `init` tree, like big_vision's `merge_params`.

  Paths matching `dont_load` keep their `init` value (and may be absent from, or extra in,
  `loaded`). Every other path must be in both trees with the same shape.

  Raises:
    InputError: listing every missing, unexpected and shape-mismatched path at once.
  """
  skip = _compile(dont_load, "dont_load")
  init_flat, loaded_flat = _flat_keys(init), _flat_keys(loaded)
  skipped = lambda k: any(rx.fullmatch("/".join(k)) for rx in skip)
  shape = lambda x: tuple(getattr(x, "shape", np.shape(x)))  # arrays or ShapeDtypeStructs
  missing = [k for k in init_flat if k not in loaded_flat and not skipped(k)]
  unexpected = [k for k in loaded_flat if k not in init_flat and not skipped(k)]
  mismatched = [k for k in init_flat if k in loaded_flat and not skipped(k)
                and shape(init_flat[k]) != shape(loaded_flat[k])]
  for pattern, rx in zip(dont_load, skip):
    if not any(rx.fullmatch("/".join(k)) for k in list(init_flat) + list(loaded_flat)):
      raise InputError(f"dont_load rule {pattern!r} matches no parameter path")
  if missing or unexpected or mismatched:
    lines = [f"{what} does not fit the model:"]
    lines += [f"  missing in {what}: {'/'.join(k)} {shape(init_flat[k])}" for k in missing]
    lines += [f"  not in model: {'/'.join(k)} {shape(loaded_flat[k])}" for k in unexpected]
    lines += [f"  shape: {'/'.join(k)} model {shape(init_flat[k])} vs {what} "
              f"{shape(loaded_flat[k])}" for k in mismatched]
    raise InputError("\n".join(lines))
  merged = {k: (v if skipped(k) or k not in loaded_flat else loaded_flat[k])
            for k, v in init_flat.items()}
  return _unflatten(merged)


def restrict_to(tree: Tree, template: Tree) -> dict:
  """Keeps only the paths of `tree` that `template` has (e.g. after truncating a model)."""
  keep = _flat_keys(template)
  return _unflatten({k: v for k, v in _flat_keys(tree).items() if k in keep})


def map_with_path(fn: Callable[[str, Any], Any], tree: Tree) -> dict:
  """tree_map with the leaf's path string as first argument."""
  return _unflatten({k: fn("/".join(k), v) for k, v in _flat_keys(tree).items()})


def count(tree: Tree) -> int:
  """Number of scalar entries in the tree's array leaves."""
  return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def conv_units(params: Tree) -> list[str]:
  """Paths of the conv units (modules with a `conv/kernel` of rank 4), in tree order."""
  return [p[:-len("/conv/kernel")] for p, v in flatten(params).items()
          if p.endswith("/conv/kernel") and np.ndim(v) == 4]


def filter_distances(params: Tree, start: Tree) -> dict[str, np.ndarray]:
  """Per conv unit of `start`, the L2 distance of each filter (output channel) of `params`
  from its value in `start` (DELTA's Fig. 3 measure). Units `params` lacks are skipped."""
  flat, ref = flatten(params), flatten(start)
  out = {}
  for unit in conv_units(start):
    k = f"{unit}/conv/kernel"
    if k in flat:
      diff = np.asarray(flat[k], np.float64) - np.asarray(ref[k], np.float64)
      out[unit] = np.sqrt(np.sum(diff.reshape(-1, diff.shape[-1]) ** 2, axis=0))
  return out


def mean_filter_distance(params: Tree, start: Tree) -> float:
  """The mean over every conv filter of `filter_distances` (one number per trained model)."""
  d = list(filter_distances(params, start).values())
  return float(np.concatenate(d).mean()) if d else float("nan")
