"""Multi-task fusion (DESIGN §2, §5): T predicted probabilities per candidate → one ranking score.

* ``env`` — the session environment (gymnasium vector env over many users' sessions of the simulated world)
  and the oracle-greedy references;
* ``formulas`` — linear / log-sum / power-product fusion, CEM-tuned global weights, formula-based RL;
* ``rl`` — the TD3 agent and the session training loop shared by formula-based RL and xMTF;
* ``xmtf`` — Monotonic Fusion Cells, the two-stage hybrid (inner MLP + outer q·(1 + a·q)) and its losses.

Every fusion implements the ``Fusion`` protocol of the cascade (DESIGN §5): ``score(pxtr [B, M, T],
user_state [B, S]) -> [B, M]``, higher is better.

Example:
    >>> import torch
    >>> from funnelrec.fusion.formulas import FormulaFusion
    >>> isinstance(FormulaFusion("linear", torch.zeros(3)), Fusion)
    True
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from torch import Tensor

__all__ = ["Fusion"]


@runtime_checkable
class Fusion(Protocol):
    """The fusion stage of the cascade: one score per candidate from its T predictions and the user state.

    Args of ``score``:
        pxtr: [B, M, T] predicted probabilities (task order: ``funnelrec.fusion.env.TASKS``).
        user_state: [B, S] the request's user state.

    Returns:
        [B, M] scores; the cascade keeps the top candidates by score.
    """

    def score(self, pxtr: Tensor, user_state: Tensor) -> Tensor:
        ...
