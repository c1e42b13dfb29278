"""Helpers of the ranking tests: toy vocabularies, a hand-made batch with padding everywhere, small configs."""

from __future__ import annotations

import torch

from funnelrec.data.batch import RequestBatch
from funnelrec.ranking import RANKERS

USER_VOCAB, ITEM_VOCAB = [12, 4], [30, 6, 5]
B, N, M, T = 4, 8, 5, 6
#: the classic baselines (matched budgets, DESIGN §7) and every registered ranker.
BASELINE_NAMES = ("shared_bottom", "mmoe", "ple", "din", "dcnv2")
RANKER_NAMES = (*BASELINE_NAMES, "rankmixer", "longer", "transformer", "longer_rankmixer", "hyformer", "mtmixatt",
                "onerank", "solar")
#: small sizes for the unit tests (every model at the same tiny scale)
SMALL = {
    "shared_bottom": {"bottom": [32, 16]},
    "mmoe": {"num_experts": 3, "expert_dims": [16]},
    "ple": {"num_levels": 2, "task_experts": 1, "shared_experts": 2, "expert_dims": [16]},
    "din": {"tower": [32, 16], "attention_hidden": [8]},
    "dcnv2": {"cross_layers": 2, "low_rank": 8, "deep": [32, 16]},
    "rankmixer": {"dim": 12, "ffn_mult": 2},
    "longer": {"dim": 8, "heads": 2, "num_queries": 4, "merge_k": 2},
    "transformer": {"dim": 8, "heads": 2, "num_layers": 2},
    "longer_rankmixer": {"dim": 16, "heads": 2, "num_queries": 4, "merge_k": 2, "mixer_mult": 1},
    "hyformer": {"dim": 16, "heads": 2, "seq_len": 4, "num_queries": 2, "query_hidden": 8, "short_len": 3,
                 "mixer_mult": 1},
    "onerank": {"dim": 8, "heads": 2, "ffn_mult": 1},
    "mtmixatt": {"dim": 12, "field_dim": 4, "num_scenarios": 4, "scene_hidden": 4, "lora_rank": 2},
    "solar": {"dim": 8, "heads": 2, "rank": 4, "topk": 3, "short_pool": 4, "tower": [16]},
}


def make_config(name: str, **kw):
    """The config of ranker ``name`` over the toy vocabularies, at the SMALL sizes."""
    config_cls, _ = RANKERS[name]
    base = dict(user_vocab=USER_VOCAB, item_vocab=ITEM_VOCAB, user_dense=2, item_dense=3, head=8, history_pool=6)
    return config_cls(**{**base, **SMALL[name], **kw})


def make_model(name: str, seed: int = 0, watch=None, **kw):
    torch.manual_seed(seed)
    return RANKERS[name][1](make_config(name, **kw), watch=watch)


def make_batch(seed: int = 0) -> RequestBatch:
    """Real ids are >= 1 (0 = padding); hist_len and cand_mask vary per request (request 0 has no history)."""
    g = torch.Generator().manual_seed(seed)
    b = RequestBatch.empty(batch_size=B, history=N, candidates=M, tasks=T, user_fields=2, user_dense=2,
                           item_fields=3, item_dense=3)
    b.user_sparse = torch.stack([torch.randint(1, v, (B,), generator=g) for v in USER_VOCAB], 1)
    b.user_dense = torch.randn(B, 2, generator=g)
    b.hist_len = torch.tensor([0, 3, 6, 8])
    mask = b.history_mask()
    b.hist_items = torch.where(mask, torch.randint(1, ITEM_VOCAB[0], (B, N), generator=g), 0)
    b.hist_actions = (torch.rand(B, N, 7, generator=g) < 0.5).float() * mask.unsqueeze(-1)
    b.hist_gap_s = torch.rand(B, N, generator=g) * 1000 * mask
    b.cand_mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2, [True] * 4 + [False], [True] + [False] * 4])
    cand = torch.stack([torch.randint(1, v, (B, M), generator=g) for v in ITEM_VOCAB], -1)
    b.cand_sparse = cand * b.cand_mask.unsqueeze(-1)
    b.cand_items = b.cand_sparse[..., 0].clone()
    b.cand_dense = torch.randn(B, M, 3, generator=g) * b.cand_mask.unsqueeze(-1)
    b.tab = torch.tensor([1, 2, 0, 14])
    b.hour = torch.tensor([0, 12, 23, 7])
    b.position = torch.arange(M).expand(B, M).clone()
    b.duration_s = (torch.rand(B, M, generator=g) * 60 + 5) * b.cand_mask
    b.labels = (torch.rand(B, M, T, generator=g) < 0.3).float()
    b.watch_time_s = torch.rand(B, M, generator=g) * 30 * b.cand_mask
    return b.validate()


def loss_after_steps(model, ds, steps: int = 12, passes: int = 2, lr: float = 3e-3) -> tuple[float, float]:
    """Training loss on the first 4 of ``steps`` batches of ``ds`` before and after ``passes`` AdamW passes over
    them (a smoke test that a model learns)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr)
    batches = list(ds.iter_batches(64, shuffle=True, seed=0))[:steps]
    with torch.no_grad():
        before = sum(float(model.training_loss(b)) for b in batches[:4])
    for _ in range(passes):
        for b in batches:
            loss = model.training_loss(b)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    with torch.no_grad():
        after = sum(float(model.training_loss(b)) for b in batches[:4])
    return before, after
