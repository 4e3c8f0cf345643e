"""Base-model selection as a study: the zoo of base models (`members`), how its members and
the ground truth are trained (`training`), the target data (`targets`), the ground-truth
fine-tuning under the protocol (`ground_truth`) and how the scores rank the zoo (`analysis`).

The scores themselves are `jtransfer.scoring` (`source_scores`, `score_outputs`) over the pure
functions of `jtransfer.methods.selection`.
"""
