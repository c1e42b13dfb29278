"""The runnable examples in the serving module docstrings run (app and server start a real uvicorn server)."""

from __future__ import annotations

import doctest
import importlib

import pytest


@pytest.mark.parametrize("module", ["funnelrec.serving", "funnelrec.serving.schemas",
                                    "funnelrec.serving.history", "funnelrec.serving.feedback_log",
                                    "funnelrec.serving.backend", "funnelrec.serving.app",
                                    "funnelrec.serving.server"])
def test_docstring_examples_run(module):
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
