"""The retrievers' contract (padding, exclusion, shapes), SASRec's causality and the registry."""

from __future__ import annotations

import doctest
import importlib

import pytest
import torch

from funnelrec.data.batch import RequestBatch
from funnelrec.errors import ConfigError, DataError
from funnelrec.retrieval import RETRIEVERS, SASRec, SASRecConfig, build_retriever
from funnelrec.utils.probes import AccumulatingIndexPutProbe

SMALL = dict(two_tower=dict(hidden=(32,), out_dim=16, num_sampled=64), sasrec=dict(dim=16, layers=1, max_len=30),
             popularity={}, mpformer=dict(dim=16, layers=1, max_len=30, num_sampled=64),
             t2diff=dict(out_dim=16, hidden=(32,), num_sampled=64, steps=5, max_len=30, denoiser_hidden=32))


def _model(name: str, data, **kw):
    torch.manual_seed(0)
    return build_retriever(name, data.spec, data.item_popularity(), item_features=data.item_features,
                           **{**SMALL[name], **kw}).eval()


@pytest.mark.parametrize("name", list(RETRIEVERS))
def test_score_all_padding_and_history_exclusion(name, small_data):
    model = _model(name, small_data)
    b = small_data.batch("test", torch.arange(16))
    scores = model.score_all(b)
    assert scores.shape == (16, small_data.num_items)
    assert (scores[:, 0] == float("-inf")).all() and torch.isfinite(scores[:, 1:]).all()
    exclude = small_data.exclude_mask(b)
    assert exclude.sum(1).gt(0).any()  # the batch has histories to exclude
    items, top = model.retrieve(b, k=50, exclude=exclude)
    assert items.shape == top.shape == (16, 50)
    assert not exclude.gather(1, items).any() and (items > 0).all()
    assert (top[:, :-1] >= top[:, 1:]).all()
    # without exclusion every real item can be returned, padding never
    items_all, _ = model.retrieve(b, k=small_data.num_items - 1)
    assert set(items_all[0].tolist()) == set(range(1, small_data.num_items))


@pytest.mark.parametrize("name", [n for n in RETRIEVERS if n != "popularity"])
def test_the_training_backward_sums_in_a_fixed_order(name, small_data):
    """No ``x[ids]`` gather in the training graph (see ``AccumulatingIndexPutProbe``): a multi-threaded CPU
    training must repeat bit for bit."""
    model = _model(name, small_data).train()
    loss = model.training_loss(small_data.batch("train", torch.arange(32)))
    with AccumulatingIndexPutProbe() as probe:
        loss.backward()
    assert probe.calls == []


def test_retrieve_errors(small_data):
    model = _model("popularity", small_data)
    b = small_data.batch("test", torch.arange(2))
    with pytest.raises(ConfigError, match="k must lie"):
        model.retrieve(b, k=small_data.num_items)
    with pytest.raises(DataError, match="exclude must be"):
        model.retrieve(b, k=5, exclude=torch.zeros(2, 3, dtype=torch.bool))


def test_popularity_ranks_by_training_positives(small_data):
    model = _model("popularity", small_data)
    items, _ = model.retrieve(small_data.batch("test", [0, 1]), k=5)
    pop = small_data.item_popularity()
    assert items[0].tolist() == items[1].tolist()
    assert pop[items[0]].tolist() == sorted(pop[1:].tolist(), reverse=True)[:5]
    assert not model.trainable and model.training_loss(small_data.batch("train", [0])).item() == 0.0


def test_two_tower_scores_every_item_in_one_pass(small_data):
    model = _model("two_tower", small_data)
    b = small_data.batch("valid", torch.arange(4))
    scores = model.score_all(b)
    u = model.user_vectors(b)
    for j in (1, 7, small_data.num_items - 1):
        v = model.item_vectors(small_data.item_sparse_table[j], small_data.item_dense_table[j])
        assert torch.allclose(scores[:, j], u @ v, atol=1e-5)
    assert torch.allclose(u.norm(dim=1), torch.ones(4), atol=1e-5)


@pytest.mark.parametrize("negatives", ["in_batch", "sampled", "mixed"])
def test_two_tower_losses_train(negatives, small_data):
    model = _model("two_tower", small_data, negatives=negatives).train()
    b = small_data.batch("train", torch.arange(64))
    loss = model.training_loss(b)
    loss.backward()
    assert torch.isfinite(loss) and model.item_emb.table.weight.grad.abs().sum() > 0
    if negatives == "in_batch":  # the logQ switch changes the loss
        model.config.logq = False
        assert not torch.isclose(model.training_loss(b), loss)


