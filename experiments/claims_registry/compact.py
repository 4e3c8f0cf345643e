"""Compact transfer: a compact student learned jointly with (distilled from) a large target
net, against labels alone and against the large net."""
from experiments.claims_registry.common import DIGITS, one_image
from jtransfer.protocol.claims import NONINFERIORITY, SUPERIORITY
from jtransfer.protocol.registry import Evidence, Registered

MAIN = Evidence(("compact_mobilenet_v2", "compact_resnet_s", "compact_vgg_s"))
SECONDARY = (Evidence(("compact_resnet_s_swapped", "compact_vgg_s_swapped"),
                      note="the swapped split"),)
SOURCE = "the paper's joint-learning tables (compact_transfer's docstring)"
_res = one_image(DIGITS, "digits; the coarsest of the evidence's targets")

CLAIMS = (
    Registered("compact.distill_gt_scratch", "Compact", SOURCE,
               "the jointly learned compact net beats the same net trained on labels alone",
               SUPERIORITY, 0.0, "superiority: 'beats'; above 0",
               "the jointly learned compact net beats the same net trained on labels alone",
               MAIN, SECONDARY, runs=("distill", "scratch")),
    Registered("compact.distill_ft_gt_finetune", "Compact", SOURCE + "; this repo's variant",
               "from a compact pretrained source, joint learning beats fine-tuning on labels",
               SUPERIORITY, 0.0, "superiority: 'beats'; above 0",
               "joint learning beats labels alone for the compact net fine-tuned from a "
               "compact source", MAIN, SECONDARY, runs=("distill_ft", "finetune")),
    Registered("compact.distill_approaches_teacher", "Compact", SOURCE,
               "the compact net comes close to the large target net's accuracy",
               NONINFERIORITY, *_res,
               "the jointly learned compact net approaches the large target net (efficiency "
               "without reducing performance)", MAIN, SECONDARY, runs=("distill", "teacher")),
    Registered("compact.distill_ft_approaches_teacher", "Compact", SOURCE + "; this repo's "
               "variant", "from a compact source, the compact net comes close to the large net",
               NONINFERIORITY, *_res,
               "the jointly learned compact net from a compact source approaches the large "
               "target net", MAIN, SECONDARY, runs=("distill_ft", "teacher")),
)
