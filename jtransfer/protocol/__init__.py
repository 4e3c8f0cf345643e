"""The comparison protocol (docs/protocol.md): run budgets by convergence, hyper-parameter
selection on validation data, paired statistics and claims. Sits above train/ and methods/,
below experiments/: experiment modules declare their tables and claims and use these."""
from jtransfer.protocol import budget, claims, stats, tuning
from jtransfer.protocol.budget import Budget, fit_converged, stopping_point
from jtransfer.protocol.claims import decide
from jtransfer.protocol.stats import paired
from jtransfer.protocol.tuning import kfold, tune

__all__ = ["Budget", "budget", "claims", "fit_converged", "kfold", "paired", "stats",
           "stopping_point", "tune", "tuning", "decide"]
