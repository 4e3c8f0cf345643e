"""The selection study's typed flags (`jtransfer.zoo.flags`, experiments.model_selection's
`SelectionFlags`): defaults, --tiny, bad values as one sentence and exit code 2 before --out is
touched, and the argparse form experiments.truncation still reads."""
import argparse
import os

import pytest

from experiments import model_selection as ms
from experiments import selection_legacy
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


def test_legacy_argparse_flags_read_as_the_typed_ones():
  p = argparse.ArgumentParser()
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--tiny", action="store_true")
  selection_legacy.add_finetune_args(p)
  selection_legacy.add_protocol_args(p)
  selection_legacy.add_score_args(p, maps=False)
  argv = ["--ft-lrs", "0.01,0.03", "--tune-extend", "1", "--steps", "50", "--logme", "exact"]
  args = p.parse_args(argv)
  assert not hasattr(args, "map_tap")
  typed = flags.parse(ms.STUDY, argv).extra
  assert selection_legacy.protocol_from_args(args) == typed.protocol()
  assert selection_legacy.check_protocol_args(args) == [0.01, 0.03]
