"""`experiments.fewshot` on user data and user models, end to end on tiny settings.

(a) an image folder of real PNG/JPEG files, (b) a TFDS catalog dataset (mocked from the installed
TFDS code, no TensorFlow, no download), both with a tiny pretrained vgg_s source; (c) a random
torchvision ResNet-18 state dict converted by `experiments.convert_weights`, then used as the
source on an RGB folder; and the errors a user meets first.
"""
import json

import numpy as np
import pytest
import torch
from PIL import Image

from experiments import convert_weights, fewshot
from jtransfer.methods import transfer
from jtransfer.sources import IMAGENET_MEAN

tfds = pytest.importorskip("tensorflow_datasets")

TINY = ["--steps", "2", "--repeats", "1", "--shots", "1", "--test-per-class", "2",
        "--val-per-class", "1", "--lrs", "0.001", "--quiet"]
COLOURS = {"apple": (200, 30, 30), "leaf": (30, 180, 40), "sky": (40, 60, 210)}


def _image_tree(root, size, per_class=4):
  """root/<class>/*.png|jpg: noisy solid colours, PNG and JPEG alternating."""
  rng = np.random.default_rng(0)
  for name, colour in COLOURS.items():
    (root / name).mkdir(parents=True)
    for i in range(per_class):
      pixels = np.clip(np.array(colour) + rng.normal(0, 20, (size, size, 3)), 0, 255)
      suffix = "png" if i % 2 else "jpg"
      Image.fromarray(pixels.astype(np.uint8)).save(root / name / f"{i}.{suffix}")
  return root


def _records(out):
  from jtransfer.study.records import rows
  records = rows(json.loads((out / "results.json").read_text()))
  assert (out / "report.md").is_file() and (out / "results.jsonl").is_file()
  tunes = [r for r in records if r["role"] == "tune"]
  records = [r for r in records if r["role"] == "eval"]
  assert all(r["test_acc"] is None for r in tunes)  # tuning draws never see test
  assert records and all(r["status"] == "ok" and 0 <= r["test_acc"] <= 1 for r in records)
  return records


def test_folder_target(tiny_source_dir, tmp_path):
  root = _image_tree(tmp_path / "images", 28)
  out = tmp_path / "out"
  argv = ["--arch", "vgg_s", "--source", f"ckpt:{tiny_source_dir('vgg_s')}", "--target",
          f"folder:{root}", "--strategies", "freeze", "--out", str(out), *TINY]
  assert fewshot.main(argv) == 0
  records = _records(out)
  assert all(r["n_train"] == 3 and r["n_test"] == 3 for r in records)  # 1 per class x 3 classes
  assert f"folder:{root}" in (out / "report.md").read_text()


def test_tfds_target_mocked(tiny_source_dir, tmp_path):
  out = tmp_path / "out"
  argv = ["--arch", "vgg_s", "--source", f"ckpt:{tiny_source_dir('vgg_s')}", "--target",
          "tfds:oxford_flowers102", "--strategies", "freeze", "--out", str(out), *TINY]
  # Mock records: labels uniform over the 102 classes; 1000 leave each class >= 2 per split.
  with tfds.testing.mock_data(num_examples=1000, policy=tfds.testing.MockPolicy.USE_CODE):
    assert fewshot.main(argv) == 0
  (record,) = _records(out)
  assert record["target"] == "tfds:oxford_flowers102"
  assert record["n_train"] == 102 and record["n_test"] == 204


@pytest.fixture(scope="module")
def converted_resnet18(tmp_path_factory):
  """A random torchvision ResNet-18 state dict converted at 32x32x3, and an RGB folder."""
  from test_weights import random_state_dict, resnet_shapes
  tmp = tmp_path_factory.mktemp("resnet18")
  torch.save(random_state_dict(resnet_shapes("resnet18")), tmp / "resnet18.pth")
  src = tmp / "src"
  assert convert_weights.main(["--arch", "resnet18", "--weights", str(tmp / "resnet18.pth"),
                               "--out", str(src), "--input-shape", "32,32,3"]) == 0
  return src, _image_tree(tmp / "images", 32), tmp / "resnet18.pth"


