"""jtransfer: transfer pretrained CNNs to few-label tasks, in JAX/Flax, functional style.

Layers (imports point down only): experiments -> methods -> train -> models/surgery -> data,
weights.
"""
__version__ = "0.1.0"
