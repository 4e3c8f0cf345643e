"""The benchmark code runs on a tiny setting (timings are not tested)."""
import numpy as np
import pytest

from jtransfer.data.preprocess import normalize

from bench import run


@pytest.mark.slow
def test_bench_runs_tiny(tmp_path):
  out = tmp_path / "r.md"
  assert run.main(["--tiny", "--archs", "vgg_s", "--out", str(out)]) == 0
  text = out.read_text()
  for strategy in run.STRATEGIES:
    assert f"| vgg_s | {strategy} |" in text


@pytest.mark.slow
def test_bench_pruning_runs_tiny(tmp_path):
  from bench import bench_pruning
  out = tmp_path / "p.md"
  assert bench_pruning.main(["--keep", "0.5", "--runs", "1", "--batches", "2", "--shape",
                             "16,16,1", "--out", str(out)]) == 0
  text = out.read_text()
  for row in ("| vgg_s | unpruned |", "| vgg_s | channels, x8 |", "| vgg_s | fc neurons |",
              "| resnet_s | channels, x1 |"):
    assert row in text


def test_bench_grid_runs_tiny(tmp_path, tiny_source_dir):
  """Both arms of the protocol grid run the same runs; on a tiny grid they agree run by run."""
  from bench import bench_grid
  out = tmp_path / "g.md"
  assert bench_grid.main(["--archs", "vgg_s", "--targets", "digits", "--shots", "1",
                          "--tune-repeats", "1", "--tune-extend", "0", "--steps", "4",
                          "--patience", "2", "--eval-every", "2", "--val-per-class", "3",
                          "--test-per-class", "3", "--torch-threads", "1",
                          "--source", "ckpt:" + tiny_source_dir("vgg_s"), "--out", str(out)]) == 0
  text = out.read_text()
  assert text.startswith("# Table I grid wall time under the protocol\n\n```\n"
                         "python -m bench.bench_grid --archs vgg_s")
  # 4 LRs x 1 tuning draw + 1 evaluation run at the chosen LR, per strategy, in both arms.
  assert "| jtransfer (`cwl_tables`, Freeze on cached features) | 10 (8 + 2) |" in text
  assert "| PyTorch loop (full forward every step, one run at a time) | 10 (8 + 2) |" in text
  assert "| evaluation runs, each arm at its own chosen LR: test accuracy | 2 |" in text
  assert "| tuning runs, same draw and LR: validation accuracy | 8 |" in text
  assert "Chosen LR equal in 2/2 cells" in text and "Failed runs: jtransfer 0, torch 0." in text


def test_bench_grid_config_is_the_cwl_tables_command():
  """The typed config of bench_grid's flags gives the cwl_tables flags a user would type, and
  the report's command-line texts; a bad flag is one sentence and exit code 2, before
  anything runs."""
  from bench import bench_grid, grid_jax
  from jtransfer.errors import InputError
  config = bench_grid.parse(["--shots", "1,5", "--paper-grid"])
  assert config.shots == (1, 5) and config.archs == ("vgg_s", "resnet_s")
  assert (config.text("shots"), config.text("targets")) == ("1,5", "fmnist:1,5,7,8,9;digits")
  assert grid_jax.grid_argv(config, ("digits",), "o") == [
      "--arch", "vgg_s,resnet_s", "--shots", "1,5", "--repeats", "1", "--tune-repeats", "2",
      "--tune-extend", "2", "--steps", "1000", "--patience", "200", "--eval-every", "10",
      "--val-per-class", "20", "--strategies", "freeze,freeze_cwl", "--lrs", "paper",
      "--test-per-class", "300", "--batch-size", "64", "--source", "fmnist:0,2,3,4,6",
      "--source-epochs", "2.0", "--seed", "0", "--paper-grid", "--bn", "frozen", "--out", "o",
      "--overwrite", "--quiet", "--target", "digits"]
  # the PyTorch arm's typed Config is the one the runner's CLI edge makes of that command
  from jtransfer.study import flags
  argv = grid_jax.grid_argv(config, ("digits",), "o", feature_cache=False)
  assert flags.parse(grid_jax.STUDY, argv) == grid_jax.study_config(config, ("digits",), "o",
                                                                    feature_cache=False)
  for bad, match in ((["--paths", "jtransfer,gpu"], "unknown path 'gpu'"),
                     (["--shots", "1,x"], "comma list of integers"),
                     (["--torch-threads", "0"], "'auto' or an integer >= 1")):
    with pytest.raises(InputError, match=match):
      bench_grid.parse(bad)
  assert bench_grid.main(["--paths", "gpu"]) == 2


