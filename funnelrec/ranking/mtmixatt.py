"""MTmixAtt: AutoToken, learnable multi-head token mixing and two MoE layers, a multi-task multi-scenario ranker
(Qi et al., *Integrating Mixture-of-Experts with Multi-Mix Attention for Large-Scale Recommendation*, arXiv
2510.15286). The scenario is the request's KuaiRand ``tab``; the main scenario is tab 1 (the most frequent).

``RankingInputs`` (the shared encoder) → the flat features [B, M, F_in] → ``AutoToken`` (per-field encoders, a
learned top-k grouping into T tokens of width D) → L blocks of

    S = Norm(Mix(X) + X)                                # per-head learnable T × T token mixing
    Y = SceneSparseMoE(SharedDenseMoE(S), scenario)     # dense sigmoid MoE, then scenario-aware sparse MoE
    X' = Norm(Y + S) + X                                # PostNormR: post-norm plus the layer input

→ the mean over tokens → task heads (T tasks + the watch head): the plain ``TaskHeads`` for the main scenario,
the same heads plus a rank-r MLoRA adapter per other scenario (``MLoRATaskHeads``).

What is the paper's and what is ours:

* **Paper** ([SRC] in ``shared/papers/mtmixatt.md``): AutoToken (per-field encoders, selection matrix W, top-k +
  softmax, learned end to end) and its random / manual ablations; per-head learnable token mixing with orthogonal
  initialisation and the zero-init / fixed-transpose ablations; the shared dense MoE (fine-grained + shared
  experts, sigmoid gates, dense activation) and its ReLU-sparse ablation; the scenario sparse MoE (shared +
  scenario experts, γ bonus, two routers, "2 shared + 1 assigned + 1 auto-selected"); the block order
  TokenMix → Add & Norm → Shared Dense MoE → Scene Sparse MoE → Add & Norm; PostNormR and the Pre / Post ablations;
  the mean ("Reduce") before the heads; the main-scenario DNN head and MLoRA heads for the other scenarios.
* **Ours**: see the docstrings of ``funnelrec.nn.autotoken``, ``funnelrec.nn.mix_attention``,
  ``funnelrec.nn.scenario_moe`` and ``funnelrec.nn.mlora`` for the layers; here: scenario = ``tab`` clamped to
  [0, C − 1] (``num_scenarios`` C = 8 covers the simulator's tabs 0–7; KuaiRand's rarer tabs ≥ 7 share the last
  scenario); the two MoE layers run back to back inside one residual (as the block order reads); ``norm="pre"``
  is x + Mix(LN(x)), then + MoE(LN(·)), with a final LayerNorm before the pooling; the sizes (T = 6 tokens as
  RankMixer's six semantic groups, so the three groupings compare at equal T; D = 48, L = 2, dense-MoE hidden
  ``ffn_mult``·D = 48 in 3·2 + 2 sub-experts, scenario experts of width D / 2: RankMixer's default forward +
  backward FLOPs per sample within 5% on the KuaiRand spec, about twice its dense parameters as the scenario
  experts are sparse; not the paper's 15M / 1B configurations); padded candidates skip the scenario experts;
  the loss is the contract's multi-task loss (not the paper's per-scenario average of CTR and CTCVR BCE); with ``moe="relu_sparse"`` the dense MoE is RankMixer's
  ``ReLURouterMoE`` (E experts of width ``ffn_mult``·D / E) and its L1 penalty is added by ``training_loss``.
  The switches ``scene_moe`` (``"residual"`` / ``"none"``), ``scenario_heads=False`` and ``moe="per_token_ffn"``
  are ours too: they are not the paper's ablations. They strip the model down towards RankMixer, to find where
  its gap to RankMixer comes from (``docs/ranking.md``).

Input fields and the manual groups are RankMixer's (``RankMixerConfig.input_fields`` /
``default_token_groups``): ``user_sparse_0`` …, ``item_sparse_0`` …, ``tab``, ``hour``, ``position``,
``history_mean``, ``history_positive``, ``user_dense_0`` …, ``item_dense_0`` …, ``duration``.

Example:
    >>> import torch
    >>> from funnelrec.data.batch import RequestBatch
    >>> model = MTmixAtt(MTmixAttConfig(user_vocab=[10, 3], item_vocab=[20], user_dense=1, item_dense=0))
    >>> batch = RequestBatch.empty(batch_size=2, history=5, candidates=3, user_fields=2, user_dense=1)
    >>> batch.tab = torch.tensor([1, 4])                     # request 0: the main scenario; request 1: tab 4
    >>> out = model(batch)
    >>> out["logits"].shape, out["watch"].shape
    (torch.Size([2, 3, 6]), torch.Size([2, 3]))
    >>> model.config.tokens, model.tokenizer.group_size      # 10 input fields in 6 tokens of up to 2 fields
    (6, 2)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from funnelrec.data.batch import RequestBatch
from funnelrec.data.schema import NUM_TABS
from funnelrec.errors import ConfigError
from funnelrec.nn.autotoken import FIELD_INITS, GROUPINGS, AutoToken
from funnelrec.nn.mix_attention import MIXING_INITS, LearnableTokenMixing
from funnelrec.nn.mlora import ScenarioLoRA
from funnelrec.nn.routers import ReLURouterMoE
from funnelrec.nn.scenario_moe import ScenarioSparseMoE, SharedDenseMoE
from funnelrec.nn.token_mixing import PerTokenFFN, TokenMixing
from funnelrec.nn.tokenizers import check_groups
from funnelrec.ranking.base import MultiTaskRanker, RankerConfig, TaskHeads
from funnelrec.ranking.rankmixer import RankMixerConfig, RouterPenaltyMixin
from funnelrec.ranking.watch_time import WatchTimeDebiaser

MIXINGS = ("learnable", "fixed")
MOES = ("sigmoid_dense", "relu_sparse", "per_token_ffn")
NORMS = ("postnormr", "post", "pre")
SCENE_MOES = ("stacked", "residual", "none")


@dataclass
class MTmixAttConfig(RankerConfig):
    """Sizes and switches of ``MTmixAtt`` (the common fields are documented on ``RankerConfig``).

    Args:
        grouping: ``"auto"`` (AutoToken's learned selection matrix), ``"random"`` (fixed seeded random groups) or
            ``"manual"`` (``token_groups``, RankMixer's six semantic groups by default).
        token_groups: token name → input field names (``"manual"`` only); None for RankMixer's default groups.
        num_tokens: T; None means the number of manual groups (6 by default) for every grouping. With
            ``"manual"`` it must equal the number of groups.
        group_size: k, fields per token (``"auto"``); None means ceil(n_f / T).
        field_dim: e, the width of every encoded field.
        field_hidden: None (a linear encoder per field) or the hidden width of a per-field MLP.
        field_init: ``"default"`` or ``"identity"`` (the field encoders start by passing each field through;
            ``funnelrec.nn.autotoken.FieldEncoders``; ours, a diagnostic: with ``field_dim`` = ``embed_dim`` the
            model starts from RankMixer's token maps).
        group_temperature: τ of the softmax over a token's k selection weights (``"auto"``).
        group_seed: seed of the random groups and of the initial selection matrix.
        dim: D, the token width.
        num_layers: L blocks.
        mixing: ``"learnable"`` (per-head T × T matrices) or ``"fixed"`` (RankMixer's parameter-free mixing, H = T).
        mix_heads: H of the learnable mixing; None means T.
        mixing_init: ``"orthogonal"``, ``"zero"`` or ``"shift"`` (learnable mixing).
        moe: ``"sigmoid_dense"`` (the shared dense MoE), ``"relu_sparse"`` (RankMixer's ReLU-routed MoE) or
            ``"per_token_ffn"`` (RankMixer's plain per-token FFN of hidden width ``ffn_mult``·D; a diagnostic).
        ffn_mult: the dense MoE's total hidden width is ``ffn_mult``·D.
        num_experts: E coarse experts of the dense MoE (also the ReLU MoE's experts).
        expert_split: m, fine-grained sub-experts per coarse expert (``"sigmoid_dense"``).
        shared_experts: always-on sub-experts of the dense MoE (``"sigmoid_dense"``; 0 for none).
        num_scenarios: C scenarios = scenario experts = head variants; scenario = ``tab`` clamped to [0, C − 1].
        main_tab: the main scenario (plain heads, no adapter); it needs its own scenario (< C − 1 unless
            C = NUM_TABS).
        scene_shared: shared experts of the scenario MoE (Router-1).
        scene_auto: scenario experts auto-selected besides the assigned one.
        scene_bonus: γ, the router-logit bonus of the request's own scenario expert.
        scene_hidden: width of each scenario-MoE expert; None means D // 2.
        norm: ``"postnormr"`` (post-norm + the layer input), ``"post"`` or ``"pre"``.
        scene_moe: how the scenario MoE meets the dense MoE's output h: ``"stacked"`` (``Y = Scene(h)``, the block
            order read literally: h reaches the residual only through the scenario experts), ``"residual"``
            (``Y = h + Scene(h)``) or ``"none"`` (no scenario MoE: ``Y = h``; raise ``ffn_mult`` to keep the FLOPs).
        scenario_heads: MLoRA adapters on the non-main scenarios' heads (False: the plain ``TaskHeads`` for every
            scenario).
        lora_rank: r of the MLoRA head adapters.
        target_activation, l1_coef, l1_adapt_rate: the ReLU MoE's L1 controller (``"relu_sparse"``; see
            ``RankMixerConfig``).
    """

    grouping: str = "auto"
    token_groups: dict[str, list[str]] | None = None
    num_tokens: int | None = None
    group_size: int | None = None
    field_dim: int = 8
    field_hidden: int | None = None
    field_init: str = "default"
    group_temperature: float = 1.0
    group_seed: int = 0
    dim: int = 48
    num_layers: int = 2
    mixing: str = "learnable"
    mix_heads: int | None = None
    mixing_init: str = "orthogonal"
    moe: str = "sigmoid_dense"
    ffn_mult: int = 1
    num_experts: int = 3
    expert_split: int = 2
    shared_experts: int = 2
    num_scenarios: int = 8
    main_tab: int = 1
    scene_shared: int = 2
    scene_auto: int = 1
    scene_bonus: float = 2.0
    scene_hidden: int | None = None
    norm: str = "postnormr"
    scene_moe: str = "stacked"
    scenario_heads: bool = True
    lora_rank: int = 4
    target_activation: float | None = 0.25
    l1_coef: float = 1e-5
    l1_adapt_rate: float = 0.1

    #: the input fields and the manual (semantic) groups are RankMixer's
    input_fields = RankMixerConfig.input_fields
    default_token_groups = RankMixerConfig.default_token_groups

    def __post_init__(self) -> None:
        super().__post_init__()
        name = "MTmixAttConfig"
        for key, allowed in (("grouping", GROUPINGS), ("mixing", MIXINGS), ("mixing_init", MIXING_INITS),
                             ("moe", MOES), ("norm", NORMS), ("scene_moe", SCENE_MOES),
                             ("field_init", FIELD_INITS)):
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{name}.{key} must be one of {allowed}, got {getattr(self, key)!r}")

        def is_int(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        for key in ("dim", "num_layers", "field_dim", "ffn_mult", "num_experts", "expert_split", "num_scenarios",
                    "lora_rank"):
            if not is_int(getattr(self, key)) or getattr(self, key) < 1:
                raise ConfigError(f"{name}.{key} must be an int >= 1, got {getattr(self, key)!r}")
        for key in ("shared_experts", "scene_shared", "scene_auto", "main_tab"):
            if not is_int(getattr(self, key)) or getattr(self, key) < 0:
                raise ConfigError(f"{name}.{key} must be an int >= 0, got {getattr(self, key)!r}")
        for key in ("num_tokens", "group_size", "field_hidden", "mix_heads", "scene_hidden"):
            v = getattr(self, key)
            if v is not None and (not is_int(v) or v < 1):
                raise ConfigError(f"{name}.{key} must be None or an int >= 1, got {v!r}")
        if self.field_init == "identity" and self.field_hidden is not None:
            raise ConfigError(f"{name}.field_init='identity' needs linear field encoders (field_hidden=None), got "
                              f"field_hidden={self.field_hidden}")
        if not isinstance(self.scenario_heads, bool):
            raise ConfigError(f"{name}.scenario_heads must be a bool, got {self.scenario_heads!r}")
        if not is_int(self.group_seed):
            raise ConfigError(f"{name}.group_seed must be an int, got {self.group_seed!r}")
        if not self.group_temperature > 0:
            raise ConfigError(f"{name}.group_temperature must be > 0, got {self.group_temperature!r}")
        if not self.scene_bonus >= 0:
            raise ConfigError(f"{name}.scene_bonus must be >= 0, got {self.scene_bonus!r}")
        if not 2 <= self.num_scenarios <= NUM_TABS:
            raise ConfigError(f"{name}.num_scenarios must be in [2, {NUM_TABS}] (NUM_TABS), got "
                              f"{self.num_scenarios}")
        own = self.num_scenarios if self.num_scenarios == NUM_TABS else self.num_scenarios - 1
        if self.main_tab >= own:
            raise ConfigError(f"{name}.main_tab ({self.main_tab}) needs a scenario of its own: it must be < {own} "
                              f"with num_scenarios={self.num_scenarios} (tabs >= {self.num_scenarios - 1} share the "
                              f"last scenario)")
        if self.scene_auto >= self.num_scenarios:
            raise ConfigError(f"{name}.scene_auto ({self.scene_auto}) must be < num_scenarios "
                              f"({self.num_scenarios})")
        if self.target_activation is not None and not 0 < self.target_activation <= 1:
            raise ConfigError(f"{name}.target_activation must be None or in (0, 1], got {self.target_activation!r}")
        if not self.l1_coef >= 0:
            raise ConfigError(f"{name}.l1_coef must be >= 0, got {self.l1_coef!r}")
        if not self.l1_adapt_rate >= 0:
            raise ConfigError(f"{name}.l1_adapt_rate must be >= 0, got {self.l1_adapt_rate!r}")
        # tokens and grouping
        fields = self.input_fields()
        if self.token_groups is not None and self.grouping != "manual":
            raise ConfigError(f"{name}.token_groups is only read with grouping='manual', got "
                              f"grouping={self.grouping!r}")
        groups = self.groups()
        t = self.tokens
        if self.grouping == "manual":
            empty = [g for g, members in groups.items() if not members]
            if self.token_groups is None and empty:
                raise ConfigError(f"{name}.token_groups: the default group {empty[0]!r} has no input field for this "
                                  f"feature spec; pass token_groups explicitly or use grouping='auto'")
            check_groups(fields, groups, f"{name}.token_groups")
            if t != len(groups):
                raise ConfigError(f"{name}.num_tokens ({t}) must equal the number of token_groups ({len(groups)}) "
                                  f"with grouping='manual'")
        if t > len(fields):
            raise ConfigError(f"{name}.num_tokens ({t}) exceeds the {len(fields)} input fields")
        if self.group_size is not None and self.group_size > len(fields):
            raise ConfigError(f"{name}.group_size ({self.group_size}) exceeds the {len(fields)} input fields")
        # mixing heads
        if self.mixing == "fixed":
            if self.mix_heads is not None and self.mix_heads != t:
                raise ConfigError(f"{name}.mix_heads must be None (H = T) with mixing='fixed', got {self.mix_heads}")
            if self.dim % t:
                raise ConfigError(f"{name}.dim ({self.dim}) must be divisible by the token count T={t} with "
                                  f"mixing='fixed' (H = T heads)")
        elif self.dim % self.heads:
            key = "mix_heads" if self.mix_heads is not None else "dim"
            raise ConfigError(f"{name}.{key}: dim ({self.dim}) must be divisible by the mixing head count "
                              f"H={self.heads}")
        # the MoE widths
        hidden = self.ffn_mult * self.dim
        if self.moe == "sigmoid_dense" and hidden < self.num_experts * self.expert_split + self.shared_experts:
            raise ConfigError(f"{name}.ffn_mult: the dense MoE's hidden width ffn_mult * dim = {hidden} is below its "
                              f"num_experts * expert_split + shared_experts sub-experts")
        if self.moe == "relu_sparse" and hidden < self.num_experts:
            raise ConfigError(f"{name}.num_experts ({self.num_experts}) exceeds ffn_mult * dim = {hidden}")
        if self.scene_hidden is None and self.dim < 2:
            raise ConfigError(f"{name}.scene_hidden: dim // 2 is 0; set scene_hidden")

    # ------------------------------------------------------------------ derived
    def groups(self) -> dict[str, list[str]]:
        """``token_groups``, or RankMixer's default groups."""
        return dict(self.token_groups) if self.token_groups is not None else self.default_token_groups()

    @property
    def tokens(self) -> int:
        """T."""
        return self.num_tokens if self.num_tokens is not None else len(self.groups())

    @property
    def heads(self) -> int:
        """H of the token mixing."""
        return self.mix_heads if self.mix_heads is not None and self.mixing == "learnable" else self.tokens

    @property
    def scene_width(self) -> int:
        """Width of each scenario-MoE expert."""
        return self.scene_hidden if self.scene_hidden is not None else self.dim // 2


class MLoRATaskHeads(TaskHeads):
    """``TaskHeads`` plus a rank-r adapter per non-main scenario on the hidden layer and a rank-1 adapter on the
    output layer (width 1, so a higher rank adds nothing); see ``funnelrec.nn.mlora``.

    Args:
        in_dim: width of the tower input.
        hidden: hidden width of every tower.
        num_heads: towers (T tasks + 1 watch head).
        num_scenarios: C.
        rank: r.
        main: the main scenario (plain heads).

    ``forward(x, scenario=None, grouped=False)``: x [B, ..., in] (or [B, ..., K, in] with ``grouped``), scenario
    [B] → [B, ..., K]. Without ``scenario`` (or on the main scenario's requests) it is exactly ``TaskHeads``.

    Example:
        >>> import torch
        >>> heads = MLoRATaskHeads(in_dim=8, hidden=4, num_heads=7, num_scenarios=3, rank=2, main=1)
        >>> x = torch.randn(2, 3, 8)
        >>> heads(x, torch.tensor([1, 2])).shape
        torch.Size([2, 3, 7])
        >>> torch.equal(heads(x, torch.tensor([1, 1])), TaskHeads.forward(heads, x))
        True
    """

    def __init__(self, in_dim: int, hidden: int, num_heads: int, num_scenarios: int, rank: int, main: int):
        super().__init__(in_dim, hidden, num_heads)
        self.hidden_lora = ScenarioLoRA(num_heads, in_dim, hidden, num_scenarios, rank, main)
        self.out_lora = ScenarioLoRA(num_heads, hidden, 1, num_scenarios, 1, main)

    def forward(self, x: Tensor, scenario: Tensor | None = None, grouped: bool = False) -> Tensor:
        """x [B, ..., in] (or [B, ..., K, in]), scenario [B] → [B, ..., K]."""
        if scenario is None:
            return super().forward(x, grouped=grouped)
        h = self.act(self.hidden(x, grouped=grouped) + self.hidden_lora(x, scenario, grouped=grouped))
        return (self.out(h, grouped=True) + self.out_lora(h, scenario, grouped=True)).squeeze(-1)


class MTmixAttBlock(nn.Module):
    """TokenMix → Add & Norm → Shared Dense MoE → Scene Sparse MoE → Add & Norm, with PostNormR (or post / pre norm).

    Args:
        dim: D.
        mixer: the token mixing (``LearnableTokenMixing`` or ``TokenMixing``).
        dense: the dense MoE (``SharedDenseMoE`` or ``ReLURouterMoE``), or a ``PerTokenFFN``.
        scene: the ``ScenarioSparseMoE``, or None (no scenario MoE).
        scene_moe: ``"stacked"`` (``Y = scene(dense(S))``) or ``"residual"`` (``Y = h + scene(h)``, h = dense(S));
            ignored without ``scene``.
        norm: ``"postnormr"``: ``S = LN(mix(X) + X)``, ``X' = LN(drop(Y) + S) + X``; ``"post"``: the same without
            ``+ X``; ``"pre"``: ``S = X + mix(LN(X))``, ``X' = S + drop(Y(LN(S)))``.
        dropout: dropout on the MoE output.

    ``forward(x, scenario, mask=None)``: x [..., T, D], scenario (a prefix of the leading dims, e.g. [B]) →
    [..., T, D]; ``mask`` (the leading dims, e.g. ``cand_mask``) reaches a ReLU MoE's penalty, and its False rows
    skip the scenario experts.
    """

    def __init__(self, dim: int, mixer: nn.Module, dense: nn.Module, scene: ScenarioSparseMoE | None,
                 norm: str = "postnormr", dropout: float = 0.0, scene_moe: str = "stacked"):
        super().__init__()
        if norm not in NORMS:
            raise ConfigError(f"MTmixAttBlock.norm must be one of {NORMS}, got {norm!r}")
        if scene_moe not in SCENE_MOES:
            raise ConfigError(f"MTmixAttBlock.scene_moe must be one of {SCENE_MOES}, got {scene_moe!r}")
        self.mixer, self.dense, self.scene, self.norm = mixer, dense, scene, norm
        self.residual_scene = scene_moe == "residual"
        self.mix_norm = nn.LayerNorm(dim)
        self.ffn_norm = nn.LayerNorm(dim)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def ffn(self, s: Tensor, scenario: Tensor, mask: Tensor | None = None) -> Tensor:
        """The dense MoE (or FFN), then the scenario MoE on its output (see ``scene_moe``)."""
        h = self.dense(s, mask) if isinstance(self.dense, ReLURouterMoE) else self.dense(s)
        if self.scene is None:
            return self.drop(h)
        y = self.scene(h, scenario, mask)
        return self.drop(h + y if self.residual_scene else y)

    def forward(self, x: Tensor, scenario: Tensor, mask: Tensor | None = None) -> Tensor:
        """x [..., T, D] → [..., T, D]."""
        if self.norm == "pre":
            s = x + self.mixer(self.mix_norm(x))
            return s + self.ffn(self.ffn_norm(s), scenario, mask)
        s = self.mix_norm(self.mixer(x) + x)
        out = self.ffn_norm(self.ffn(s, scenario, mask) + s)
        return out + x if self.norm == "postnormr" else out


class MTmixAtt(RouterPenaltyMixin, MultiTaskRanker):
    """MTmixAtt multi-task, multi-scenario ranker (see the module docstring).

    Args:
        config: an ``MTmixAttConfig``.
        watch: a fitted ``WatchTimeDebiaser`` for a D2Q watch head, or None.

    With ``moe="relu_sparse"``, ``training_loss`` adds the blocks' L1 gate penalties (``router_penalty``) and every
    training forward steps their λ controllers, as in ``RankMixer``.
    """

    def __init__(self, config: MTmixAttConfig, watch: WatchTimeDebiaser | None = None):
        super().__init__(config, watch)
        c = config
        t, d = c.tokens, c.dim
        self.tokenizer = AutoToken(c.input_fields(), t, d, field_dim=c.field_dim, group_size=c.group_size,
                                   grouping=c.grouping, groups=c.groups() if c.grouping == "manual" else None,
                                   seed=c.group_seed, temperature=c.group_temperature, field_hidden=c.field_hidden,
                                   field_init=c.field_init)
        blocks = []
        for _ in range(c.num_layers):
            mixer = (LearnableTokenMixing(t, d, c.heads, c.mixing_init) if c.mixing == "learnable"
                     else TokenMixing())
            if c.moe == "sigmoid_dense":
                dense: nn.Module = SharedDenseMoE(t, d, c.ffn_mult * d, c.num_experts, c.expert_split,
                                                  c.shared_experts)
            elif c.moe == "per_token_ffn":
                dense = PerTokenFFN(t, d, c.ffn_mult * d)
            else:
                dense = ReLURouterMoE(t, d, c.num_experts, c.ffn_mult * d // c.num_experts, l1_coef=c.l1_coef,
                                      target_activation=c.target_activation, adapt_rate=c.l1_adapt_rate)
            scene = (ScenarioSparseMoE(t, d, c.num_scenarios, c.scene_width, c.scene_shared, c.scene_auto,
                                       c.scene_bonus) if c.scene_moe != "none" else None)
            blocks.append(MTmixAttBlock(d, mixer, dense, scene, c.norm, c.dropout, c.scene_moe))
        self.blocks = nn.ModuleList(blocks)
        self.final_norm = nn.LayerNorm(d) if c.norm == "pre" else nn.Identity()
        self.heads = (MLoRATaskHeads(d, c.head, self.num_heads, c.num_scenarios, c.lora_rank, c.main_tab)
                      if c.scenario_heads else TaskHeads(d, c.head, self.num_heads))

    def scenario(self, batch: RequestBatch) -> Tensor:
        """[B] scenario id of every request: ``tab`` clamped to [0, num_scenarios − 1]."""
        return batch.tab.clamp(0, self.config.num_scenarios - 1)

    def moe_layers(self) -> list[ReLURouterMoE]:
        """The ReLU sparse-MoE layers (empty with ``moe="sigmoid_dense"``)."""
        return [b.dense for b in self.blocks if isinstance(b.dense, ReLURouterMoE)]

    def forward(self, batch: RequestBatch) -> dict[str, Tensor]:
        """``logits`` [B, M, T] and ``watch`` [B, M]."""
        scenario = self.scenario(batch)
        x = self.tokenizer(self.features(batch).flat)  # [B, M, T, D]
        for block in self.blocks:
            x = block(x, scenario, batch.cand_mask)
        pooled = self.final_norm(x).mean(-2)
        return self.split_heads(self.heads(pooled, scenario) if self.config.scenario_heads else self.heads(pooled))

