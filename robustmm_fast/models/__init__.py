"""Models with the interface of DESIGN §5, and the registry of methods the harness trains.

UME-MMA, CyIN, DMRNet, MIM and the registry are imported on first use (they are the heavy
modules); none of them imports robustmm_fast.train: the method contract they share with it is
robustmm_fast.contract."""
from .base import ModelOutput, MultimodalModel, task_loss, zero_absent
from .early_fusion import EarlyFusion
from .encoders import make_encoder
from .late_fusion import LateFusion

__all__ = ["ModelOutput", "MultimodalModel", "task_loss", "zero_absent", "make_encoder",
           "EarlyFusion", "LateFusion", "UMEMMA", "UMEMMARecipe", "CyIN", "CyINRecipe", "DMRNet",
           "DMRNetRecipe", "MIM", "MIMRecipe", "METHODS", "CyINConfig", "DMRNetConfig",
           "MIMConfig", "UMEMMAConfig", "EarlyFusionConfig", "LateFusionConfig",
           "Method", "get_method", "default_config"]

_LAZY = {"UMEMMA": "ume_mma", "UMEMMARecipe": "ume_mma", "CyIN": "cyin", "CyINRecipe": "cyin",
         "DMRNet": "dmrnet", "DMRNetRecipe": "dmrnet", "MIM": "mim", "MIMRecipe": "mim",
         "CyINConfig": "cyin", "DMRNetConfig": "dmrnet", "MIMConfig": "mim",
         "UMEMMAConfig": "ume_mma", "EarlyFusionConfig": "early_fusion",
         "LateFusionConfig": "late_fusion", "METHODS": "registry", "Method": "registry", "get_method": "registry",
         "default_config": "registry"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