def test_bench_grid_cwl_twin_is_torch_refs_cwl_net():
  """torch_twin.with_cwl puts the scale layers where torch_ref's cwl=True nets have them (same
  state-dict names), and the copy computes sigma * unit output (after BN where there is one)."""
  import copy

  import torch
  from bench import torch_ref, torch_twin
  for arch in ("vgg_s", "resnet_s"):
    torch.manual_seed(0)
    plain = torch_ref.make(arch, (28, 28, 1), 5).eval()
    twin = torch_twin.with_cwl(plain)
    assert list(twin.state_dict()) == list(torch_ref.make(arch, (28, 28, 1), 5,
                                                          cwl=True).state_dict())
    folded = copy.deepcopy(plain)  # sigma folded into the conv (no BN) or the BN affine
    with torch.no_grad():
      for name, unit in folded.named_modules():
        if isinstance(unit, torch.nn.Sequential) and isinstance(unit[0], torch.nn.Conv2d):
          sigma = next(m for m in twin.get_submodule(name)
                       if isinstance(m, torch_ref.Scale)).sigma
          sigma.uniform_(0.5, 1.5)
          bn = isinstance(unit[1], torch.nn.BatchNorm2d)
          unit[int(bn)].weight.mul_(sigma if bn else sigma.view(-1, 1, 1, 1))
          unit[int(bn)].bias.mul_(sigma)
      x = torch.randn(3, 1, 28, 28)
      torch.testing.assert_close(twin(x), folded(x), rtol=1e-4, atol=1e-5)


def test_torch_resnet50_reference_is_torchvisions_net():
  """Same parameter count as jtransfer's resnet50 (torchvision's 25,557,032), and it steps."""
  import jax
  import torch
  from bench import torch_ref
  from jtransfer import models
  net = torch_ref.make("resnet50", (32, 32, 3), 1000)
  n_torch = sum(p.numel() for p in net.parameters())
  v = jax.eval_shape(lambda: models.init_model(models.get_model("resnet50", 1000),
                                               jax.random.PRNGKey(0), (32, 32, 3)))
  n_jax = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(v["params"]))
  assert n_torch == n_jax == 25_557_032
  step = torch_ref.make_step("resnet50", "finetune", (32, 32, 3), 2, device="cpu", bf16=True)
  assert torch.isfinite(step())
  assert len(torch_ref.time_step(step, 0, 1, 1)) == 1


@pytest.mark.slow  # 20 s, its own compiles; like the other bench smokes
def test_bench_pool_runs_tiny(tmp_path):
  from bench import bench_pool
  from jtransfer.models import common, vgg
  out = tmp_path / "pool.md"
  assert bench_pool.main(["--tiny", "--strategies", "finetune", "--out", str(out)]) == 0
  text = out.read_text()
  assert "| finetune | nn.max_pool" in text and "| finetune | models.common.max_pool" in text
  assert vgg.max_pool is common.max_pool  # the swap is undone


@pytest.mark.slow
def test_bench_convs_runs_tiny(tmp_path):
  from bench import bench_convs
  # The interceptor finds every conv of the net with its real input shape.
  configs = bench_convs.conv_configs("vgg_s", 2)
  assert [c[0] for c in configs[:2]] == [(2, 28, 28, 1), (2, 28, 28, 32)]
  assert len(configs) == 6 and all(c[1][:2] == (3, 3) for c in configs)
  out = tmp_path / "convs.md"
  assert bench_convs.main(["--tiny", "--archs", "vgg_s", "--out", str(out)]) == 0
  text = out.read_text()
  assert "| vgg_s | finetune |" in text and "| vgg_s | freeze_cwl |" in text
  assert "| vgg_s | 4x28x28x32 | 3x3x32x32 | 1 | 1 |" in text
  # the filter gradient before (XLA's) and after (the model's pick for its six 3x3 layers:
  # the native kernel where it is built for the five with 32+ channels, XLA's for the stem)
  from jtransfer.models import ffi_conv
  native = 5 if ffi_conv.available() else 0
  assert ("JAX bwd-filter XLA (before) | JAX bwd-filter GEMM | JAX bwd-filter native | "
          "GEMM / XLA | native / XLA |") in text
  assert (text.count(" (native) |"), text.count(" (XLA) |")) == (native, 6 - native)
  assert bench_convs.main(["--tiny", "--archs", "vgg_s", "--convs-only", "--out", str(out)]) == 0
  text = out.read_text()
  assert "| vgg_s | finetune |" not in text
  assert (text.count(" (native) |"), text.count(" (XLA) |")) == (native, 6 - native)


