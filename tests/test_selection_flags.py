"""The selection study's typed flags (`jtransfer.zoo.flags`, experiments.model_selection's
`SelectionFlags`): defaults, --tiny, bad values as one sentence and exit code 2 before --out is
touched, and experiments.truncation's flags of the same groups."""
import os

import pytest

from experiments import model_selection as ms
from jtransfer.errors import InputError
from jtransfer.study import flags
from jtransfer.zoo import ground_truth as gt


def test_defaults_and_tiny_give_the_typed_protocol_and_zoo():
  x = flags.parse(ms.STUDY, []).extra
  assert x.protocol() == gt.FineTuneProtocol()        # the flags' defaults are the protocol's
  assert x.targets == ms.DEFAULT_TARGETS and x.settings() == dict(
      map_tap="conv", selection_features="target", logme_variant="published")
  specs, settings = x.zoo()
  assert len(specs) == 15 and settings.epochs == 3.0 and settings.test_per_class == 200
  tiny = flags.parse(ms.STUDY, ["--tiny", "--target", "digits;fmnist:1,5,7"]).extra
  p = tiny.protocol()
  assert (p.steps, p.train_per_class, p.test_per_class, p.batch_size) == (2, 4, 5, 8)
  assert [s.name for s in tiny.zoo()[0]] == ["resnet_s_narrow-c0_2_3-f100",
                                             "resnet_s_narrow-c0_2_3-f50",
                                             "resnet_s_narrow-c4_6_8-f100"]
  assert tiny.targets == ("digits", "fmnist:1,5,7")


@pytest.mark.parametrize("argv, sentence", [
    (["--fractions", "1.5"], "--fractions 1.5: each fraction must be in (0, 1]"),
    (["--ft-lrs", "0.01", "--tune-extend", "1"], "--tune-extend 1 extends an LR grid chosen "
     "on validation"),
    (["--ft-lrs", "0.01,-1"], "--ft-lrs"),
    (["--target", "nope:1"], "--target"),
])
def test_bad_flags_are_one_sentence_and_exit_2_before_out_is_opened(tmp_path, capsys, argv,
                                                                     sentence):
  out = tmp_path / "out"
  assert ms.main(argv + ["--out", str(out)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and sentence in err[0]
  assert not os.path.exists(out)
  with pytest.raises(InputError):
    flags.parse(ms.STUDY, argv)


def test_truncation_flags_are_the_selection_flags_less_the_map_readings(tmp_path, capsys):
  """experiments.truncation declares the same typed ground-truth flags and --logme (no
  --map-tap / --selection-features: S1..S6 read the cut map), and a point --arch lacks is one
  sentence and exit code 2 before --out is opened."""
  from experiments import truncation
  argv = ["--ft-lrs", "0.01,0.03", "--tune-extend", "1", "--steps", "50", "--logme", "exact"]
  x = flags.parse(truncation.STUDY, argv).extra
  assert x.protocol() == flags.parse(ms.STUDY, argv).extra.protocol()
  assert x.logme == "exact" and not hasattr(x, "map_tap")
  plan = truncation.plan_of(flags.parse(truncation.STUDY, argv + ["--points", "stem,stage1/block0"]))
  assert plan["points"] == ["stem", "stage1/block0"] and plan["protocol"].lrs == (0.01, 0.03)
  with pytest.raises(SystemExit):
    flags.parse(truncation.STUDY, ["--map-tap", "conv"])
  capsys.readouterr()
  out = tmp_path / "out"
  assert truncation.main(["--points", "stem,nope", "--out", str(out)]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: --points 'stem,nope'") and "stage3/block1" in err[0]
  assert not os.path.exists(out)
