"""Run PyTorch's own MultiheadAttention tests (test/nn/test_multihead_attention.py, not shipped in
the wheel) with nn.MultiheadAttention replaced by robustmm_fast.nn.MaskedCrossModalAttention.

    python tools/run_torch_mha_tests.py /tmp/test_mha_torch.py --impl ours  [-- pytest args]
    python tools/run_torch_mha_tests.py /tmp/test_mha_torch.py --impl torch   (the baseline)

Get the file from a PyTorch checkout: git show HEAD:test/nn/test_multihead_attention.py.
The patch is made before pytest imports the file (it does `from torch.nn import
MultiheadAttention`), in torch.nn and torch.nn.modules.activation; nn.TransformerEncoderLayer
keeps its own binding (torch.nn.modules.transformer), so the one test through it runs MHA
unless --transformer patches that binding too.
"""
from __future__ import annotations

import argparse
import sys

import pytest
import torch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("test_file")
    parser.add_argument("--impl", choices=("ours", "torch"), default="ours")
    parser.add_argument("--transformer", action="store_true",
                        help="nn.TransformerEncoderLayer's attention becomes ours too")
    args, pytest_args = parser.parse_known_args(argv)  # the rest (after --) goes to pytest
    pytest_args = [a for a in pytest_args if a != "--"]
    if args.impl == "ours":
        from robustmm_fast.nn import MaskedCrossModalAttention
        torch.nn.MultiheadAttention = MaskedCrossModalAttention
        torch.nn.modules.activation.MultiheadAttention = MaskedCrossModalAttention
        if args.transformer:
            torch.nn.modules.transformer.MultiheadAttention = MaskedCrossModalAttention
    return pytest.main([args.test_file, "-q", "-p", "no:cacheprovider", "-rfE",
                        *pytest_args])


if __name__ == "__main__":
    sys.exit(main())
