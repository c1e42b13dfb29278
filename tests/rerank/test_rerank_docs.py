"""The runnable examples in the re-ranking module docstrings run."""

from __future__ import annotations

import doctest
import importlib

import pytest


@pytest.mark.parametrize("module", ["funnelrec.rerank", "funnelrec.rerank.data",
                                    "funnelrec.rerank.generators", "funnelrec.rerank.layers",
                                    "funnelrec.rerank.independent", "funnelrec.rerank.flash_evaluator",
                                    "funnelrec.rerank.item_sum", "funnelrec.rerank.training",
                                    "funnelrec.rerank.reranker", "funnelrec.bench.rerank"])
def test_docstring_examples_run(module):
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
