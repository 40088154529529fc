"""Triton kernels, installed as the subpackage ``robustmm_fast.kernels`` (setup.py package_dir).

Importing this package requires triton; robustmm_fast imports it only when the triton backend
is asked for or probed.
"""
import triton  # noqa: F401  (fail here, clearly, when triton is missing)
