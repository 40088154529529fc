"""Datasets of the harness: one dataset type and its loaders.

- ``load_handwritten``: the embedded UCI Multiple Features (6 views, 2,000 digits) default.
- ``load_mmsa``: MMSA feature pickles of CMU-MOSI / CMU-MOSEI / CH-SIMS.
- ``load_avmnist``: MultiBench AV-MNIST arrays.
- ``make_synthetic``: controllable shared / specific / noise information, MOSI/MOSEI shapes.
"""
from .avmnist import load_avmnist
from .dataset import SPLITS, TASKS, Batch, MultimodalDataset
from .handwritten import load_handwritten
from .mmsa import load_mmsa
from .synthetic import make_synthetic

__all__ = ["MultimodalDataset", "Batch", "SPLITS", "TASKS", "load_handwritten", "load_mmsa",
           "load_avmnist", "make_synthetic"]
