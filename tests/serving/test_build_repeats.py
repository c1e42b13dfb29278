"""``train_cascade`` repeats bit for bit across CPU thread counts. Multi-threaded reductions whose order depends on
the run (the backward of ``table[ids]``, see ``funnelrec.utils.probes.AccumulatingIndexPutProbe``) made the
weights of one- and two-thread trainings differ on this world before they were removed; the tiny test world of
``cascade_fixtures`` is too small for CPU kernels to split their work over threads, so it would not show it."""

from __future__ import annotations

import torch

from funnelrec.data.sources import load_source
from funnelrec.serving.build import BuildConfig, train_cascade

QUICK = dict(ranker_epochs=1, retriever_epochs=1, preranker_epochs=1, distill_requests=300, cem_iterations=1,
             closed_loop_iterations=0, fusion_tuning="env")


def _train(source, threads: int):
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return train_cascade(source, BuildConfig(**QUICK))
    finally:
        torch.set_num_threads(before)


def test_the_cascade_trains_to_the_same_weights_on_one_and_two_threads(tmp_path):
    source = load_source("sim:small", cache_dir=tmp_path / "cache", progress=False)
    one, two = _train(source, 1), _train(source, 2)
    for stage in ("retriever", "ranker", "preranker"):
        a, b = getattr(one, stage).state_dict(), getattr(two, stage).state_dict()
        assert a.keys() == b.keys()
        differ = [k for k in a if not torch.equal(a[k], b[k])]
        assert not differ, f"{stage}: {differ[:5]}"
    assert torch.equal(one.item_vectors, two.item_vectors)
    assert torch.equal(one.fusion.log_weights, two.fusion.log_weights)
