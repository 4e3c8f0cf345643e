"""BatchNorm mode when fine-tuning (issue 29 item 11), registered before experiments.bn_mode ran.

Kind and margin were fixed here before any run (session 12); the primary folder
(published/bn_mode, nested tuning) and the secondary ones were published in session 13."""
from experiments.bn_mode import CLAIM_TEXT
from jtransfer.protocol.claims import SUPERIORITY
from jtransfer.protocol.registry import Evidence, Registered

MAIN = Evidence(("bn_mode",), where={"arch": ("resnet_s",)}, note="resnet_s, the arch with BN")
SHARED = Evidence(("bn_mode_shared",), where={"arch": ("resnet_s",)},
                  note="the same cells tuned on one shared tuning draw")

CLAIMS = (
    Registered("bn.train_mode_gt_frozen_stats", "BN mode", "issue 29 item 11",
               "fine-tuning with BatchNorm in train mode (batch statistics) beats fine-tuning "
               "with the source's running statistics frozen, at k = 1, 3, 5, 10",
               SUPERIORITY, 0.0,
               "superiority: the default fine-tuning mode changes only for a gain, so the "
               "interval must lie above 0 (a tie keeps the default)", CLAIM_TEXT, MAIN,
               secondary=(SHARED,), runs=("finetune_bn", "finetune")),
)
