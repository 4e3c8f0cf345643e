"""Data: in-memory image sets, real loaders, few-shot splits, preprocessing, batching."""
from jtransfer.data.base import Dataset, ImageSet, validate_images
from jtransfer.data.fewshot import sample_kshot, subset_classes
from jtransfer.data.loader import Batches
from jtransfer.data.preprocess import channel_stats, normalize
from jtransfer.data.spec import DataSpec, load_spec, parse_spec

__all__ = ["Batches", "DataSpec", "Dataset", "ImageSet", "channel_stats", "load_spec",
           "normalize", "parse_spec", "sample_kshot", "subset_classes", "validate_images"]
