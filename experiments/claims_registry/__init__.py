"""The registered claims of the five papers and the later baselines, one entry per claim.

Each entry (`jtransfer.protocol.registry.Registered`) fixes the claim's kind, its margin and
the margin's reason, and the evidence that decides it. The margins were written before the
verdicts they produce were computed (the registry's commit precedes the one that recomputed
RESULTS.md). Margin policy, applied to every entry:

- superiority ('beats'): margin 0, the interval must exclude no gain;
- non-inferiority ('at least matches', 'keeps', 'does not hurt'): one test image, in points,
  of the coarsest test set in the primary evidence (1/898 for digits' 898 test images,
  1/1000 and 1/1500 for the Fashion-MNIST targets): the smallest difference the measurement
  can show, so the margin grants no more than measurement resolution; retrieval mAP, which has
  no one-image unit, takes a stated practical threshold;
- thresholds (a statistic against a stated value): the paper's value, with a tolerance only
  where the claim itself says '~' or 'almost' (then from the paper's own numbers or stated).
"""
from experiments.claims_registry import (baselines, bn, compact, cwl, delta, peft, selection,
                                         sparse)

# Claims registered before their study ran (peft, bn) read "not tested yet" until their
# folders are published.
ALL = cwl.CLAIMS + delta.CLAIMS + selection.CLAIMS + sparse.CLAIMS + compact.CLAIMS + \
    baselines.CLAIMS + peft.CLAIMS + bn.CLAIMS

__all__ = ["ALL"]