def test_parity_torch_net_equals_jtransfer_net():
  """bench.torch_twin copies jtransfer params and BN stats into bench/torch_ref's net: the
  same logits, for both resnet_s stems (vgg_s: checked by test_parity_runs_tiny, whose run
  fails when the two nets' logits differ before training)."""
  from bench import parity_runs, torch_twin
  from jtransfer import models
  images = np.random.default_rng(0).integers(0, 256, (4, 28, 28, 1), dtype=np.uint8)
  for stride in (2, 1):
    source = parity_runs.random_source("resnet_s", {"stem_stride": stride})
    v = source.variables  # BN scale, bias, mean and var all random
    net = torch_twin.torch_net("resnet_s", dict(source.config), 5, (28, 28, 1), v["params"],
                               v["batch_stats"])
    want, _, _ = models.apply_model(source.model, v["params"], v["batch_stats"],
                                    normalize(images, source.mean, source.std))
    got = torch_twin.torch_logits(net, images, source.mean, source.std)
    np.testing.assert_allclose(got, np.asarray(want), atol=1e-5, rtol=1e-4)


def test_parity_runs_tiny(tmp_path):
  from bench import parity
  out = tmp_path / "parity.md"
  assert parity.main(["--source", "random", "--archs", "vgg_s", "--targets", "digits",
                      "--draws", "1", "--steps", "2", "--test-per-class", "3",
                      "--no-stem-study", "--out", str(out)]) == 0
  text = out.read_text()
  assert text.startswith("# PyTorch accuracy parity\n\n```\npython -m bench.parity --source")
  assert "| vgg_s | digits | freeze | " in text and "| vgg_s | digits | finetune | " in text
  assert "## Rounding control and parity verdict" in text  # on by default: a reversed run


def test_parity_report_regenerates_the_published_one():
  """bench/PARITY.md is what the report code makes of bench/PARITY.jsonl under its own command
  line (the sources' accuracies, which need the pretrained sources, read from its text)."""
  import dataclasses
  import os
  import re

  from bench import parity, parity_report, parity_runs
  bench_dir = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "bench")
  with open(os.path.join(bench_dir, "PARITY.md")) as f:
    text = f.read()
  argv = text.split("```\n")[1].split()[3:]  # the flags after `python -m bench.parity`
  config = parity.parse(argv)
  config = dataclasses.replace(config, records=os.path.join(bench_dir, "PARITY.jsonl"))
  records = parity_runs.Records(config.records, config.settings())
  line = next(l for l in text.splitlines() if l.startswith("Sources: "))
  sources = {k: float(v) / 100 for k, v in
             re.findall(r"(?:^Sources: |; )([^;]+?) test accuracy ([\d.]+)%", line)}
  assert len(sources) == 3
  want, have = parity.count(config, records)
  assert want == have > 0
  got = parity_report.report(config, argv, records, sources, want - have)
  # the records' path is printed relative to the working directory
  rel = os.path.relpath(config.records)
  assert got == text.replace("`bench/PARITY.jsonl`", f"`{rel}`")


def test_parity_rounding_control_reverses_rows_and_renders():
  """The rounding control's batch: the same rows reversed, so the same mean loss to rounding;
  its report row gives both differences, the margin and the verdict."""
  import torch
  import torch.nn.functional as F
  from bench import parity_report, parity_runs, torch_twin
  rng = np.random.default_rng(0)
  batch = {"image": rng.integers(0, 256, (8, 28, 28, 1), dtype=np.uint8),
           "label": rng.integers(0, 5, 8).astype(np.int32)}
  rev = torch_twin.reversed_rows(batch)
  assert np.array_equal(rev["image"], batch["image"][::-1])
  assert np.array_equal(rev["label"], batch["label"][::-1])
  source = parity_runs.random_source("resnet_s")
  v = source.variables
  net = torch_twin.torch_net("resnet_s", dict(source.config), 5, (28, 28, 1), v["params"],
                             v["batch_stats"])
  losses = []
  for b in (batch, rev):
    x = torch_twin.to_nchw(normalize(b["image"], source.mean, source.std))
    with torch.no_grad():
      losses.append(float(F.cross_entropy(net(x), torch.from_numpy(b["label"].astype(np.int64)))))
  np.testing.assert_allclose(losses[0], losses[1], rtol=1e-6)
  runs = [dict(jax=0.9, torch=0.9), dict(jax=0.902, torch=0.9), dict(jax=0.9, torch=0.9)]
  revs = [dict(torch_rev=0.9), dict(torch_rev=0.902), None]
  row, verdict = parity_report.control_row("vgg_s", "digits", "finetune", runs, revs)
  assert verdict == parity_report.EQUAL  # [-0.22, +0.35] pt within the 0.5 pt floor
  assert row.startswith("| vgg_s | digits | finetune | +0.07 [-0.22, +0.35] 1/3 | "
                        "+0.10 [-1.17, +1.37] 1/2 | 1/1/0 | 1/1 | 0.20 | +-0.50 | yes | ")
  wide = [dict(jax=0.93, torch=0.9), dict(jax=0.94, torch=0.9)]  # [-2.85, +9.85] holds 0
  row, verdict = parity_report.control_row("vgg_s", "digits", "finetune", wide, None)
  assert verdict == parity_report.DIFFERENT and row.endswith("| - | - | - | - | +-0.50 | yes | "
                                                      "**different** |")


