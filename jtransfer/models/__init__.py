"""Flax linen models applied as pure functions, built from width configs, with feature taps."""
from jtransfer.models.apply import (abstract_variables, apply_model, available_taps,
                                    init_model, init_params_subset)
from jtransfer.models.common import COMPUTE_DTYPES
from jtransfer.models.registry import (SMALL_ARCHS, from_config, get_model, model_config,
                                       names)

__all__ = ["COMPUTE_DTYPES", "SMALL_ARCHS", "abstract_variables", "apply_model",
           "available_taps", "from_config", "get_model", "init_model", "init_params_subset",
           "model_config", "names"]
