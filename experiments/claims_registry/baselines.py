"""The later baselines run beside CWL (k = 10, both archs, both targets)."""
from experiments.claims_registry.common import DIGITS, WISE_ALPHA1, one_image
from jtransfer.protocol.claims import NONINFERIORITY, SUPERIORITY
from jtransfer.protocol.registry import Evidence, Registered

MAIN = Evidence(("baselines_k10", "baselines_k10_fmnist"))
SUP0 = "superiority: the paper reports a gain; the interval must lie above 0"
_res = one_image(DIGITS, "digits; the coarsest of the evidence's targets")

CLAIMS = (
    Registered("baselines.bss_gt_finetune", "BSS", "Chen et al. 2019, Table 1",
               "suppressing small spectral components beats plain fine-tuning at few shots",
               SUPERIORITY, 0.0, SUP0, "BSS beats fine-tuning at few shots", MAIN,
               runs=("bss", "finetune")),
    Registered("baselines.bitfit_gt_freeze", "BitFit", "Ben Zaken et al. 2022",
               "training only the biases beats a frozen network with a trained head",
               SUPERIORITY, 0.0, SUP0, "training only the biases beats frozen convolutions",
               MAIN, runs=("bitfit", "freeze")),
    Registered("baselines.cotuning_gt_finetune", "Co-Tuning", "You et al. 2020, Table 1",
               "co-tuning with the source head's relationship beats fine-tuning",
               SUPERIORITY, 0.0, SUP0, "Co-Tuning beats fine-tuning", MAIN,
               runs=("cotuning", "finetune")),
    Registered("baselines.film_ge_cwl", "FiT", "Shysheya et al. 2023",
               "per-channel scale and shift (FiLM) is at least as good as scale only (CWL)",
               NONINFERIORITY, *_res,
               "FiLM (per-channel scale and shift) at least matches CWL (scale only)", MAIN,
               runs=("freeze_film", "freeze_cwl")),
    Registered("baselines.lpft_ge_finetune", "LP-FT", "Kumar et al. 2022 (in-distribution)",
               "linear probing then fine-tuning is at least as good as fine-tuning in "
               "distribution", NONINFERIORITY, *_res, "LP-FT at least matches fine-tuning",
               MAIN, runs=("lpft", "finetune")),
    Registered("baselines.wise_ft_ge_lpft", "WiSE-FT", "Wortsman et al. 2022",
               "interpolating the fine-tuned weights with the start is at least as good as the "
               "fine-tuned end", NONINFERIORITY, *_res,
               "WiSE-FT at least matches the fine-tuned model it interpolates", MAIN,
               untested=WISE_ALPHA1, runs=("wise_ft", "lpft")),
)
