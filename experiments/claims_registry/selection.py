"""Base-model selection (C_ij over the metrics S1..S6; truncation points, App. A.2)."""
from experiments.claims_registry.common import DIGITS, one_image
from jtransfer.protocol.claims import REGRET, SUPERIORITY, THRESHOLD
from jtransfer.protocol.registry import Evidence, Registered

SWAPPED = "the swapped split (source fmnist:1,5,7,8,9; targets digits and fmnist:0,2,3,4,6)"

CLAIMS = (
    Registered(
        "selection.cij_reaches_075", "Selection", "Fig. 3",
        "the combined metric C_ij(alpha) ranks base models at a mean Spearman rho of about 0.75",
        THRESHOLD, 0.1,
        "stated practical threshold (this repo's): '~0.75' read as within 0.1 rho of the "
        "paper's 0.7514; the paper gives no tolerance",
        "C_ij(alpha) reaches mean Spearman ~0.75 (within 0.1 of the paper's 0.7514, on "
        "held-out groups; effect: rho x 100)",
        Evidence(("model_selection_wide",)),
        (Evidence(("model_selection_reduced",), note="the reduced 12-model zoo"),)),
    Registered(
        "selection.cij_beats_best_single", "Selection", "Fig. 3, sec. 5.3",
        "C_ij(alpha) ranks base models better than any single metric S1..S6",
        SUPERIORITY, 0.0, "superiority: 'better than'; the interval must lie above 0",
        "C_ij(alpha), pair and alpha chosen on the other groups, ranks better than the best "
        "single metric S1..S6 (effect: rho x 100)",
        Evidence(("model_selection_wide",)),
        (Evidence(("model_selection_reduced",), note="the reduced 12-model zoo"),)),
    Registered(
        "selection.s6_tracks_truncation", "Selection", "App. A.2, Fig. 5",
        "S6 (App. A.2's sign) correlates with the accuracy of truncating and fine-tuning at "
        "each point, rho above 0.7", THRESHOLD, 0.0,
        "the paper's stated threshold 0.7, no tolerance (a strict '>')",
        "raw S6 correlates with truncate-fine-tune accuracy over the truncation points, rho > "
        "0.7 (App. A.2's sign; effect: rho x 100 against 70)",
        Evidence(("truncation_resnet_s", "truncation_vgg_s")),
        (Evidence(("truncation_resnet_s_swapped", "truncation_vgg_s_swapped"), note=SWAPPED),)),
    Registered(
        "selection.s6_pick_as_good_as_best", "Selection", "App. A.2, Fig. 4",
        "the truncation point with the largest S6 is as accurate as the best point",
        # Regret, not non-inferiority (changed in session 17, its verdict inconclusive before
        # and after; margin as registered): pick minus best is <= 0 by construction, so under
        # the non-inferiority rule an interval below 0 could never read reproduced and a
        # perfect pick (every difference 0) read "not tested".
        REGRET, *one_image(DIGITS, "digits; the coarsest of the evidence's targets"),
        "the truncation point S6 picks (largest raw S6) is as accurate as the best point",
        Evidence(("truncation_resnet_s", "truncation_vgg_s")),
        (Evidence(("truncation_resnet_s_swapped", "truncation_vgg_s_swapped"), note=SWAPPED),)),
)
