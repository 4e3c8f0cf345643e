"""Channel groups of the inverted-residual family (jtransfer.models.mobilenet) for `prune`.

Couplings, per block (expand 1x1 -> depthwise -> SE -> project 1x1):
  * a depthwise conv maps channel k to channel k, so its outputs are its input's channels: it
    joins its producer's group as a *unit* (its (k, k, 1, C) kernel sliced on the output axis,
    its `groups` following the sliced width), never as a consumer. The producer is the
    block's `expand` unit, or, without one, whatever feeds the block (stem or residual stream);
  * SE's `fc2` writes the gate that multiplies those same channels: a unit of the group; SE's
    `fc1` reads them: a consumer. Its own output (the squeeze width) is a free group read by
    `fc2`;
  * `project` reads the group; its output opens a new group, or, in a residual block, is
    summed into its input's channels: it joins that (residual) group, as ResNet stages do.
A channel is removed only when every unit of its group drops it (`prune.group_masks`): then
the depthwise channel, its gate product and every summand are exactly zero in the masked net,
so the pruned net computes what the masked one does.

SE and CWL. The SE convs are conv units, so CWL gives them scales like any conv (exact either
way): sigma on `fc1` is a gain on a squeeze unit (sigma 0 removes it: a genuine prunable
channel), sigma on `fc2` a gain on the gate's logit (sigma 0 makes the gate a constant 0.5
(hardsigmoid, sigmoid), not a dead channel). So `fc2`'s |sigma| is a weak importance score; it
still votes in its group, which is the conservative choice: a channel goes only when expand,
depthwise and `fc2` all fall below tau. (The depthwise scale alone would be enough for
exactness, since the depthwise conv is the only reader of the expand channel.)

Config keys are ('paths', path, ...): every nested config entry to set to the kept count,
e.g. ('blocks', 3, OUT) for block 4's output width.
"""
from __future__ import annotations

from jtransfer.methods.prune_graph import Group
from jtransfer.models.mobilenet import EXPAND, OUT, SE


def groups(flat: dict, config: dict) -> list:
  """The prunable channel groups of a MobileNet / EfficientNet params tree (`flat`) and config."""
  has = lambda unit: f"{unit}/conv/kernel" in flat
  stream = Group("stem", ["stem"], [], ("paths", ("stem_width",)))
  out = [stream]
  for i, b in enumerate(config["blocks"]):
    name = f"block{i + 1}"
    if not has(f"{name}/dw"):
      break  # truncated before this block
    feed = stream
    if b[EXPAND]:
      feed.consumers.append(("conv", f"{name}/expand"))
      inner = Group(f"{name}/expand", [f"{name}/expand"], [], ("paths", ("blocks", i, EXPAND)))
      out.append(inner)
    else:
      inner = feed
    inner.units.append(f"{name}/dw")
    if b[SE]:
      inner.units.append(f"{name}/se/fc2")
      inner.consumers.append(("conv", f"{name}/se/fc1"))
      out.append(Group(f"{name}/se/fc1", [f"{name}/se/fc1"], [("conv", f"{name}/se/fc2")],
                       ("paths", ("blocks", i, SE))))
    inner.consumers.append(("conv", f"{name}/project"))
    if b[5]:  # residual: project writes into its input's channels
      feed.units.append(f"{name}/project")
      feed.residual = True
      feed.config_key = feed.config_key + (("blocks", i, OUT),)
    else:
      stream = Group(f"{name}/project", [f"{name}/project"], [], ("paths", ("blocks", i, OUT)))
      out.append(stream)
  dense = "fc1" if config.get("hidden_width") and "fc1/kernel" in flat else "head"
  if has("top"):
    stream.consumers.append(("conv", "top"))
    out.append(Group("top", ["top"], [("gap", dense)], ("paths", ("top_width",))))
  else:
    stream.consumers.append(("gap", "head" if config.get("truncate_after") else dense))
  return out


def set_width(config: dict, key: tuple, n: int) -> None:
  """Sets every config entry named by a ('paths', ...) key to `n` (edits `config`)."""
  config["blocks"] = [list(b) for b in config["blocks"]]
  for path in key[1:]:
    target = config
    for k in path[:-1]:
      target = target[k]
    target[path[-1]] = n
