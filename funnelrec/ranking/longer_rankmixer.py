"""LONGER + RankMixer: the two-stage production baseline of the HyFormer paper (late fusion, one-way): LONGER
compresses the history into its output global tokens, which join RankMixer's feature tokens as extra tokens of a
RankMixer stack (Huang et al., arXiv 2601.12681, the "LONGER + RankMixer (prod baseline)" row; notes in
``../shared/papers/hyformer.md``).

Pipeline, per (request, candidate)::

    LONGER (funnelrec.ranking.longer, the same pieces): global tokens [candidate, CLS, user, cross_1 … cross_c],
        merged event tokens, one cross-causal layer + N self-causal layers          → candidate and CLS states
    NS tokens: RankMixer semantic groups of the RankingInputs features (T_ns = 6 by default)
    X = [NS tokens; RMSNorm(candidate state); RMSNorm(CLS state)]                    T = T_ns + 2 tokens
    mixer_layers RankMixer blocks (token mixing + per-token FFN, post-LN)            funnelrec.ranking.rankmixer
    → mean over tokens → T task heads + the watch head

Information flows one way: the sequence is read once, by LONGER, conditioned only on LONGER's own global tokens,
and RankMixer sees the result; RankMixer's feature interactions never reach back into the sequence (HyFormer's
motivation). LONGER's sequence side is candidate-independent, so serving is LONGER's: ``encode_user`` caches the
sequence-side K/V of every encoder layer per request (``LongerCache``) and ``score_with_cache`` runs the global
tokens and the mixer per candidate; ``forward`` uses the same per-request split (``train_path``, as ``Longer``).

What is the paper's and what is ours:

* **Paper**: the two-stage structure (LONGER output tokens fed to a RankMixer stack as extra tokens), RankMixer's
  token mixing (H = T) and per-token FFN.
* **Ours**: the LONGER tokens handed on are the candidate and CLS states (what ``Longer``'s own heads read), each
  RMS-normalised; the NS tokens are RankMixer's six default semantic groups projected to LONGER's width
  ``dim`` (so T = 8 divides D = 32); the sizes (LONGER's defaults, two mixer blocks with FFN width
  ``mixer_mult · dim``).

Example:
    >>> import torch
    >>> from funnelrec.data.batch import RequestBatch
    >>> config = LongerRankMixerConfig(user_vocab=[10, 3], item_vocab=[20], user_dense=0, item_dense=0)
    >>> model = LongerRankMixer(config).eval()
    >>> batch = RequestBatch.empty(batch_size=2, history=12, candidates=3, user_fields=2)
    >>> batch.hist_len[:] = 12
    >>> out = model(batch)
    >>> out["logits"].shape, out["watch"].shape, config.tokens
    (torch.Size([2, 3, 6]), torch.Size([2, 3]), 8)
    >>> cached = model.score_with_cache(model.encode_user(batch), batch)
    >>> bool((cached["logits"] - out["logits"]).abs().max() < 1e-5)
    True
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from funnelrec.data.batch import RequestBatch
from funnelrec.errors import ConfigError, DataError
from funnelrec.nn.seq_attention import CrossCausalEncoder, TokenMerge
from funnelrec.nn.token_mixing import PerTokenFFN
from funnelrec.nn.tokenizers import SemanticTokenizer
from funnelrec.ranking.base import MultiTaskRanker, TaskHeads
from funnelrec.ranking.hyformer import NSTokenGroups
from funnelrec.ranking.longer import GlobalTokens, Longer, LongerCache, LongerConfig, SequenceTokens, check_int
from funnelrec.ranking.rankmixer import RankMixerBlock
from funnelrec.ranking.watch_time import WatchTimeDebiaser

#: LONGER output tokens that join the mixer: the candidate and CLS states.
LONGER_TOKENS = 2


@dataclass
class LongerRankMixerConfig(NSTokenGroups, LongerConfig):
    """Sizes and switches of ``LongerRankMixer``: LONGER's (``LongerConfig``: ``num_layers`` self-causal layers,
    ``merge``, ``num_queries``, ``train_path`` …; ``dim`` is shared by both stages) and the mixer's below.

    Args:
        token_groups: NS token name → input field names (``RankMixerConfig``'s fields); None for the six defaults.
        mixer_layers: RankMixer blocks after LONGER.
        mixer_mult: the per-token FFN hidden width is ``mixer_mult · dim``.
    """

    token_groups: dict[str, list[str]] | None = None
    mixer_layers: int = 2
    mixer_mult: int = 3

    def __post_init__(self) -> None:
        name = "LongerRankMixerConfig"
        try:
            super().__post_init__()
        except ConfigError as e:  # LongerConfig names itself in its messages
            raise ConfigError(str(e).replace("LongerConfig.", f"{name}.")) from None
        check_int(f"{name}.mixer_layers", self.mixer_layers, 1)
        check_int(f"{name}.mixer_mult", self.mixer_mult, 1)
        self.check_token_groups()
        if self.dim % self.tokens:
            raise ConfigError(f"{name}.dim ({self.dim}) must be divisible by the mixer token count T={self.tokens} "
                              f"(token mixing uses H = T heads of width D / T)")

    @property
    def tokens(self) -> int:
        """T: the NS tokens + LONGER's candidate and CLS states."""
        return len(self.groups()) + LONGER_TOKENS


class LongerRankMixer(MultiTaskRanker):
    """LONGER + RankMixer with LONGER's KV-cache serving path (see the module docstring).

    Args:
        config: a ``LongerRankMixerConfig``.
        watch: a fitted ``WatchTimeDebiaser`` for a D2Q watch head, or None.
    """

    def __init__(self, config: LongerRankMixerConfig, watch: WatchTimeDebiaser | None = None):
        super().__init__(config, watch)
        c = config
        d = c.dim
        # LONGER's pieces, under Longer's attribute names (``sequence`` and ``encode_user`` are Longer's methods)
        self.seq_tokens = SequenceTokens(c.embed_dim, c.num_actions, d, c.history_pool, c.gap_buckets)
        self.merge = TokenMerge(d, c.merge_size, c.merge, heads=c.heads, ffn_mult=2)
        self.global_tokens = GlobalTokens(self.inputs, d, cls=True, cross_tokens=c.cross_tokens)
        self.encoder = CrossCausalEncoder(d, c.heads, c.num_layers, c.num_queries, c.query_sampling, c.ffn_mult,
                                          c.dropout)
        self.out_norm = nn.RMSNorm(d)
        # RankMixer's
        self.tokenizer = SemanticTokenizer(c.input_fields(), c.groups(), d)
        self.blocks = nn.ModuleList(RankMixerBlock(d, PerTokenFFN(c.tokens, d, c.mixer_mult * d), True, c.dropout)
                                    for _ in range(c.mixer_layers))
        self.heads = TaskHeads(d, c.head, self.num_heads)

    num_global = Longer.num_global
    sequence = Longer.sequence
    encode_user = Longer.encode_user

    def _output(self, glob: Tensor, batch: RequestBatch) -> dict[str, Tensor]:
        """LONGER's final global states [B, M, G, dim] + the NS tokens → the mixer → heads."""
        ns = self.tokenizer(self.features(batch).flat)  # [B, M, T_ns, dim]
        x = torch.cat([ns, self.out_norm(glob[:, :, :LONGER_TOKENS])], 2)  # [B, M, T, dim]
        for block in self.blocks:
            x = block(x)
        return self.split_heads(self.heads(x.mean(-2)))

    def forward(self, batch: RequestBatch) -> dict[str, Tensor]:
        """Training path: ``logits`` [B, M, T] and ``watch`` [B, M] (``config.train_path`` as in ``Longer``)."""
        glob = self.global_tokens(self.inputs, batch)  # [B, M, G, dim]
        seq, valid = self.sequence(batch)
        if self.config.train_path == "per_request":
            return self._output(self.encoder.forward_per_request(glob, seq, valid), batch)
        return self._output(self.encoder(glob, seq, valid), batch)

    @torch.no_grad()
    def score_with_cache(self, cache: LongerCache, batch: RequestBatch) -> dict[str, Tensor]:
        """Serving: ``logits`` [B, M, T] and ``watch`` [B, M] of every candidate of ``batch``, reading LONGER's
        sequence side from ``cache`` (built by ``encode_user`` for the same B requests, in the same order)."""
        if cache.batch_size != batch.batch_size:
            raise DataError(f"the cache holds {cache.batch_size} requests, the batch {batch.batch_size}",
                            column="cache")
        glob = self.global_tokens.assemble(cache.user, self.inputs, batch)
        return self._output(self.encoder.decode(glob, cache.kv), batch)

    def predict_cached(self, batch: RequestBatch) -> Tensor:
        """[B, M, T] task probabilities through the KV-cache path (``encode_user`` then ``score_with_cache``)."""
        return torch.sigmoid(self.score_with_cache(self.encode_user(batch), batch)["logits"])


__all__ = ["LONGER_TOKENS", "LongerRankMixerConfig", "LongerRankMixer"]
