"""What every multi-task ranker shares: the config fields, the task heads and the ``Ranker`` contract.

Every ranker (``shared_bottom``, ``mmoe``, ``ple``, ``din``, ``dcnv2``) is ``Model(config, watch=None)`` with

* ``forward(batch) -> {"logits": [B, M, T], "watch": [B, M]}`` (``watch`` is a D2Q quantile logit or predicted
  log(1 + seconds), see ``funnelrec.ranking.watch_time``),
* ``predict(batch) -> [B, M, T]`` task probabilities,
* ``predict_watch_time(batch) -> [B, M]`` watch seconds,
* ``loss(out, batch) -> Tensor`` (``funnelrec.ranking.losses.multitask_loss`` with the model's watch head) and
  ``training_loss(batch) = loss(self(batch), batch)``.

A model file only builds its layers between ``self.inputs`` (the shared ``RankingInputs``) and ``TaskHeads`` and
writes ``forward``; this module holds the rest.

Example:
    >>> import torch
    >>> heads = TaskHeads(in_dim=8, hidden=4, num_heads=7)     # 6 tasks + the watch head
    >>> heads(torch.randn(2, 3, 8)).shape                       # one shared input
    torch.Size([2, 3, 7])
    >>> heads(torch.randn(2, 3, 7, 8), grouped=True).shape      # one input per head (MMoE / PLE towers)
    torch.Size([2, 3, 7])
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch
from torch import Tensor, nn

from funnelrec.data.batch import RequestBatch
from funnelrec.errors import ConfigError
from funnelrec.nn import GroupedLinear
from funnelrec.ranking.inputs import HISTORY_MODES, RankingFeatures, RankingInputs
from funnelrec.ranking.losses import multitask_loss
from funnelrec.ranking.watch_time import WATCH_HEADS, WatchTimeDebiaser, resolve_watch_head, watch_seconds


def check_widths(name: str, widths, allow_empty: bool = False) -> None:
    """``ConfigError`` unless ``widths`` is a list of positive ints (non-empty unless ``allow_empty``)."""
    if not isinstance(widths, (list, tuple)) or (not widths and not allow_empty) or \
            any(not isinstance(w, int) or isinstance(w, bool) or w < 1 for w in widths):
        raise ConfigError(f"{name} must be a {'' if allow_empty else 'non-empty '}list of positive ints, got "
                          f"{widths!r}")


@dataclass
class RankerConfig:
    """Fields every ranker config has (the spec-derived sizes are filled by ``funnelrec.ranking.ranker_config``).

    Args:
        user_vocab: rows of each user sparse field (``FeatureSpec.vocab_sizes("user_sparse")``).
        item_vocab: rows of each item sparse field; field 0 is the item id, shared with the history.
        user_dense: Du.  item_dense: Di.
        num_tasks: T, the binary tasks (the watch head comes on top).
        embed_dim: D of every embedding.
        history_pool: how many of the most recent history events are read.
        history_mode: ``"pool"`` (mean + positive-weighted mean) or ``"target"`` (DIN target attention).
        attention_hidden: hidden widths of the target-attention activation unit (``history_mode="target"``).
        attention_normalize: None (DIN, unnormalised) or ``"softmax"``.
        use_position: feed the display position (position bias); serving passes position 0.
        head: hidden width of each task head (and the watch head).
        dropout: dropout in the MLPs.
        watch_head: ``"d2q"`` (duration-debiased quantile, needs a ``WatchTimeDebiaser``), ``"log1p"`` (MSE on
            log(1 + seconds)) or ``"auto"`` (``"d2q"`` when the model is given a debiaser, else ``"log1p"``).
        watch_weight: weight of the watch loss beside the mean task BCE.
    """

    user_vocab: list[int]
    item_vocab: list[int]
    user_dense: int
    item_dense: int
    num_tasks: int = 6
    embed_dim: int = 16
    history_pool: int = 100
    history_mode: str = "pool"
    attention_hidden: list[int] = field(default_factory=lambda: [16])
    attention_normalize: str | None = None
    use_position: bool = True
    head: int = 32
    dropout: float = 0.0
    watch_head: str = "auto"
    watch_weight: float = 0.1

    def __post_init__(self) -> None:
        name = type(self).__name__
        check_widths(f"{name}.user_vocab", self.user_vocab)
        check_widths(f"{name}.item_vocab", self.item_vocab)
        check_widths(f"{name}.attention_hidden", self.attention_hidden)
        for key in ("user_dense", "item_dense", "history_pool"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 0:
                raise ConfigError(f"{name}.{key} must be an int >= 0, got {getattr(self, key)!r}")
        for key in ("num_tasks", "embed_dim", "head"):
            if not isinstance(getattr(self, key), int) or getattr(self, key) < 1:
                raise ConfigError(f"{name}.{key} must be an int >= 1, got {getattr(self, key)!r}")
        if self.history_mode not in HISTORY_MODES:
            raise ConfigError(f"{name}.history_mode must be one of {HISTORY_MODES}, got {self.history_mode!r}")
        if self.attention_normalize not in (None, "softmax"):
            raise ConfigError(f"{name}.attention_normalize must be None or 'softmax', got "
                              f"{self.attention_normalize!r}")
        if self.watch_head not in WATCH_HEADS:
            raise ConfigError(f"{name}.watch_head must be one of {WATCH_HEADS}, got {self.watch_head!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"{name}.dropout must lie in [0, 1), got {self.dropout}")
        if self.watch_weight < 0:
            raise ConfigError(f"{name}.watch_weight must be >= 0, got {self.watch_weight}")

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


class TaskHeads(nn.Module):
    """``num_heads`` small towers ``Linear → SiLU → Linear → 1``, evaluated together (``GroupedLinear``).

    Args:
        in_dim: width of the tower input.
        hidden: hidden width of every tower.
        num_heads: towers (T tasks + 1 watch head).

    ``forward(x)`` takes x [..., in_dim] (every tower reads it) or, with ``grouped=True``, x [..., num_heads, in_dim]
    (tower k reads x[..., k, :]) and returns [..., num_heads].
    """

    def __init__(self, in_dim: int, hidden: int, num_heads: int):
        super().__init__()
        self.hidden = GroupedLinear(num_heads, in_dim, hidden)
        self.act = nn.SiLU()
        self.out = GroupedLinear(num_heads, hidden, 1)

    def forward(self, x: Tensor, grouped: bool = False) -> Tensor:
        """x [..., in] (or [..., K, in] with ``grouped``) → [..., K]."""
        return self.out(self.act(self.hidden(x, grouped=grouped)), grouped=True).squeeze(-1)


class MultiTaskRanker(nn.Module):
    """Base of every ranker: the shared inputs, the watch-head choice and the contract (module docstring).

    Args:
        config: a ``RankerConfig`` subclass.
        watch: a fitted ``WatchTimeDebiaser`` for a D2Q watch head (it becomes the submodule ``watch``, so its tables
            are in the model's ``state_dict``), or None.
    """

    def __init__(self, config: RankerConfig, watch: WatchTimeDebiaser | None = None):
        super().__init__()
        if not isinstance(config, RankerConfig):
            raise ConfigError(f"{type(self).__name__} needs a RankerConfig, got {type(config).__name__}")
        self.config = config
        self.watch_head = resolve_watch_head(config.watch_head, watch)  # "d2q" or "log1p"
        self.watch = watch if self.watch_head == "d2q" else None
        self.inputs = RankingInputs.from_config(config)

    @property
    def num_heads(self) -> int:
        """T + 1: the task heads and the watch head."""
        return self.config.num_tasks + 1

    def features(self, batch: RequestBatch) -> RankingFeatures:
        """The shared input features of every candidate."""
        return self.inputs(batch)

    def split_heads(self, y: Tensor) -> dict[str, Tensor]:
        """[B, M, T + 1] head outputs → ``{"logits": [B, M, T], "watch": [B, M]}``."""
        return {"logits": y[..., :-1], "watch": y[..., -1]}

    def forward(self, batch: RequestBatch) -> dict[str, Tensor]:  # pragma: no cover - every model defines it
        raise NotImplementedError

    def predict(self, batch: RequestBatch) -> Tensor:
        """[B, M, T] task probabilities (the ``Ranker`` protocol)."""
        return torch.sigmoid(self(batch)["logits"])

    def predict_watch_time(self, batch: RequestBatch) -> Tensor:
        """[B, M] predicted watch seconds."""
        return watch_seconds(self(batch)["watch"], batch.duration_s, self.watch)

    def loss(self, out: dict[str, Tensor], batch: RequestBatch) -> Tensor:
        """Mean BCE over tasks × real candidates + ``config.watch_weight`` × the watch head's loss."""
        return multitask_loss(out, batch, watch_weight=self.config.watch_weight, watch=self.watch)

    def training_loss(self, batch: RequestBatch) -> Tensor:
        """``self.loss(self(batch), batch)``."""
        return self.loss(self(batch), batch)