def test_sasrec_is_causal():
    torch.manual_seed(0)
    model = SASRec(SASRecConfig(num_items=50, max_len=8, dim=16, heads=2, layers=2, side_features=False)).eval()
    seq = torch.tensor([[3, 9, 4, 17, 22, 5, 31, 8]])
    states = model.sequence_states(seq)
    for j in (7, 4, 1):
        changed = seq.clone()
        changed[0, j] = 40
        other = model.sequence_states(changed)
        assert torch.allclose(other[:, :j], states[:, :j], atol=1e-6)  # earlier positions do not see it
        assert not torch.allclose(other[:, j], states[:, j])


def test_sasrec_padding_and_truncation(small_data):
    torch.manual_seed(0)
    model = SASRec(SASRecConfig(num_items=30, max_len=4, dim=8, heads=2, layers=1, side_features=False)).eval()
    b = RequestBatch.empty(3, history=6, candidates=1)
    b.hist_items[:] = torch.tensor([[0, 0, 0, 0, 5, 6], [0, 0, 0, 0, 5, 6], [1, 2, 3, 7, 5, 6]])
    b.hist_len[:] = torch.tensor([2, 2, 6])
    u = model.user_state(b)
    short = b.truncate_history(2)
    assert torch.allclose(model.user_state(short)[0], u[0], atol=1e-6)  # padding width does not matter
    # a history longer than max_len reads its 4 most recent items
    ref = RequestBatch.empty(1, history=4, candidates=1)
    ref.hist_items[:] = torch.tensor([[3, 7, 5, 6]])
    ref.hist_len[:] = 4
    assert torch.allclose(model.user_state(ref)[0], u[2], atol=1e-6)
    # the last state is the one at the last valid position of the right-aligned sequence
    states = model.sequence_states(torch.tensor([[5, 6, 0, 0]]), torch.tensor([2]))
    assert torch.allclose(states[0, 1], u[0], atol=1e-6)


@pytest.mark.parametrize("loss", ["full", "sampled"])
def test_sasrec_sequence_loss_trains(loss, small_data):
    model = _model("sasrec", small_data, loss=loss, num_sampled=64).train()
    b = small_data.sequence_batch(torch.arange(8))
    value = model.training_loss(b)
    value.backward()
    assert torch.isfinite(value)
    assert model.pos_emb.weight.grad.abs().sum() > 0 and model.side_emb.table.weight.grad.abs().sum() > 0
    # an example batch trains the last position on the candidate
    assert torch.isfinite(model.training_loss(small_data.batch("train", torch.arange(8))))


def test_sasrec_full_loss_equals_per_position_cross_entropy(small_data):
    model = _model("sasrec", small_data)  # eval mode: no dropout
    b = small_data.sequence_batch(torch.arange(3))
    table = model.item_vectors()
    total, count = 0.0, 0
    for r in range(3):
        n = int(b.hist_len[r])
        seq = b.hist_items[r, -n:].unsqueeze(0)
        states = model.sequence_states(seq)[0]
        logits = states @ table.t()
        logits[:, 0] = float("-inf")
        total += torch.nn.functional.cross_entropy(logits, b.extras["seq_targets"][r, -n:], reduction="sum").item()
        count += n
    assert model.training_loss(b).item() == pytest.approx(total / count, rel=1e-4)


def test_registry_errors(small_data):
    spec, pop = small_data.spec, small_data.item_popularity()
    with pytest.raises(ConfigError, match="unknown retriever 'nope'; choose one of popularity, two_tower, sasrec"):
        build_retriever("nope", spec)
    with pytest.raises(ConfigError, match=r"two_tower: unknown config key\(s\) dimm; valid keys: embed_dim"):
        build_retriever("two_tower", spec, pop, item_features=small_data.item_features, dimm=3)
    with pytest.raises(ConfigError, match="num_items"):  # taken from the spec, not overridable
        build_retriever("sasrec", spec, pop, item_features=small_data.item_features, num_items=3)
    with pytest.raises(ConfigError, match="needs item_features"):
        build_retriever("two_tower", spec, pop)
    with pytest.raises(ConfigError, match="item_popularity"):
        build_retriever("popularity", spec)
    with pytest.raises(ConfigError, match="negatives must be one of in_batch, sampled, mixed"):
        build_retriever("two-tower", spec, pop, item_features=small_data.item_features, negatives="hard")
    with pytest.raises(ConfigError, match="divisible"):
        build_retriever("sasrec", spec, pop, item_features=small_data.item_features, dim=10, heads=3)
    assert isinstance(build_retriever("sasrec", spec, side_features=False), SASRec)


@pytest.mark.parametrize("module", ["funnelrec.retrieval.base", "funnelrec.retrieval.popularity",
                                    "funnelrec.retrieval.two_tower", "funnelrec.retrieval.sasrec",
                                    "funnelrec.data.movielens_adapter"])
def test_docstring_examples_run(module):
    result = doctest.testmod(importlib.import_module(module), optionflags=doctest.ELLIPSIS)
    assert result.attempted > 0 and result.failed == 0
