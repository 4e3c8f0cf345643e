"""A study's typed configuration: frozen dataclasses built once at the CLI edge.

Every field that is a flag says so in its `dataclasses.field(metadata=...)` (`flag`): the flag
name, its argparse destination (kept from the modules' old parsers, so a folder's settings
fingerprint and a published run.json's argv read the same), its default as the command line
writes it, its help, a parser from that text to the typed value and a check of the value. The
CLI edge (`jtransfer.study.flags`) builds argparse from these; nothing below it sees argparse.

  Config(cells=Cells(...), protocol=Protocol(...), output=Output(...), source=Source(...),
         extra=<the study's own frozen dataclass of knobs, or None>)
"""
from __future__ import annotations

import dataclasses
import json
import types
from typing import Any, Callable, Mapping, Optional

from jtransfer.errors import InputError
from jtransfer.study.tables import positive_ints

# The embedded benchmark's defaults (docs/protocol.md): both small archs, both embedded targets.
DEFAULT_ARCHS = ("vgg_s", "resnet_s")
DEFAULT_TARGETS = ("fmnist:1,5,7,8,9", "digits")
DEFAULT_SOURCE = "fmnist:0,2,3,4,6"


_SAME = object()  # `flag(cli=...)` not given: the command line's default is the typed one


def flag(name: str, default: Any, help: str, *, dest: Optional[str] = None, cli: Any = _SAME,
         parse: Optional[Callable[[Any], Any]] = None,
         check: Optional[Callable[[Any], None]] = None, action: Optional[str] = None,
         choices=None, metavar: Optional[str] = None, required: bool = False,
         added: bool = False):
  """A dataclass field that is also a command-line flag.

  Args:
    name: the flag ('--arch').
    default: the typed default (what the dataclass holds when built without the CLI).
    help: the flag's help text.
    dest: argparse destination (default: the flag without dashes, '-' -> '_').
    cli: the default as the command line writes it (default: `default`); parsed by `parse`.
    parse: command-line value -> typed value, raising `InputError` (one sentence naming the
      flag); None = the argparse value as is.
    check: typed value -> None, raising `InputError`.
    action: argparse action ('store_true', 'append', 'bool' for --x/--no-x).
    choices, metavar, required: as argparse (`required`: a command's flag without a default,
      e.g. experiments.pretrain's --arch and --out).
    added: a flag added after folders were published: at its default it is left out of the
      settings fingerprint (`flags.settings_flags`), so those folders still resume.
  """
  meta = dict(flag=name, dest=dest or name.lstrip("-").replace("-", "_"), help=help,
              cli=default if cli is _SAME else cli, parse=parse, check=check, action=action,
              choices=choices, metavar=metavar, required=required,
              added=added)
  return dataclasses.field(default=default, metadata=meta)


def at_least(lo: int, name: str) -> Callable[[Any], None]:
  """A check: the value is >= lo (`InputError` naming `name` otherwise)."""
  def check(v):
    if v < lo:
      raise InputError(f"{name} must be >= {lo}, got {v}")
  return check


def number(name: str, cast: Callable[[Any], Any] = float) -> Callable[[Any], Any]:
  """A parser of one number (`cast`: float or int) from flag `name`'s text (an optional flag's
  None default is never parsed: `flags` skips it); `InputError` naming the flag otherwise."""
  what = "an integer" if cast is int else "a number"

  def parse(text):
    try:
      return cast(text)
    except (TypeError, ValueError):
      raise InputError(f"{name} {text!r}: expected {what}") from None
  return parse


def json_object(name: str) -> Callable[[Any], dict]:
  """A parser of flag `name`'s JSON object text (model config overrides) -> a dict;
  `InputError` naming the flag for text that is not JSON or not an object."""
  def parse(text):
    try:
      value = json.loads(text)
    except ValueError as e:
      raise InputError(f"{name} {text!r} is not valid JSON ({e})") from None
    if not isinstance(value, dict):
      raise InputError(f"{name} {text!r}: expected a JSON object")
    return value
  return parse


