"""Online serving: the HTTP service, its feedback log and real-time histories (and the cascade behind them).

* ``funnelrec.serving.schemas`` — the JSON contract (pydantic models).
* ``funnelrec.serving.backend`` — :class:`ServingBackend`, what the service calls.
* ``funnelrec.serving.app`` — :func:`create_app`, :class:`ServiceConfig` (FastAPI).
* ``funnelrec.serving.server`` — :func:`serve` (uvicorn), :func:`background_server`.
* ``funnelrec.serving.feedback_log`` — :class:`FeedbackLog`, the fsynced append-only log compacted into
  Parquet.
* ``funnelrec.serving.history`` — :class:`LiveTimelines`, the logged histories plus the feedback since.

Names are imported lazily, so ``import funnelrec.serving`` costs nothing until one is used.

Example:
    >>> import funnelrec.serving as serving
    >>> serving.ServiceConfig().host
    '127.0.0.1'
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ServiceConfig": "funnelrec.serving.app",
    "create_app": "funnelrec.serving.app",
    "ServingBackend": "funnelrec.serving.backend",
    "FeedbackLog": "funnelrec.serving.feedback_log",
    "LiveTimelines": "funnelrec.serving.history",
    "FeedbackEvent": "funnelrec.serving.schemas",
    "FeedbackRequest": "funnelrec.serving.schemas",
    "RecommendRequest": "funnelrec.serving.schemas",
    "RecommendResponse": "funnelrec.serving.schemas",
    "RecommendedItem": "funnelrec.serving.schemas",
    "serve": "funnelrec.serving.server",
    "background_server": "funnelrec.serving.server",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'funnelrec.serving' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
