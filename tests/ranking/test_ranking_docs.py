"""The runnable examples in the ranking module docstrings run."""

from __future__ import annotations

import doctest
import importlib

import pytest

MODULES = ["funnelrec.ranking", "funnelrec.ranking.inputs", "funnelrec.ranking.base", "funnelrec.ranking.losses",
           "funnelrec.ranking.watch_time", "funnelrec.ranking.budget", "funnelrec.ranking.shared_bottom",
           "funnelrec.ranking.mmoe", "funnelrec.ranking.ple", "funnelrec.ranking.din", "funnelrec.ranking.dcnv2",
           "funnelrec.ranking.rankmixer", "funnelrec.ranking.longer", "funnelrec.ranking.transformer",
           "funnelrec.ranking.hyformer", "funnelrec.ranking.longer_rankmixer", "funnelrec.ranking.mtmixatt",
           "funnelrec.ranking.onerank", "funnelrec.ranking.solar"]


@pytest.mark.parametrize("module", MODULES)
def test_docstring_examples_run(module):
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