def test_torch_twin_inputs_are_normalised_images():
  """The grid loop's numpy normalisation is (x / 255 - mean) / std in NCHW, as a hand-derived
  pixel gives it and within float rounding of jtransfer's `normalize`; the parity runs' input
  is `normalize`'s to the bit."""
  from bench import torch_twin
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (5, 6, 7, 3), dtype=np.uint8)
  images[0, 1, 2] = (255, 0, 51)
  mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
  got = torch_twin.tensor(images, mean, std).numpy()
  assert got.shape == (5, 3, 6, 7) and got.dtype == np.float32
  np.testing.assert_allclose(got[0, :, 1, 2], [(1 - 0.485) / 0.229, -0.456 / 0.224,
                                               (0.2 - 0.406) / 0.225], rtol=1e-6)
  want = np.transpose(np.asarray(normalize(images, mean, std)), (0, 3, 1, 2))
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)
  assert np.array_equal(torch_twin.same_input(images, mean, std).numpy(), want)


@pytest.mark.slow
def test_bench_attention_runs_tiny(capsys):
  from bench import bench_attention
  bench_attention.main(["--arch", "resnet_s", "--size", "16", "--images", "4", "--calls", "1",
                        "--skip-probe"])
  assert "all taps: suffix-only" in capsys.readouterr().out


@pytest.mark.slow  # 19 s, its own compiles; like the other bench smokes
def test_bench_decode_runs_tiny(tmp_path, capsys):
  from bench import bench_decode
  bench_decode.main(["--folder", str(tmp_path / "jpeg"), "--make", "40", "--size", "32",
                     "--arch", "resnet_s", "--step-batch", "4", "--steps", "1",
                     "--decode-images", "20", "--threads", "2"])
  out = capsys.readouterr().out
  assert "per core" in out and "bottleneck" in out


@pytest.mark.slow  # three MobileNetV2 compiles: about a minute on 2 loaded cores
def test_bench_backbones_runs_tiny(capsys):
  from bench import bench_backbones
  bench_backbones.main(["--archs", "mobilenet_v3_small", "--size", "32", "--batches", "1",
                        "--repeats", "1", "--pruned-batch", "2"])
  assert "| pruned, multiple 8 |" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_depthwise_runs_tiny(capsys):
  from bench import bench_depthwise
  bench_depthwise.layer_table([(2, 8, 4, 3, 2)], repeats=1)
  bench_depthwise.main(["--repeats", "1", "--archs", "", "--layers", "none",
                        "--student-batches", "2,2"])
  out = capsys.readouterr().out
  assert "| 2x8x8x4 | 3x3/2 |" in out and "| compact MobileNetV2 student eval | 28 px, b2 |" in out
  assert "| compact MobileNetV2 student train step | 28 px, b2 |" in out


@pytest.mark.slow
def test_bench_batched_runs_tiny(capsys):
  from bench import bench_batched
  bench_batched.main(["--archs", "vgg_s", "--runs", "3", "--batches", "2", "--repeats", "1"])
  row = [l for l in capsys.readouterr().out.splitlines() if l.startswith("| vgg_s | 2 | 3 |")]
  assert len(row) == 1 and row[0].endswith("x |")
  with pytest.raises(SystemExit, match="trains conv kernels"):
    bench_batched.main(["--archs", "vgg_s", "--strategy", "finetune", "--runs", "2",
                        "--batches", "2", "--repeats", "1"])


@pytest.mark.slow  # the S1..S6 kernel's jit compiles: ~20 s on 2 loaded cores
def test_bench_selection_runs_tiny(capsys):
  from bench import bench_selection
  bench_selection.main(["--images", "3", "--repeats", "1"])
  out = capsys.readouterr().out
  assert "24 (model, target) pairs, 540 images in all" in out  # 12 models x (5 + 10) x 3
  assert "| analysis (normalise, 15 alpha sweeps at 0.001, rank correlations) |" in out
