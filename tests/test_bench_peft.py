"""bench.bench_peft end to end at tiny sizes: every row's trained-parameter count against a hand
formula over the target model's parameter tree, the memory columns against their definition,
and the CLI's report and refusals."""
import re

import jax
import numpy as np
import pytest

from bench import bench_peft
from experiments.peft_table import ARMS
from jtransfer import models, surgery
from jtransfer.errors import InputError
from jtransfer.methods import transfer

# Narrow models: the bench's cost is one compile per (arch, strategy).
TINY = {"resnet_s": dict(stage_widths=(8, 8, 16), stem_width=8),
        "vgg_s": dict(conv_widths=((4, 4), (6, 6), (8, 8)), dense_widths=(8,)),
        "vit_s28": dict(dim=16, depth=2, heads=2)}


def _plain_tree(arch):
  """The target model's own params (the source cut to its transfer model, new head)."""
  src = bench_peft.source(arch, TINY[arch])
  setup = transfer.get_strategy("freeze").build(src, bench_peft.CLASSES, 3)
  return surgery.flatten(models.abstract_variables(setup.model, bench_peft.SHAPE)["params"])


def _hand_count(arch, strategy, flat):
  """Each strategy's trained entries at its default knobs, written out from the method papers'
  definitions (not from `peft_cost` or the methods' own `trained_count`)."""
  size = lambda paths: int(sum(np.prod(flat[p].shape) for p in paths))
  head = size(["head/kernel", "head/bias"])
  body = [p for p in flat if not p.startswith("head/")]
  kernels = [p for p in body if p.endswith("kernel")]
  convs = [p for p in kernels if len(flat[p].shape) == 4]
  channels = sum(flat[p].shape[-1] for p in convs)  # CWL / FiLM: one unit per conv channel
  under = lambda *prefixes: size([p for p in body if p.startswith(prefixes)])
  vit = arch == "vit_s28"
  dim, depth = (TINY[arch]["dim"], TINY[arch]["depth"]) if vit else (0, 0)
  if arch == "resnet_s":
    first, last = ("stem/",), ("stage3/block1/",)
  elif arch == "vgg_s":
    first, last = ("conv1_1/",), ("conv3_2/",)
  else:  # BEiT's depth groups: the embeddings are block 0; the final norm trains with the head
    first, last = ("cls_token", "pos_embed", "patch_embed/", "norm/"), (f"block{depth - 1}/",
                                                                         "norm/")

  def lora(rank=4):  # r * (rows + columns) of each adapted kernel's matrix view
    rule = r"block\d+/attn/(qkv|proj)/kernel" if vit else r".*/conv/kernel"
    mats = [flat[p].shape for p in kernels if re.fullmatch(rule, p)]
    return rank * sum(int(np.prod(s[:-1])) + s[-1] for s in mats)

  def conv_adapter(reduction=4):  # depthwise 3x3 (no bias), 1x1 down and 1x1 up with biases
    total = 0
    for block in sorted({p.rsplit("/conv1/", 1)[0] for p in convs if "/conv1/" in p}):
      ci = flat[f"{block}/conv1/conv/kernel"].shape[2]
      co = flat[f"{block}/conv2/conv/kernel"].shape[3]
      h = int(co // reduction)
      total += 9 * ci + ci * h + h + h * co + co
    return total

  adapter = depth * (2 * dim * (dim // 8) + dim // 8 + dim)  # h = D / 8 on each block's MLP
  want = {
      "finetune": size(body), "finetune_lrd": size(body), "freeze": 0,
      "bitfit": size([p for p in body if p.endswith("/bias")]),
      "freeze_cwl": channels, "freeze_film": 2 * channels, "finetune_cwl": size(body) + channels,
      "ssf": 2 * sum(flat[p].shape[-1] for p in kernels),
      "norm_tune": 2 * size([p for p in body if p.endswith("scale")]),
      "lora": lora(), bench_peft.LORA_BRANCH: lora(), "conv_adapter": conv_adapter(),
      "last_k": under(*last), "surgical": under(*first),
      "houlsby": adapter, "adaptformer": adapter,
      "vpt_shallow": 10 * dim, "vpt_deep": depth * 10 * dim}
  return want[strategy] + head


def _check_rows(rows, pairs):
  """Rows in the bench's order; counts by hand; memory fields as their definition says."""
  assert [(r.arch, r.strategy) for r in rows] == pairs
  trees = {arch: _plain_tree(arch) for arch, _ in pairs}
  for r in rows:
    assert r.trained_params == _hand_count(r.arch, r.strategy, trees[r.arch]), (r.arch, r.strategy)
    m = r.memory
    assert m["argument"] > 0 and m["temp"] >= 0 and 0 <= m["alias"] <= m["output"]
    assert r.peak_bytes == m["argument"] + m["output"] - m["alias"] + m["temp"]
    # The state is donated: the new state's params and optimiser state reuse its buffers.
    assert m["alias"] > 0, (r.arch, r.strategy)
  base = {r.arch: r for r in rows if r.strategy == "finetune"}
  for r in rows:
    if r.strategy in ("freeze_cwl", "bitfit", "houlsby", "vpt_deep", "norm_tune"):
      # Fewer trained params, so less optimiser state among the step's arguments.
      assert r.memory["argument"] < base[r.arch].memory["argument"], (r.arch, r.strategy)


def _table_rows(text):
  """{(arch, strategy): trained params} read back from the markdown report."""
  out, arch = {}, None
  for line in text.splitlines():
    if line.startswith("## "):
      arch = line.split()[1]
    elif line.startswith("| ") and not line.startswith(("| strategy", "|---")):
      cells = [c.strip() for c in line.strip("|").split("|")]
      out[(arch, cells[0])] = int(cells[3].replace(",", ""))
  return out


@pytest.fixture
def tiny_sources(monkeypatch):
  """The CLI's sources narrowed (`TINY`): its cost is one compile per (arch, strategy)."""
  full = bench_peft.source
  monkeypatch.setattr(bench_peft, "source", lambda arch, overrides=(), seed=0: full(
      arch, TINY[arch], seed))


# 93 s on the loaded suite (one compile per family and arm); test_rows_memory_and_order_on_tiny_models
# covers the rows and the memory fields in the default suite
@pytest.mark.slow
def test_cli_end_to_end_on_tiny_models(tmp_path, tiny_sources):
  out = tmp_path / "PEFT.md"
  argv = ["--strategies", "bitfit", "--batch", "2", "--repeats", "1", "--warmup", "0",
          "--out", str(out)]
  assert bench_peft.main(argv) == 0
  text = out.read_text()
  assert text.splitlines()[2] == f"`python -m bench.bench_peft {' '.join(argv)}`"
  assert "Load average" in text and text.count(" | 1.00 | ") >= 3  # each finetune to itself
  counts = _table_rows(text)
  assert sorted(counts) == sorted((a, s) for a in bench_peft.ARCHS for s in ("finetune", "bitfit"))
  for (arch, strategy), n in counts.items():
    assert n == _hand_count(arch, strategy, _plain_tree(arch)), (arch, strategy)


def test_rows_memory_and_order_on_tiny_models():
  config = bench_peft.BenchConfig(archs=("vit_s28",), batch=2, repeats=0,
                                  strategies=("norm_tune",), model_overrides=TINY)
  rows = bench_peft.measure(config)
  _check_rows(rows, [("vit_s28", "finetune"), ("vit_s28", "norm_tune")])
  assert all(r.step_s is None for r in rows)
  assert "| norm_tune | - | - |" in bench_peft.report(config, rows, "cmd", "")
  assert config.arms("vit_s28") == ("finetune", "norm_tune")
  assert bench_peft.BenchConfig(strategies=("lora",)).arms("vgg_s") == (
      "finetune", "lora", bench_peft.LORA_BRANCH)


@pytest.mark.slow  # ~40 compiles: every arm of every family
def test_every_arm_of_every_family_counts_what_the_formulas_say():
  config = bench_peft.BenchConfig(batch=2, repeats=1, warmup=0, model_overrides=TINY)
  rows = bench_peft.measure(config)
  assert {r.strategy for r in rows} == {s for a in ARMS.values() for s in a} | {
      bench_peft.LORA_BRANCH}
  _check_rows(rows, [(a, s) for a in config.archs for s in config.arms(a)])
  assert all(r.step_s > 0 for r in rows)


def test_cli_refuses_bad_input(capsys):
  for bad, what in [(["--archs", "resnet50"], "--archs"),
                    (["--archs", "vgg_s", "--strategies", "norm_tune"], "do not apply"),
                    (["--batch", "0"], "--batch")]:
    assert bench_peft.main(bad) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and what in err and err.count(".") <= 1
  with pytest.raises(InputError, match="--archs"):
    bench_peft.check(bench_peft.BenchConfig(archs=()))


SMALL_VIT = dict(arch="vit_s28", shape=(28, 28, 1), overrides=TINY["vit_s28"])
SMALL_TIMM = dict(img_size=28, patch_size=4, embed_dim=16, depth=2, num_heads=2)


# 29 s on the loaded suite; bench/VIT.md's ViT-B/16 rows come from this path
@pytest.mark.slow
def test_vit_b16_memory_path_on_a_small_vit():
  """bench_vit --b16's memory path (an abstract-input compile, no step run) on a narrow
  vit_s28: bfloat16 compute keeps params and Adam state in float32, so the step's arguments
  are byte for byte the same size in both dtypes."""
  from bench import bench_vit
  rows = bench_vit.b16_measure(2, 0, **SMALL_VIT)
  assert set(rows) == {"float32", "bfloat16"} and all(t is None for _, t in rows.values())
  f32, bf16 = rows["float32"][0], rows["bfloat16"][0]
  assert f32["argument"] == bf16["argument"] > 0 and f32["temp"] > 0


@pytest.mark.slow  # four more compiles
def test_vit_b16_timed_path_on_a_small_vit():
  from bench import bench_vit
  memory_only = bench_vit.b16_measure(2, 0, **SMALL_VIT)
  timed = bench_vit.b16_measure(2, 1, timm_args=SMALL_TIMM, **SMALL_VIT)
  for dtype, (m, t) in memory_only.items():
    assert m == timed[dtype][0] and timed[dtype][1] > 0  # same step, abstract or concrete
  # timm's same step beside them: timed, no XLA memory
  assert {k: m for k, (m, t) in timed.items() if k.startswith("timm")} == \
      {"timm float32": None, "timm bfloat16 (autocast)": None}
  assert all(t > 0 for _, t in timed.values())
  text = bench_vit.b16_report(2, 0, ["--b16"], **SMALL_VIT)
  assert "| float32 | - | - |" in text and "`python -m bench.bench_vit --b16`" in text
  assert "timm" not in text  # memory only: nothing timed, no timm rows


def test_timm_step_trains_the_same_graph():
  """timm's side of the B/16 table on the small graph: one step changes the weights (Adam ran)
  and the model has the JAX arch's parameter count (the same graph on both sides)."""
  import torch

  from bench import bench_vit
  tm, calls = bench_vit.timm_calls(2, SMALL_VIT["shape"], SMALL_TIMM, threads=1)
  before = [p.detach().clone() for p in tm.parameters()]
  calls["timm float32"]()
  after = list(tm.parameters())
  assert any(not torch.equal(a, b) for a, b in zip(before, after))
  model = models.get_model("vit_s28", 1000, **SMALL_VIT["overrides"])
  variables = models.init_model(model, jax.random.PRNGKey(0), SMALL_VIT["shape"])
  assert sum(p.numel() for p in after) == sum(
      int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"]))


def test_vit_parts_report_on_a_tiny_batch():
  """bench.bench_vit_parts end to end at batch 2: every op timed in JAX (and in torch where it
  has a counterpart); its two JAX attention ops compute numpy's attention."""
  from bench import bench_vit_parts
  text = bench_vit_parts.report("vit_s28", 2, 1, 1, ["--batch", "2"])
  rows = {line.split(" | ")[0][2:]: line.split(" | ")[1:] for line in text.splitlines()
          if line.startswith("| ") and not line.startswith("| op")}
  assert set(rows) == {"qkv", "proj", "fc1", "fc2", "attention", "attention_einsum", "gelu",
                       "layernorm", "block"}
  assert all(float(r[0]) > 0 for r in rows.values())
  assert rows["attention_einsum"][1] == "-" and float(rows["block"][1]) > 0
  rng = np.random.default_rng(0)
  q, k, v = (rng.normal(size=(2, 50, 3, 32)).astype(np.float32) for _ in range(3))
  logits = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(32)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  want = np.einsum("bhqk,bkhd->bqhd", p / p.sum(-1, keepdims=True), v)
  for got in (jax.nn.dot_product_attention(q, k, v, scale=32 ** -0.5),
              bench_vit_parts.einsum_attention(q, k, v)):
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