def comma_list(name: str) -> Callable[[str], tuple[str, ...]]:
  """A parser of a comma list of names (blanks dropped)."""
  def parse(text):
    return tuple(v.strip() for v in str(text).split(",") if v.strip())
  return parse


def target_list(values, default=DEFAULT_TARGETS) -> tuple[str, ...]:
  """The --target specs: each repeated flag split at ';', `default` when the flag is absent.

  Raises:
    InputError: the flag was given but names no dataset (`--target ""`), which would otherwise
      run an empty grid and fail after writing its report.
  """
  targets = [t for f in (values or default) for t in f.split(";") if t.strip()]
  if not targets:
    raise InputError(f"--target {';'.join(values)!r} names no dataset; expected e.g. "
                     "--target digits or --target folder:/path (omit --target for the default)")
  return tuple(targets)


def parse_shard(text: Optional[str]) -> Optional[tuple[int, int]]:
  """'I/N' -> (I, N), or None for the whole grid."""
  if text is None:
    return None
  try:
    i, n = (int(v) for v in str(text).split("/"))
  except ValueError:
    raise InputError(f"--shard {text!r}: expected I/N, e.g. 0/4") from None
  if not (n >= 1 and 0 <= i < n):
    raise InputError(f"--shard {text!r}: needs N >= 1 and 0 <= I < N")
  return i, n


def parse_cv_folds(text) -> Optional[int]:
  """--cv-folds: 'auto' -> None (each strategy's paper), else 0 or an int >= 2."""
  if text == "auto":
    return None
  if not (str(text).isdigit() and int(text) != 1):
    raise InputError(f"--cv-folds must be 'auto', 0 or an integer >= 2, got {text!r}")
  return int(text)


def parse_cap_share(text) -> Optional[float]:
  """--cap-share: 'off' -> None, else a share in [0, 1)."""
  if text in (None, "off"):
    return None
  try:
    v = float(text)
  except (TypeError, ValueError):
    v = -1.0
  if not 0 <= v < 1:
    raise InputError(f"--cap-share must be 'off' or a share in [0, 1), got {text!r}")
  return v


def parse_bn(text) -> str:
  """--bn: 'train' or 'frozen' (`InputError`, one sentence, otherwise)."""
  if text not in ("train", "frozen"):
    raise InputError(f"--bn {text!r}: expected 'train' (batch statistics while fine-tuning, "
                     "the default) or 'frozen' (the source's running statistics)")
  return text


def parse_batch_runs(text) -> Optional[int]:
  """--batch-runs: 'auto' -> None (by backend at run time), else an int >= 1."""
  if text == "auto":
    return None
  try:
    n = int(text)
  except (TypeError, ValueError):
    n = 0
  if n < 1:
    raise InputError(f"--batch-runs must be 'auto' or an int >= 1, got {text!r}")
  return n


@dataclasses.dataclass(frozen=True)
class Cells:
  """The grid's axes: a cell is (arch, target, shots); arms run in every cell."""
  archs: tuple[str, ...] = flag(
      "--arch", DEFAULT_ARCHS, "comma list of architectures", cli=",".join(DEFAULT_ARCHS),
      parse=comma_list("--arch"))
  targets: tuple[str, ...] = flag(
      "--target", DEFAULT_TARGETS, "target dataset spec; repeat the flag (or separate with ';') "
      "for several", cli=None, parse=target_list, action="append")
  shots: tuple[int, ...] = flag(
      "--shots", (1, 5, 10), "comma list of k (images per class)", cli="1,5,10",
      parse=lambda t: tuple(positive_ints(t, "--shots")))
  arms: tuple[str, ...] = flag(
      "--strategies", ("freeze", "finetune"), "comma list of arms (registered strategies or "
      "the study's own)", dest="strategies", cli="freeze,finetune",
      parse=comma_list("--strategies"))


