"""DELTA (Li et al. 2019): Table 1's orderings and Fig. 3."""
from experiments.claims_registry.common import DIGITS, one_image
from jtransfer.protocol.claims import NONINFERIORITY, SUPERIORITY
from jtransfer.protocol.convergence import not_converged
from jtransfer.protocol.registry import Evidence, Registered

MAIN = Evidence(("delta_table_k10",))
# Registered before its run (session 17), as the primary evidence of the four "> L2-FE" claims:
# delta_table_k10's grid again with L2-FE converged. There L2-FE ran at the untuned lr 0.01
# and stopped at the 200-step cap in 13 of 20 runs, so those claims are not tested on it. Here
# its LR is tuned like the other arms' knobs and it has its own 1000-step cap (a head on
# cached features; in a probe of L2-FE alone, every run stopped by patience under that cap,
# most at the cap under 200 even at a tuned LR). The other arms are as in delta_table_k10.
#   python -m experiments.delta_table --arch vgg_s,resnet_s --target digits
#     --target fmnist:1,5,7,8,9 --shots 10 --repeats 10 --tune-repeats 1 --cv-folds 0
#     --no-paper-grid --l2fe-lrs 0.01,0.1 --l2fe-steps 1000 --cap-share 0.1 --no-curves
#     --out published/delta_table_k10_l2fe
L2FE = Evidence(("delta_table_k10_l2fe",))
# Registered before its run (session 16; --l2fe-steps added in session 17, still before it):
# delta_table_k10's grid on the embedded ViT, with L2-FE converged as above:
#   python -m experiments.delta_table --arch vit_s28 --target digits --target fmnist:1,5,7,8,9
#     --shots 10 --repeats 10 --tune-repeats 1 --cv-folds 0 --no-paper-grid
#     --l2fe-lrs 0.01,0.1 --l2fe-steps 1000 --cap-share 0.1 --no-curves
#     --out published/delta_table_vit_s28
VIT = Evidence(("delta_table_vit_s28",), note="the embedded ViT (vit_s28, AdamW source): "
               "feature maps are token x channel, the attention from ablating channels of "
               "evenly spaced block outputs (methods/delta_tokens.py)")
SECONDARY = (Evidence(("delta_table_swapped_k10",), note="the swapped split"), VIT)
# The "> L2-FE" claims: delta_table_k10 beside the converged rerun, as secondary evidence.
SECONDARY_L2FE = (Evidence(("delta_table_k10",), note="L2-FE at the untuned lr 0.01 and the "
                           "200-step cap"),) + SECONDARY
SUP0 = "superiority: Table 1 reports a gain; the interval must lie above 0"
_res = one_image(DIGITS, "digits; the coarsest of the evidence's targets")


def _entry(id_, text, statement, kind, a, b):
  margin = (0.0, SUP0) if kind == SUPERIORITY else _res
  # A baseline still at its step cap in most runs measures its budget (issue 29 item 6).
  untested = not_converged(b) if b == "l2fe" else None
  primary, secondary = (L2FE, SECONDARY_L2FE) if b == "l2fe" else (MAIN, SECONDARY)
  return Registered(f"delta.{id_}", "DELTA", "Table 1", statement, kind, *margin, text,
                    primary, secondary, untested=untested, runs=(a, b))


CLAIMS = (
    _entry("delta_ge_noatt", "DELTA >= DELTA w/o ATT",
           "the attention over channels does not make DELTA worse", NONINFERIORITY,
           "delta", "delta_noatt"),
    _entry("noatt_ge_l2sp", "DELTA w/o ATT >= L2-SP",
           "regularising feature maps is at least as good as regularising weights toward the "
           "start", NONINFERIORITY, "delta_noatt", "l2sp"),
    _entry("l2sp_ge_l2", "L2-SP >= L2", "pulling weights toward the start is at least as good "
           "as plain weight decay", NONINFERIORITY, "l2sp", "l2"),
    _entry("delta_gt_l2sp", "DELTA > L2-SP", "DELTA beats L2-SP", SUPERIORITY, "delta", "l2sp"),
    _entry("l2_gt_l2fe", "L2 > L2-FE", "fine-tuning the whole net beats training a head on "
           "frozen features", SUPERIORITY, "l2", "l2fe"),
    _entry("l2sp_gt_l2fe", "L2-SP > L2-FE", "L2-SP beats a head on frozen features",
           SUPERIORITY, "l2sp", "l2fe"),
    _entry("noatt_gt_l2fe", "DELTA w/o ATT > L2-FE", "DELTA w/o ATT beats a head on frozen "
           "features", SUPERIORITY, "delta_noatt", "l2fe"),
    _entry("delta_gt_l2fe", "DELTA > L2-FE", "DELTA beats a head on frozen features",
           SUPERIORITY, "delta", "l2fe"),
    Registered(
        "delta.fig3_filters_move_farther", "DELTA", "Fig. 3",
        "DELTA lets the conv filters move farther from the pretrained start than L2-SP does",
        SUPERIORITY, 0.0, "superiority: Fig. 3 shows larger distances; above 0",
        "DELTA's filters move farther from the starting point than L2-SP's (effect: mean "
        "conv-filter L2 distance x 100)", MAIN, SECONDARY[:1],  # a ViT has no conv filters
        runs=("delta", "l2sp")),
)
