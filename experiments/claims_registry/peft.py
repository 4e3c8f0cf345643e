"""Issue 31's parameter-efficient table (experiments/peft_table.py), registered before any run.

Evidence: one folder per arch (peft_resnet_s, peft_vgg_s, peft_vit_s28), both targets, k in
{1, 5, 10}; a claim's primary evidence is the folders whose arch runs both of its arms (the
archs share their k-shot draws, so the registry pools them per draw).

"Tuned methods lie within a point of each other" is a claim over many methods. It is tested as
one equivalence entry per method against one reference, LoRA, with a margin of half a point:
if every method's interval lies inside (-0.5, +0.5) points of LoRA, any two methods lie within
a point of each other (triangle inequality). The family claim holds when EVERY entry reads
reproduced: an intersection-union test (Berger 1982), whose level is each entry's own, so the
conjunction needs no multiplicity adjustment; it fails when any entry reads refuted.
"""
from experiments import peft_table as table
from experiments.claims_registry.common import DIGITS, one_image
from jtransfer.protocol.claims import EQUIVALENCE, NONINFERIORITY, SUPERIORITY
from jtransfer.protocol.registry import Evidence, Registered

SUP0 = "superiority: a gain is claimed; the interval must lie above 0"
_res = one_image(DIGITS, "digits; the coarsest of the evidence's targets")
HALF = (0.005, "half a point about LoRA: every method within half a point of one reference "
        "puts any two within a point (the claim's own 'within a point'), by the triangle "
        "inequality")


def folders(*arms: str) -> Evidence:
  """The folders whose arch runs every one of `arms`."""
  return Evidence(tuple(f"peft_{arch}" for arch, have in table.ARMS.items()
                        if set(arms) <= set(have)))


_ALL = tuple(dict.fromkeys(a for arms in table.ARMS.values() for a in arms))
CLAIMS = (
    Registered("peft.lora_ge_finetune", "LoRA", "Hu et al. 2022",
               "low-rank updates of the kernels are at least as good as fine-tuning them all",
               NONINFERIORITY, *_res, table.LORA_GE_FINETUNE, folders("lora", "finetune"),
               runs=("lora", "finetune")),
    Registered("peft.ssf_gt_cwl", "SSF", "Lian et al. 2022; issue 31",
               "a per-channel shift beside the scale helps: SSF beats CWL's scales alone",
               SUPERIORITY, 0.0, SUP0, table.SSF_GT_CWL, folders("ssf", "freeze_cwl"),
               runs=("ssf", "freeze_cwl")),
    *(Registered(f"peft.{a}_gt_freeze", "PEFT", "issue 31",
                 f"{table.LABELS[a]} beats a frozen backbone with a trained head", SUPERIORITY,
                 0.0, SUP0, table.beats_freeze(a), folders(a, "freeze"), runs=(a, "freeze"))
      for a in _ALL if a != "freeze"),
    *(Registered(f"peft.{a}_near_lora", "PEFT", "issue 31 (a 2025 unifying study)",
                 f"tuned with equal budgets, {table.LABELS[a]} lies within half a point of "
                 "LoRA (so the tuned methods within a point of each other)", EQUIVALENCE,
                 *HALF, table.near_reference(a), folders(a, table.REFERENCE),
                 runs=(a, table.REFERENCE))
      for a in _ALL if a not in ("freeze", table.REFERENCE)),
)