@dataclasses.dataclass(frozen=True)
class Protocol:
  """How runs are drawn, budgeted and tuned (docs/protocol.md)."""
  repeats: int = flag("--repeats", 2, "evaluation draws per cell", check=at_least(1, "--repeats"))
  lrs: str = flag("--lrs", "reduced", "'paper' (each strategy's paper grid), 'reduced' (2 per "
                  "strategy) or a comma list")
  steps: int = flag("--steps", 500, "step cap of a run (with --patience 0: the exact number of "
                    "steps)", check=at_least(1, "--steps"))
  patience: int = flag("--patience", 100, "stop a run once its validation accuracy has not "
                       "improved for this many steps and keep its best validation state; 0 = "
                       "train to the cap and keep the last state",
                       check=at_least(0, "--patience"))
  eval_every: int = flag("--eval-every", 10, "steps between validation evaluations of a run",
                         check=at_least(1, "--eval-every"))
  val_per_class: int = flag("--val-per-class", 20, "validation images per class, disjoint from "
                            "the k-shot set and from test", check=at_least(0, "--val-per-class"))
  tune_draws: int = flag(
      "--tune-repeats", 1, "tuning draws per (arch, target, k), not among the evaluation "
      "draws, on which each strategy's LR is chosen by mean validation accuracy; 0 = no tuning "
      "draws (the LR grid runs on every draw and is chosen per draw on validation)",
      dest="tune_repeats", check=at_least(0, "--tune-repeats"))
  tuning: str = flag(
      "--tuning", "shared", "'shared': each strategy's knobs are chosen once per (arch, "
      "target, k) on the tuning draws; 'nested': each evaluation draw is tuned on its own "
      "labelled pool (its validation split, or --cv-folds folds over its k-shot and "
      "validation images), never its test images, so the paired differences carry the "
      "selection noise (docs/protocol.md)", choices=("shared", "nested"), added=True)
  disjoint_tuning: bool = flag(
      "--disjoint-tuning", False, "draw the tuning draws from pool images no evaluation draw "
      "of the cell uses, where every class has enough of them; otherwise (or without this "
      "flag) tuning draws may share images with evaluation draws, and the share is recorded "
      "and reported", action="store_true", added=True)
  cap_share: Optional[float] = flag(
      "--cap-share", None, "flag an arm 'not converged' in the report's tables, and its "
      "claims 'not tested', when more than this share of its evaluation runs stop at the step "
      "cap (0.1 for new studies, docs/protocol.md); 'off' = no check (the form of folders "
      "published before it)", cli="off", parse=parse_cap_share, added=True)
  tune_extend: int = flag("--tune-extend", 2, "when a chosen value is the first or last of its "
                          "grid, extend that grid by up to this many values on that side",
                          check=at_least(0, "--tune-extend"))
  cv_folds: Optional[int] = flag(
      "--cv-folds", None, "choose a strategy's knobs (and LR) by this many-fold "
      "cross-validation on each tuning draw's labelled pool (k-shot + validation images); "
      "'auto' = as its paper (DELTA, L2-SP: 5; others: the validation set); 0 = never",
      cli="auto", parse=parse_cv_folds)
  augment: str = flag(
      "--augment", "none", "training augmentation, on device, per example, from each step's "
      "rng (jtransfer.data.augment): none, flip, crop (shorter side to 32/28 of the input, "
      "random crop), rrc (random-resized crop), pad[N] (zero-pad N px, default 4, random crop "
      "back), each optionally +flip; frozen-feature caching is off when augmenting")
  stored_size: int = flag(
      "--stored-size", 0, "store the target's images as squares of this side (cover, centre "
      "crop; e.g. 256 for 224 px inputs) so --augment crops real pixels; the network sees "
      "Resize(32/28 x input) + CenterCrop(input) views of them for validation, test and "
      "unaugmented training; 0 = the input size")
  stream_threads: int = flag(
      "--stream-threads", 0, "decode an image-folder target on demand with this many threads "
      "through grain (folders larger than memory; jtransfer.data.stream) instead of loading "
      "it; 0 = load into memory")
  stream_workers: int = flag("--stream-workers", 0, "with --stream-threads: grain worker "
                             "processes decoding (0: threads only)")
  paper_grid: bool = flag("--paper-grid", True, "also run the whole LR grid on the evaluation "
                          "draws, for the papers' test-selected 'best over LR' figure "
                          "(reported apart, labelled)", action="bool")
  batch_size: int = flag("--batch-size", 64, "images per step (a smaller k-shot set is one "
                         "batch)", check=at_least(1, "--batch-size"))
  test_per_class: int = flag("--test-per-class", 300, "cap on test images per class (0 = all)",
                             check=at_least(0, "--test-per-class"))
  data_dir: Optional[str] = flag("--data-dir", None, "TFDS data_dir (default $TFDS_DATA_DIR) "
                                 "or the Fashion-MNIST IDX directory")
  seed: int = flag("--seed", 0, "seeds the draws, the source's pretraining and every run")
  batch_runs: Optional[int] = flag(
      "--batch-runs", None, "train up to this many runs of a frozen-backbone strategy (freeze, "
      "freeze_cwl) together as one vmapped step; 1 = one at a time; 'auto' = 1 on CPU, 64 on "
      "GPU/TPU", cli="auto", parse=parse_batch_runs)
  no_feature_cache: bool = flag("--no-feature-cache", False, "train head-only strategies "
                                "through the full forward (slow path)", action="store_true")
  # Not `added`: a new command line always states it (`edge.main` writes the default into
  # argv), so a stored folder without it predates it and parses as the study's `bn_before`.
  bn: str = flag(
      "--bn", "train", "BatchNorm while fine-tuning: 'train' (batch statistics while training, "
      "running averages updated and used at evaluation, PyTorch's model.train()) or 'frozen' "
      "(the source's running statistics); strategies that keep every source kernel fixed "
      "always keep the source's statistics, finetune_bn always trains "
      "(jtransfer.methods.bn_rule); folders made before this flag ran frozen",
      cli=None, parse=parse_bn, metavar="{train,frozen}")
  # Whether the folder states --bn (False: made before the flag; its report, made then, says
  # nothing of BN, so a regenerated one does not either).
  bn_stated: bool = True
  # DELTA's settings from the JTRANSFER_DELTA_* environment (read at the CLI edge only).
  delta_env: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Devices:
  """The device mesh a command trains on (`jtransfer.study.edge.apply_devices`)."""
  devices: int = flag("--devices", 1, "data-parallel training over this many devices "
                      "(jax.sharding mesh, batch split, params replicated); with "
                      "--num-processes > 1 the mesh spans every process's devices")
  num_processes: int = flag("--num-processes", 1, "multi-host: the number of processes "
                            "(jax.distributed); each runs the same command with its own "
                            "--process-id")
  process_id: int = flag("--process-id", 0, "multi-host: this process's index")
  coordinator: Optional[str] = flag("--coordinator", None, "multi-host: host:port of process "
                                    "0's coordinator (jax.distributed); on TPU / SLURM "
                                    "clusters leave it unset to auto-detect")


