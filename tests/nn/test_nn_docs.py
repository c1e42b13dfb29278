"""The runnable examples in the nn module docstrings run."""

from __future__ import annotations

import doctest
import importlib

import pytest


@pytest.mark.parametrize("module", ["funnelrec.nn.embedding", "funnelrec.nn.attention", "funnelrec.nn.cross",
                                    "funnelrec.nn.experts", "funnelrec.nn.tokenizers",
                                    "funnelrec.nn.token_mixing", "funnelrec.nn.routers", "funnelrec.nn.masks",
                                    "funnelrec.nn.seq_attention", "funnelrec.nn.autotoken",
                                    "funnelrec.nn.mix_attention", "funnelrec.nn.scenario_moe", "funnelrec.nn.mlora",
                                    "funnelrec.nn.svd_attention"])
def test_docstring_examples_run(module):
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