def _fewshot_on_converted(converted, out, strategy):
  src, root, _ = converted
  argv = ["--arch", "resnet18", "--source", f"ckpt:{src}", "--target", f"folder:{root}",
          "--strategies", strategy, "--out", str(out), *TINY, "--steps", "1"]
  assert fewshot.main(argv) == 0
  (record,) = _records(out)
  assert record["arch"] == "resnet18" and record["steps"] == 1 and record["arm"] == strategy


@pytest.mark.slow  # 15 s; test_real_sources converts and runs a torchvision net
def test_converted_torchvision_resnet18_as_source(converted_resnet18, tmp_path):
  source = transfer.load_source(str(converted_resnet18[0]))
  assert source.input_shape == (32, 32, 3) and source.config["num_classes"] == 1000
  assert source.mean == IMAGENET_MEAN and source.meta["head"] == "imported"
  _fewshot_on_converted(converted_resnet18, tmp_path / "out", "freeze")


def test_converter_drop_head(converted_resnet18, tmp_path):
  pth = converted_resnet18[2]
  assert convert_weights.main(["--arch", "resnet18", "--weights", str(pth), "--out",
                               str(tmp_path / "src"), "--input-shape", "40,40,3",
                               "--num-classes", "5", "--drop-head"]) == 0
  source = transfer.load_source(str(tmp_path / "src"))
  params = source.variables["params"]
  assert source.meta["head"] == "random init" and source.meta["checkpoint_classes"] == 1000
  assert params["head"]["kernel"].shape == (512, 5) and params["head"]["kernel"].std() > 0
  np.testing.assert_array_equal(params["head"]["bias"], np.zeros(5))
  sd = torch.load(pth, weights_only=True)
  np.testing.assert_array_equal(params["stage4/block1"]["conv2"]["conv"]["kernel"],
                                sd["layer4.1.conv2.weight"].numpy().transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(source.variables["batch_stats"]["stem"]["bn"]["mean"],
                                sd["bn1.running_mean"].numpy())


@pytest.mark.slow
def test_converted_resnet18_finetune(converted_resnet18, tmp_path):
  _fewshot_on_converted(converted_resnet18, tmp_path / "out", "finetune")


def test_converter_errors(tmp_path, capsys):
  from test_weights import alexnet_shapes, random_state_dict, resnet_shapes
  (tmp_path / "notes.pth").write_text("not weights")
  torch.save(random_state_dict(resnet_shapes("resnet18")), tmp_path / "r18.pth")
  torch.save(random_state_dict(alexnet_shapes(hidden=8)), tmp_path / "alex.pth")
  cases = [
      (["--arch", "resnet18", "--weights", str(tmp_path / "notes.pth")], "is not a checkpoint"),
      (["--arch", "resnet50", "--weights", str(tmp_path / "r18.pth")],
       "does not fit torchvision resnet50"),
      (["--arch", "resnet18", "--weights", str(tmp_path / "r18.pth"), "--num-classes", "10"],
       "has 1000 classes but num_classes is 10"),
      (["--arch", "resnet18", "--weights", str(tmp_path / "r18.pth"), "--input-shape", "32,32,1",
        "--mean", "0.5", "--std", "0.5"], "takes 3-channel inputs"),
      (["--arch", "resnet18", "--weights", str(tmp_path / "r18.pth"), "--mean", "0.5"],
       "need 3 value(s)"),
      (["--arch", "alexnet", "--weights", str(tmp_path / "alex.pth"), "--input-shape", "32,32,3",
        "--config", '{"dense_widths": [8, 8]}'], "too small for alexnet"),
  ]
  for extra, message in cases:
    assert convert_weights.main([*extra, "--out", str(tmp_path / "o")]) == 2, message
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
  assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("target,message", [
    ("folder:/nonexistent/images", "/nonexistent/images"),
    ("tfds:not_a_dataset", "unknown TFDS dataset 'not_a_dataset'"),
])
def test_bad_user_targets(tiny_source_dir, tmp_path, capsys, target, message):
  argv = ["--arch", "vgg_s", "--source", f"ckpt:{tiny_source_dir('vgg_s')}", "--target", target,
          "--out", str(tmp_path / "out"), *TINY]
  assert fewshot.main(argv) == 2
  err = capsys.readouterr().err
  assert err.startswith("error: ") and message in err and "Traceback" not in err
