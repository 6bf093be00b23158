"""Data: readers for IML data sets, synthetic forgeries, augmentations and robustness degradations.

- :class:`ForgeryDataset`, :class:`BalancedSampler` — JSON lists / ``Tp``+``Gt``(+``Au``) folders.
- :class:`Augment`, :func:`degrade`, :class:`Degrade`, :data:`ROBUSTNESS_PROTOCOL`,
  :func:`resize_or_pad` — transforms on uint8 RGB images and {0, 1} masks.
- :func:`synthesize` — write a seeded synthetic forgery data set (splice / copy-move / inpaint).
- :func:`procedural_image` — the built-in source of authentic images with camera traces.
"""
from .datasets import (IMAGE_EXTENSIONS, NON_BINARY_FRACTION, BalancedSampler, ForgeryDataset, image_size,
                       read_image, read_mask)
from .procedural import CameraTrace, procedural_image, random_trace
from .synth import KINDS, make_forgery, random_region, synthesize
from .transforms import DEGRADATIONS, ROBUSTNESS_PROTOCOL, Augment, Degrade, degrade, resize_or_pad

__all__ = [
    "ForgeryDataset", "BalancedSampler", "read_image", "read_mask", "image_size", "IMAGE_EXTENSIONS",
    "NON_BINARY_FRACTION",
    "Augment", "Degrade", "degrade", "resize_or_pad", "ROBUSTNESS_PROTOCOL", "DEGRADATIONS",
    "synthesize", "make_forgery", "random_region", "KINDS",
    "procedural_image", "random_trace", "CameraTrace",
]
