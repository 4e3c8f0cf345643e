"""Sparse deep transfer (Liu et al. 2017): Tables 1-3, Fig. 3."""
from experiments.claims_registry.common import DIGITS, NO_NEURON_REMOVED, one_image
from jtransfer.protocol.claims import NONINFERIORITY, SUPERIORITY, THRESHOLD
from jtransfer.protocol.registry import DOSE, Evidence, Registered

MAIN = Evidence(("sparse_transfer",))
SECONDARY = (Evidence(("sparse_transfer_swapped",), note="the swapped split"),)
SUP0 = "superiority: Table 1 reports a gain; the interval must lie above 0"
_res = one_image(DIGITS, "digits; the coarsest of the evidence's targets")


def _t1(id_, text, statement, a, b):
  return Registered(f"sparse.{id_}", "Sparse", "Table 1", statement, SUPERIORITY, 0.0, SUP0,
                    text, MAIN, SECONDARY)


CLAIMS = (
    Registered("sparse.hybrid_ge_standard", "Sparse", "Table 1",
               "the hybrid net (sparse source, reference branch) is at least as accurate as "
               "standard transfer", NONINFERIORITY, *_res,
               "Hybrid-TransferNet (S+K+) is at least as accurate as Standard-TransferNet (S-K-)",
               MAIN, SECONDARY),
    _t1("sparsity_contributes", "model sparsity contributes: S+K+ beats S-K+",
        "with the reference branch, a sparse source beats a dense one", "hybrid", "S-K+"),
    _t1("knowledge_contributes", "implicit knowledge contributes: S+K+ beats S+K-",
        "with a sparse source, the reference branch helps", "hybrid", "S+K-"),
    _t1("sparsity_alone", "sparsity alone helps: S+K- beats Standard",
        "a sparse source alone beats standard transfer", "S+K-", "standard"),
    _t1("knowledge_alone", "implicit knowledge alone helps: S-K+ beats Standard",
        "the reference branch alone beats standard transfer", "S-K+", "standard"),
    Registered("sparse.target_pruning_keeps_hybrid", "Sparse", "Fig. 3, Table 3",
               "pruning the transferred net's connections keeps the dense hybrid's accuracy up "
               "to high pruning rates", DOSE, *_res,
               "Sparse-TargetNet keeps the dense Hybrid's accuracy at high pruning rates",
               MAIN, SECONDARY, dose="rate", dose_at=0.975,
               dose_reason="the grid's highest rate (97.5% of connections): the claim is about "
                           "high rates, so it is read at the highest one run"),
    Registered("sparse.knowledge_helps_pruning", "Sparse", "Fig. 3",
               "the pruned net with the reference branch beats the pruned net without it",
               SUPERIORITY, 0.0, "superiority: Fig. 3 shows a gain; above 0",
               "implicit knowledge helps pruning: Sparse-TargetNet beats Sparse-TargetNet(K-)",
               MAIN, SECONDARY),
    Registered("sparse.neuron_pruning_keeps_accuracy", "Sparse", "Tables 2-3",
               "pruning fc neurons keeps standard transfer's accuracy", NONINFERIORITY, *_res,
               "neuron pruning keeps accuracy within a point of Standard-TransferNet",
               MAIN, SECONDARY, untested=NO_NEURON_REMOVED),
    Registered("sparse.neuron_pruning_removes_half", "Sparse", "Tables 2-3",
               "neuron pruning removes almost half of the fc6 + fc7 neurons", THRESHOLD, 0.06,
               "the paper's own numbers: it removes 44% (Indoor) and 50%; 'almost half' read "
               "as at least its lower 44%, 6 points under half",
               "neuron pruning removes almost half of the fc6 + fc7 neurons (effect: removed "
               "share x 100 against 50)", MAIN, SECONDARY),
)
