"""Bad inputs to the data, weights and methods layers, and the flags that feed them.

Each is refused with one sentence (CLI: `error: ...` on one line, exit 2, files left as they
were) or, when legal but suspicious, warned about in the log and the report.
docs/bad_inputs_library.md lists them all with the answer each gets.
"""
import json
import logging
import os
import pickle
import pydoc
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from jtransfer import checks, models
from jtransfer.data import Batches, load_spec
from jtransfer.data.base import Dataset, ImageSet
from jtransfer.errors import InputError
from jtransfer.methods import transfer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(module, *args):
  """Runs `python -m module args` as a user would; returns (exit code, stderr lines)."""
  proc = subprocess.run([sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True,
                        text=True, timeout=300,
                        env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT))
  return proc.returncode, proc.stderr.strip().splitlines()


def _folder(root, classes, per_class=3):
  for name in classes:
    (root / name).mkdir(parents=True)
    for i in range(per_class):
      Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / name / f"{i}.png")
  return root


@pytest.mark.parametrize("module,args,message", [
    ("experiments.fewshot", ["--target", "digits:3"], "--target digits:3 has 1 class ('3')"),
    ("experiments.fewshot", ["--target", ""], "--target '' names no dataset"),
    ("experiments.fewshot", ["--devices", "0"], "--devices must be >= 1"),
    ("experiments.fewshot", ["--devices", "-2"], "--devices must be >= 1"),
    ("experiments.pretrain", ["--arch", "vgg_s", "--epochs", "0"], "--epochs must be > 0"),
    ("experiments.pretrain", ["--arch", "vgg_s", "--lr", "-1"], "--lr must be > 0"),
])
def test_cli_refusals(module, args, message, tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("mine")
  code, err = _cli(module, *args, "--out", str(out / "run"))
  assert code == 2 and len(err) == 1, err
  assert err[0].startswith("error: ") and message in err[0], err
  assert os.listdir(out) == ["keep.txt"] and (out / "keep.txt").read_text() == "mine"


def test_one_class_folder_refused_by_the_cli(tmp_path):
  root = _folder(tmp_path / "one", ["cat"])
  code, err = _cli("experiments.fewshot", "--target", f"folder:{root}", "--out",
                   str(tmp_path / "out"))
  assert code == 2 and err[-1].startswith("error: ") and "has 1 class ('cat')" in err[-1], err
  assert not any("Traceback" in line for line in err)


def test_one_class_targets_refused(tmp_path, monkeypatch):
  with pytest.raises(InputError, match=r"folder:.* has 1 class \('cat'\); it needs at least 2"):
    load_spec(f"folder:{_folder(tmp_path / 'one', ['cat'])}", (8, 8, 3), flag="--target")
  with pytest.raises(InputError, match=r"--target digits:3 has 1 class"):
    load_spec("digits:3", (8, 8, 1), flag="--target")
  # TFDS goes through the same check (mocked loader: no TFDS data here).
  from jtransfer.data import tfds_source
  one = ImageSet(np.zeros((2, 8, 8, 3), np.uint8), np.zeros(2, np.int32), ("rose",))
  monkeypatch.setattr(tfds_source, "load_tfds", lambda *a, **k: Dataset("flowers", one, one))
  with pytest.raises(InputError, match=r"--target tfds:flowers has 1 class \('rose'\)"):
    load_spec("tfds:flowers", (8, 8, 3), flag="--target")


def test_folder_notes_name_every_skipped_file_and_the_split(tmp_path, caplog):
  root = _folder(tmp_path / "pets", ["cat", "dog"], per_class=5)
  (root / "cat" / "README.txt").write_text("notes")
  for i in range(11):
    (root / "dog" / f"bad{i:02d}.jpg").write_bytes(b"\xff\xd8 corrupt")
  with caplog.at_level(logging.WARNING):
    data = load_spec(f"folder:{root}", (8, 8, 3), flag="--target")
  skipped, split, decoded = data.notes
  assert "skipped 12 file(s)" in skipped and "and 2 more" in skipped
  # README.txt comes first; the corrupt JPEGs are named too (not hidden behind it).
  assert "cat/README.txt (not an image file extension)" in skipped
  assert "dog/bad00.jpg (" in skipped and "dog/bad08.jpg (" in skipped
  assert "bad09.jpg" not in skipped
  assert "train/test images per class: cat 4/1, dog 4/1" in split
  assert "images decoded to 8x8x3" in decoded
  assert all(note in caplog.text for note in data.notes)


def test_colour_folder_for_a_grey_source_is_announced(tmp_path):
  data = load_spec(f"folder:{_folder(tmp_path / 'c', ['a', 'b'])}", (8, 8, 1), flag="--target")
  assert "colour image converted to grey by ITU-R BT.601 luma" in data.notes[-1]


def test_dead_features_note():
  rng = np.random.default_rng(0)
  live = rng.normal(0, 1, (32, 16))
  assert checks.dead_features_note(live, "x") is None
  dead = 0.5 + 1e-10 * rng.normal(0, 1, (32, 16))  # the ~1e-10 spread of the source
  note = checks.dead_features_note(dead, "src on tgt")
  assert note.startswith("src on tgt: the source's features barely vary across 32 ")
  assert "below 1e-06" in note and "chance" in note
  assert "not finite" in checks.dead_features_note(np.full((4, 2), np.nan), "x")


def _vgg_source():
  model = models.get_model("vgg_s", 3)
  import jax
  variables = models.init_model(model, jax.random.PRNGKey(0), (28, 28, 1))
  return transfer.Source("vgg_s", models.model_config(model), jax.tree.map(np.asarray, variables),
                         (28, 28, 1), (0.5,), (0.25,))


def test_python_floats_and_labels_refused():
  setup = transfer.get_strategy("freeze").build(_vgg_source(), 2, 10)
  ints = np.zeros((4, 28, 28, 1), np.uint8)
  floats = np.full((4, 28, 28, 1), 0.5, np.float32)
  # The iterator batches anything (model_zoo feeds it pre-normalised float images); the entry
  # point that reads a user's raw pixels (Setup.init, and jtransfer.api) refuses floats.
  Batches(floats, np.zeros(4, np.int32), 2, 0)
  with pytest.raises(InputError, match=r"np.round\(x \* 255\).astype\(np.uint8\)"):
    setup.init(0, floats, np.zeros(4, np.int32))
  with pytest.raises(InputError, match=r"values must lie in \[0, 2\) for a head of 2 classes, "
                                       r"got range \[0, 5\]"):
    setup.init(0, ints, np.array([0, 1, 5, 0]))
  with pytest.raises(InputError, match="integer class indices"):
    setup.init(0, ints, np.zeros(4, np.float32))
  params, stats = setup.init(0, ints, np.array([0, 1, 1, 0]))
  assert setup.forward(params, stats, ints).shape == (4, 2)
  # A setup's forward takes float pixels on the [0, 255] scale (augmented crops): the same
  # image as uint8 or as float gives the same logits.
  np.testing.assert_allclose(setup.forward(params, stats, ints.astype(np.float32)),
                             setup.forward(params, stats, ints), rtol=1e-6)
  # Why labels are checked on the host: JAX reads past the logits without an error.
  from jtransfer.train import evaluate
  assert np.isnan(float(evaluate.cross_entropy(np.zeros((1, 2)), np.array([5]))))


def test_every_strategy_documented_and_knobs_named():
  transfer.get_strategy("freeze")  # imports every method module
  for name, strategy in transfer.STRATEGIES.items():
    doc = strategy.__doc__
    assert doc.startswith(f"Transfer strategy {name!r}: "), name
    assert "LR grid of --lrs paper" in doc and "BN" in doc and "Knobs" in doc, name
    assert doc.splitlines()[2] in pydoc.render_doc(strategy), name
    for knob, default in strategy.knob_defaults.items():
      assert f"  {knob}: grid " in doc and f"default {default}" in doc, name
  with pytest.raises(InputError, match="strategy 'l2sp' has no knob 'beta'; its knobs: alpha"):
    transfer.get_strategy("l2sp").build(None, 2, 10, beta=1.0)
  with pytest.raises(InputError, match="strategy 'freeze' has no knob 'alpha'; its knobs: none"):
    transfer.get_strategy("freeze").build(None, 2, 10, alpha=1.0)


def test_pickle_refusal_says_what_to_do_safely(tmp_path):
  torch = pytest.importorskip("torch")
  import argparse
  from jtransfer import weights
  torch.save({"state_dict": {"w": torch.zeros(2)}, "args": argparse.Namespace(lr=1)},
             tmp_path / "train.pth")
  with pytest.raises(InputError) as e:
    weights.load_state_dict(tmp_path / "train.pth")
  msg = str(e.value)
  assert "(argparse.Namespace), which are refused for safety" in msg
  assert "safe_globals([argparse.Namespace])" in msg and "safetensors.torch.save_file" in msg
  assert "weights_only=False" not in msg and "\n" not in msg


def test_empty_target_list_refused_by_every_module():
  """fewshot, compact_transfer, model_selection and truncation read --target through
  `jtransfer.study.config.target_list`."""
  from experiments import compact_transfer, fewshot, model_selection, truncation
  from jtransfer.study.config import target_list
  for values in ([""], [";"], [" ", ""]):
    with pytest.raises(InputError, match="names no dataset"):
      target_list(values, ("digits",))
  assert target_list(None, ("digits",)) == ("digits",)
  assert target_list(["a;b", "c"], ()) == ("a", "b", "c")
  from jtransfer.study import flags  # studies declared on the study runner
  for study in (fewshot.STUDY, compact_transfer.STUDY, model_selection.STUDY, truncation.STUDY):
    with pytest.raises(InputError, match="--target '' names no dataset"):
      flags.parse(study, ["--target", ""])
