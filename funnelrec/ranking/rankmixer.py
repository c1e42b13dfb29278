"""RankMixer: feature tokens, parameter-free token mixing and per-token FFNs (Zhu et al., CIKM'25, arXiv 2507.15551).

``RankingInputs`` (the shared encoder; the history reaches the model through its pooling, as in every non-sequence
ranker) → the flat features [B, M, F_in] cut into T tokens of width D → L blocks of

    S = LN(TokenMixing(X) + X)          # parameter-free: token h = head h of every token (H = T)
    X' = LN(PFFN(S) + S)                # post-LN; PFFN: a separate FFN per token (or a sparse MoE per token)

→ the mean over tokens → T task heads + the watch head. Mixing lets every token see a slice of every other token
(cross-feature interaction) without attention's cost; PFFN gives each feature subspace its own parameters.

What is the paper's and what is ours:

* **Paper**: features grouped by semantics into T tokens of width D; the mixing formula (H = T, D % T == 0);
  post-LN residual blocks; the per-token FFN ``W2^t GELU(W1^t s_t)`` as one batched matmul; mean pooling before
  the task towers; the ReLU-routed per-token MoE with an L1 penalty on the gates aimed at a target activation
  ratio; DTSI (a training and an inference router, L1 on the inference router only, only the inference router
  used at inference); the ablations as switches: ``mixing=False`` (no token mixing) and ``ffn="shared"`` (one FFN
  for all tokens: the same FLOPs, 1/T of the FFN parameters).
* **Ours** (the paper leaves them open or we read it one way): the paper's tokenizer concatenates the embeddings
  in semantic order and splits them into equal chunks — ``tokenizer="auto"`` here, as ``RankingInputs`` already
  lays the features out by group, with ``torch.tensor_split`` chunks when T does not divide F; the default
  ``"semantic"`` tokenizer projects each named group on its own (variable widths), with the six default groups
  below; the sizes (T = 6, D = 48, k = 3, L = 2, chosen to match the baselines' dense budget, not the paper's
  100M/1B; the paper's k is not given); the λ controller (a PI controller in log space on the measured ratio each
  training step, slow by default; the paper only says "adaptive"); how DTSI combines its routers in training
  (``dtsi_mix``); the experts' width (k·D / E, so the MoE has the dense PFFN's parameters; see
  ``funnelrec.nn.routers`` for both); dropout on the FFN output; the L1 penalty is added by ``training_loss``
  (``loss`` stays the plain multi-task loss of the contract).

Input fields (what ``token_groups`` names; in ``RankingInputs`` order): ``user_sparse_0`` … (user id first),
``item_sparse_0`` … (item id first), ``tab``, ``hour``, ``position`` (``use_position``), ``history_mean``,
``history_positive``, ``user_dense_0`` …, ``item_dense_0`` …, ``duration``. Default groups (T = 6):
``user_id`` [user_sparse_0], ``user_profile`` [the other user fields + user dense], ``item_id``
[item_sparse_0], ``item_profile`` [the other item fields + item dense + duration], ``context`` [tab, hour,
position], ``history`` [history_mean, history_positive].

Example:
    >>> from funnelrec.data.batch import RequestBatch
    >>> model = RankMixer(RankMixerConfig(user_vocab=[10, 3], item_vocab=[20], user_dense=0, item_dense=0))
    >>> out = model(RequestBatch.empty(batch_size=2, history=5, candidates=3, user_fields=2))
    >>> out["logits"].shape, out["watch"].shape
    (torch.Size([2, 3, 6]), torch.Size([2, 3]))
    >>> model.tokenizer.token_names
    ['user_id', 'user_profile', 'item_id', 'item_profile', 'context', 'history']
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from funnelrec.data.batch import RequestBatch
from funnelrec.errors import ConfigError
from funnelrec.nn.routers import DTSI_MIXES, ReLURouterMoE
from funnelrec.nn.token_mixing import PerTokenFFN, SharedFFN, token_mixing
from funnelrec.nn.tokenizers import AutoSplitTokenizer, SemanticTokenizer, check_groups
from funnelrec.ranking.base import MultiTaskRanker, RankerConfig, TaskHeads
from funnelrec.ranking.watch_time import WatchTimeDebiaser

TOKENIZERS = ("semantic", "auto")
FFNS = ("per_token", "shared", "sparse_moe")


@dataclass
class RankMixerConfig(RankerConfig):
    """Sizes and switches of ``RankMixer`` (the common fields are documented on ``RankerConfig``).

    Args:
        tokenizer: ``"semantic"`` (one token per group of ``token_groups``) or ``"auto"`` (the flat features split
            into ``num_tokens`` equal chunks).
        token_groups: token name → input field names (see the module docstring); None for the default six groups.
        num_tokens: T; None means the number of semantic groups (6 by default). With ``"semantic"`` it must equal
            the number of groups.
        dim: D, the token width (divisible by T: mixing uses H = T heads).
        num_layers: L blocks.
        ffn_mult: k, the FFN hidden width is k·D.
        mixing: token mixing on (False: the paper's "w/o token mixing" ablation; tokens meet only in the pooling).
        ffn: ``"per_token"`` (PFFN), ``"shared"`` (one FFN for all tokens, the ablation) or ``"sparse_moe"``
            (a ReLU-routed MoE per token).
        num_experts: E experts per token (``"sparse_moe"``).
        expert_hidden: hidden width of each expert; None means k·D // E (the same parameters as the dense PFFN).
        dtsi: dense-train / sparse-infer routing (``"sparse_moe"`` only).
        dtsi_mix: how DTSI's two routers combine in training: ``"sample"`` or ``"average"``.
        target_activation: target share of open expert gates r* in (0, 1]; None keeps ``l1_coef`` fixed.
        l1_coef: initial (or fixed) coefficient λ of the L1 penalty on the gates.
        l1_adapt_rate: integral gain of the λ controller per training step.
    """

    tokenizer: str = "semantic"
    token_groups: dict[str, list[str]] | None = None
    num_tokens: int | None = None
    dim: int = 48
    num_layers: int = 2
    ffn_mult: int = 3
    mixing: bool = True
    ffn: str = "per_token"
    num_experts: int = 4
    expert_hidden: int | None = None
    dtsi: bool = False
    dtsi_mix: str = "sample"
    target_activation: float | None = 0.25
    l1_coef: float = 1e-5
    l1_adapt_rate: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        name = "RankMixerConfig"
        if self.tokenizer not in TOKENIZERS:
            raise ConfigError(f"{name}.tokenizer must be one of {TOKENIZERS}, got {self.tokenizer!r}")
        if self.ffn not in FFNS:
            raise ConfigError(f"{name}.ffn must be one of {FFNS}, got {self.ffn!r}")
        if self.dtsi_mix not in DTSI_MIXES:
            raise ConfigError(f"{name}.dtsi_mix must be one of {DTSI_MIXES}, got {self.dtsi_mix!r}")
        for key in ("dim", "num_layers", "ffn_mult", "num_experts"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name}.{key} must be an int >= 1, got {value!r}")
        for key in ("num_tokens", "expert_hidden"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
                raise ConfigError(f"{name}.{key} must be None or an int >= 1, got {value!r}")
        for key in ("mixing", "dtsi"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"{name}.{key} must be a bool, got {getattr(self, key)!r}")
        if self.dtsi and self.ffn != "sparse_moe":
            raise ConfigError(f"{name}.dtsi needs ffn='sparse_moe' (DTSI routes experts), got ffn={self.ffn!r}")
        if self.target_activation is not None and not 0 < self.target_activation <= 1:
            raise ConfigError(f"{name}.target_activation must be None or in (0, 1], got {self.target_activation!r}")
        if not self.l1_coef >= 0:
            raise ConfigError(f"{name}.l1_coef must be >= 0, got {self.l1_coef!r}")
        if not self.l1_adapt_rate >= 0:
            raise ConfigError(f"{name}.l1_adapt_rate must be >= 0, got {self.l1_adapt_rate!r}")
        fields = self.input_fields()
        groups = self.groups()
        if self.token_groups is None and self.tokenizer == "semantic":
            empty = [g for g, members in groups.items() if not members]
            if empty:
                raise ConfigError(f"{name}.token_groups: the default group {empty[0]!r} has no input field for this "
                                  f"feature spec; pass token_groups explicitly or use tokenizer='auto'")
        if self.token_groups is not None or self.tokenizer == "semantic":
            check_groups(fields, groups, f"{name}.token_groups")
        t = self.tokens
        if self.tokenizer == "semantic" and t != len(groups):
            raise ConfigError(f"{name}.num_tokens ({t}) must equal the number of token_groups ({len(groups)}) with "
                              f"tokenizer='semantic'")
        if self.tokenizer == "auto" and t > sum(fields.values()):
            raise ConfigError(f"{name}.num_tokens ({t}) exceeds the {sum(fields.values())} input features")
        if self.dim % t:
            raise ConfigError(f"{name}.dim ({self.dim}) must be divisible by the token count T={t} (token mixing "
                              f"uses H = T heads of width D / T)")
        if self.ffn == "sparse_moe" and self.expert_hidden is None and self.ffn_mult * self.dim < self.num_experts:
            raise ConfigError(f"{name}.num_experts ({self.num_experts}) exceeds ffn_mult * dim; set expert_hidden")

    # ------------------------------------------------------------------ derived
    def input_fields(self) -> dict[str, int]:
        """Name → width of every input feature, in the order of ``RankingInputs``' flat features."""
        d = self.embed_dim
        names = [f"user_sparse_{i}" for i in range(len(self.user_vocab))]
        names += [f"item_sparse_{i}" for i in range(len(self.item_vocab))]
        names += ["tab", "hour"] + (["position"] if self.use_position else []) + ["history_mean", "history_positive"]
        fields = {n: d for n in names}
        fields.update({f"user_dense_{i}": 1 for i in range(self.user_dense)})
        fields.update({f"item_dense_{i}": 1 for i in range(self.item_dense)})
        fields["duration"] = 1
        return fields

    def default_token_groups(self) -> dict[str, list[str]]:
        """The six default semantic groups (module docstring); a group can be empty for a small feature spec."""
        f = list(self.input_fields())
        return {
            "user_id": ["user_sparse_0"],
            "user_profile": [n for n in f if (n.startswith("user_sparse_") and n != "user_sparse_0")
                             or n.startswith("user_dense_")],
            "item_id": ["item_sparse_0"],
            "item_profile": [n for n in f if (n.startswith("item_sparse_") and n != "item_sparse_0")
                             or n.startswith("item_dense_") or n == "duration"],
            "context": [n for n in ("tab", "hour", "position") if n in f],
            "history": ["history_mean", "history_positive"],
        }

    def groups(self) -> dict[str, list[str]]:
        """``token_groups``, or the defaults."""
        return dict(self.token_groups) if self.token_groups is not None else self.default_token_groups()

    @property
    def tokens(self) -> int:
        """T."""
        return self.num_tokens if self.num_tokens is not None else len(self.groups())

    @property
    def ffn_hidden(self) -> int:
        """Hidden width of the dense FFN (k·D) or of each expert."""
        if self.ffn == "sparse_moe":
            return self.expert_hidden or self.ffn_mult * self.dim // self.num_experts
        return self.ffn_mult * self.dim


class RankMixerBlock(nn.Module):
    """``S = LN(mix(X) + X)``, ``X' = LN(drop(FFN(S)) + S)`` on tokens [..., T, D] (post-LN, as in the paper).

    Args:
        dim: D.
        ffn: the FFN over tokens (``PerTokenFFN``, ``SharedFFN`` or ``ReLURouterMoE``).
        mixing: apply token mixing (False: the block is the FFN sub-layer only).
        dropout: dropout on the FFN output.

    ``forward(x, mask=None)``: x [..., T, D] → [..., T, D]; ``mask`` (the leading dims) reaches a MoE's penalty.
    """

    def __init__(self, dim: int, ffn: nn.Module, mixing: bool = True, dropout: float = 0.0):
        super().__init__()
        self.mixing = mixing
        self.mix_norm = nn.LayerNorm(dim) if mixing else None
        self.ffn = ffn
        self.ffn_norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        """x [..., T, D] → [..., T, D]."""
        if self.mix_norm is not None:
            x = self.mix_norm(token_mixing(x) + x)
        y = self.ffn(x, mask) if isinstance(self.ffn, ReLURouterMoE) else self.ffn(x)
        return self.ffn_norm(self.drop(y) + x)


class RouterPenaltyMixin:
    """The L1 gate penalty and the activation ratio of a ranker whose blocks may hold ``ReLURouterMoE`` layers
    (RankMixer, MTmixAtt). The ranker lists them in ``moe_layers()``; ``training_loss`` adds the penalty."""

    def moe_layers(self) -> list[ReLURouterMoE]:
        raise NotImplementedError

    def router_penalty(self) -> Tensor:
        """Σ over blocks of λ · L1 of the last forward's gates (0 for a dense model or after an eval forward)."""
        total = self.heads.out.weight.new_zeros(())
        for moe in self.moe_layers():
            total = total + moe.penalty
        return total

    @property
    def activation_ratio(self) -> float | None:
        """Mean share of open inference-router gates over the MoE blocks in the last forward (None if dense)."""
        layers = self.moe_layers()
        return sum(m.activation_ratio for m in layers) / len(layers) if layers else None

    def training_loss(self, batch: RequestBatch) -> Tensor:
        """The multi-task loss + the L1 gate penalty of this forward (sparse MoE only)."""
        out = self(batch)
        return self.loss(out, batch) + self.router_penalty()


class RankMixer(RouterPenaltyMixin, MultiTaskRanker):
    """RankMixer multi-task ranker (see the module docstring).

    Args:
        config: a ``RankMixerConfig``.
        watch: a fitted ``WatchTimeDebiaser`` for a D2Q watch head, or None.

    With ``ffn="sparse_moe"``, ``training_loss`` adds the blocks' L1 gate penalties (``router_penalty``) to the
    multi-task loss, and every training forward steps the λ controllers; ``activation_ratio`` is the measured share
    of open (inference-router) gates of the last forward.
    """

    def __init__(self, config: RankMixerConfig, watch: WatchTimeDebiaser | None = None):
        super().__init__(config, watch)
        c = config
        t, d = c.tokens, c.dim
        if c.tokenizer == "semantic":
            self.tokenizer: nn.Module = SemanticTokenizer(c.input_fields(), c.groups(), d)
        else:
            self.tokenizer = AutoSplitTokenizer(self.inputs.out_dim, t, d)
        blocks = []
        for _ in range(c.num_layers):
            if c.ffn == "per_token":
                ffn: nn.Module = PerTokenFFN(t, d, c.ffn_hidden)
            elif c.ffn == "shared":
                ffn = SharedFFN(d, c.ffn_hidden)
            else:
                ffn = ReLURouterMoE(t, d, c.num_experts, c.ffn_hidden, dtsi=c.dtsi, dtsi_mix=c.dtsi_mix,
                                    l1_coef=c.l1_coef, target_activation=c.target_activation,
                                    adapt_rate=c.l1_adapt_rate)
            blocks.append(RankMixerBlock(d, ffn, c.mixing, c.dropout))
        self.blocks = nn.ModuleList(blocks)
        self.heads = TaskHeads(d, c.head, self.num_heads)

    def moe_layers(self) -> list[ReLURouterMoE]:
        """The sparse-MoE FFNs (empty for a dense model)."""
        return [b.ffn for b in self.blocks if isinstance(b.ffn, ReLURouterMoE)]

    def forward(self, batch: RequestBatch) -> dict[str, Tensor]:
        """``logits`` [B, M, T] and ``watch`` [B, M]."""
        x = self.tokenizer(self.features(batch).flat)  # [B, M, T, D]
        for block in self.blocks:
            x = block(x, batch.cand_mask)
        return self.split_heads(self.heads(x.mean(-2)))