@dataclasses.dataclass(frozen=True)
class Output(Devices):
  """Where results go and how the command runs, its devices included (none of these change
  results)."""
  out: str = flag("--out", "results/study", "results directory")
  resume: bool = flag("--resume", False, "continue, skipping the runs already recorded",
                      action="store_true")
  overwrite: bool = flag("--overwrite", False, "replace existing results", action="store_true")
  quiet: bool = flag("--quiet", False, "no progress output", action="store_true")
  shard: Optional[tuple[int, int]] = flag(
      "--shard", None, "run only the grid's cells whose index modulo N is I (0 <= I < N), "
      "e.g. one scheduler job per shard; `python -m experiments.publish merge` joins the "
      "shards' folders into the grid's", parse=parse_shard, metavar="I/N")


@dataclasses.dataclass(frozen=True)
class Source:
  """The pretrained source: a dataset spec pretrained once and cached, or ckpt:PATH."""
  spec: str = flag("--source", DEFAULT_SOURCE, "dataset spec to pretrain on (cached), or "
                   "ckpt:PATH", dest="source")
  epochs: float = flag("--source-epochs", 2.0, "pretraining epochs of a dataset-spec source",
                       dest="source_epochs")


@dataclasses.dataclass(frozen=True)
class Config:
  """Everything one invocation of a study computes from, typed.

  Attributes:
    cells, protocol, output, source: the shared parts.
    extra: the study's own frozen dataclass of knobs (`Study.extra`), or None.
    flags: the parsed flags by argparse destination, as given (the settings fingerprint of
      `jtransfer.protocol.outdir` and the report's command line read them; nothing computes
      from them).
  """
  cells: Cells = dataclasses.field(default_factory=Cells)
  protocol: Protocol = dataclasses.field(default_factory=Protocol)
  output: Output = dataclasses.field(default_factory=Output)
  source: Source = dataclasses.field(default_factory=Source)
  extra: Any = None
  flags: Mapping[str, Any] = dataclasses.field(default_factory=dict, compare=False)


