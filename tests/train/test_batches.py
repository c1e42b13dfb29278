"""EpochBatches: order, sharding, skip, and the prefetch thread (same batches, early stop, errors)."""

import threading

import pytest
import torch

from funnelrec.errors import ConfigError
from funnelrec.train.batches import EpochBatches, request_batches


class Toy:
    def __init__(self, n: int = 23, fail_at: int | None = None):
        self.n, self.fail_at, self.calls = n, fail_at, 0

    def __len__(self) -> int:
        return self.n

    def batch(self, idx):
        self.calls += 1
        if self.fail_at is not None and self.calls > self.fail_at:
            raise ValueError("bad row in batch")
        return idx.tolist()


@pytest.mark.parametrize("prefetch", [1, 2, 5])
def test_prefetch_gives_the_same_batches(prefetch):
    plain = list(EpochBatches(Toy(), 4, epoch=3, seed=7))
    ahead = list(EpochBatches(Toy(), 4, epoch=3, seed=7, prefetch=prefetch))
    assert ahead == plain and len(plain) == 6
    assert list(EpochBatches(Toy(), 4, epoch=3, seed=7, prefetch=prefetch).skip(4)) == plain[4:]


def test_prefetch_thread_ends_when_the_consumer_stops_early():
    before = threading.active_count()
    it = iter(EpochBatches(Toy(1000), 2, prefetch=2))
    first = [next(it) for _ in range(3)]
    it.close()
    assert len(first) == 3
    assert threading.active_count() == before


def test_prefetch_raises_the_batch_error_in_the_consumer():
    with pytest.raises(ValueError, match="bad row"):
        list(EpochBatches(Toy(fail_at=2), 4, prefetch=2))


def test_request_batches_default_prefetch_and_bad_value():
    epoch = request_batches(Toy(), 5, rank=0, world=1)(0, 0)
    assert epoch.prefetch == 0
    assert request_batches(Toy(), 5, rank=0, world=1, prefetch=3)(0, 0).prefetch == 3
    assert sum(len(b) for b in epoch) == 23
    with pytest.raises(ConfigError, match="prefetch"):
        EpochBatches(Toy(), 4, prefetch=-1)
    assert isinstance(EpochBatches(Toy(), 4).order(), torch.Tensor)
