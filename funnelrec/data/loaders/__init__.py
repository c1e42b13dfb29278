"""Dataset loaders: KuaiRand (Pure/1K/27K and funnelrec Parquet folders), MovieLens (100K/1M/20M) and RecBole files.

``load_dataset("SCHEME:PATH")`` dispatches on the scheme; each loader raises :class:`~funnelrec.errors.DataError`
naming the file and the column or line on bad input.

Example:
    >>> data = load_dataset("movielens:tests/fixtures/ml-100k")  # doctest: +SKIP
    >>> data.variant  # doctest: +SKIP
    '100k'
"""

from __future__ import annotations

from funnelrec.data.loaders.kuairand import (
    KuaiRandData,
    load_kuairand,
    validate_log,
    write_kuairand_csv,
    write_kuairand_parquet,
)
from funnelrec.data.loaders.movielens import MovieLensData, load_movielens
from funnelrec.data.loaders.recbole import RecBoleData, load_recbole, to_interactions
from funnelrec.errors import ConfigError

__all__ = [
    "KuaiRandData", "MovieLensData", "RecBoleData", "SCHEMES", "load_dataset", "load_kuairand", "load_movielens",
    "load_recbole", "to_interactions", "validate_log", "write_kuairand_csv", "write_kuairand_parquet",
]

#: ``load_dataset`` schemes and their loaders.
SCHEMES = {"kuairand": load_kuairand, "movielens": load_movielens, "recbole": load_recbole}


def load_dataset(spec: str) -> KuaiRandData | MovieLensData | RecBoleData:
    """Load a dataset from a ``"SCHEME:PATH"`` spec: ``kuairand:PATH``, ``movielens:PATH`` or ``recbole:PATH``.

    Args:
        spec: the scheme, a colon, and the path handed to the scheme's loader (the path may itself hold colons).

    Raises:
        ConfigError: no scheme, an unknown scheme or an empty path (the message lists the valid schemes).
        DataError: from the loader.
    """
    scheme, sep, path = str(spec).partition(":")
    valid = ", ".join(f"{s}:PATH" for s in SCHEMES)
    if not sep or scheme.strip().lower() not in SCHEMES:
        raise ConfigError(f"unknown dataset spec {spec!r}: expected one of {valid}")
    if not path.strip():
        raise ConfigError(f"dataset spec {spec!r} has no path: expected one of {valid}")
    return SCHEMES[scheme.strip().lower()](path.strip())