def flag_fields(cls) -> list[dataclasses.Field]:
  """The fields of dataclass `cls` that are flags, in declaration order."""
  return [f for f in dataclasses.fields(cls) if "flag" in f.metadata]


# What `offered` may change of a composed flag (the rest is the library's declaration).
_CHANGES = frozenset({"default", "cli", "name", "dest", "help", "check"})


def offered(cls, flags: Mapping[str, Mapping[str, Any]],
            fixed: Optional[Mapping[str, Any]] = None):
  """A field holding a `cls` (a frozen dataclass of `flag` fields, e.g. `Protocol`) of which a
  command that is not a study (a benchmark's flags, `flags.command_config`) offers some flags
  under its own defaults, so the command composes the library's fields instead of declaring
  them again.

  Args:
    cls: the composed dataclass.
    flags: field name -> what the command changes of that field's flag: 'default' (the typed
      default; also the command line's unless 'cli' is given), 'name' (the flag; its
      destination follows unless 'dest' is given), 'help', 'check'; {} offers it as declared.
    fixed: field name -> the value of a field the command does not offer (default: `cls`'s).

  Raises:
    ValueError: a field of `cls` that is not a flag, or a change `flag` has no name for (a
      programming error, at import).
  """
  declared = {f.name: f for f in flag_fields(cls)}
  defaults, metas = dict(fixed or {}), {}
  for name, change in flags.items():
    if name not in declared or set(change) - _CHANGES:
      raise ValueError(f"offered({cls.__name__}): cannot offer {name!r} with {sorted(change)}")
    m = dict(declared[name].metadata)
    if "name" in change:
      m["flag"] = change["name"]
      m["dest"] = change["name"].lstrip("-").replace("-", "_")
    if "default" in change:
      defaults[name] = change["default"]
      m["cli"] = change["default"]
    m.update({k: v for k, v in change.items() if k in ("cli", "dest", "help", "check")})
    metas[name] = types.MappingProxyType(m)
  meta = dict(group=cls, offered=types.MappingProxyType(metas),
              defaults=types.MappingProxyType(defaults))
  return dataclasses.field(default_factory=lambda: cls(**defaults), metadata=meta)


def command_flags(cls) -> list[Mapping[str, Any]]:
  """The flags (`flag` metadata) of a command's dataclass `cls` in declaration order, those of
  its `offered` fields in their place."""
  out: list = []
  for f in dataclasses.fields(cls):
    if "flag" in f.metadata:
      out.append(f.metadata)
    elif "offered" in f.metadata:
      out += f.metadata["offered"].values()
  return out
