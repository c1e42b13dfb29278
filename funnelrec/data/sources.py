"""Data sources: one ``"SCHEME:WHAT"`` string → a KuaiRand-schema log, its side tables and how to featurise them.

=========================================  =========================================================================
spec                                       source
=========================================  =========================================================================
``sim:small`` / ``sim:bench-v1`` /         a simulated world of that profile (``funnelrec.sim``); query overrides
``sim:long``                               ``sim:small?days=7&num_users=500`` are ``key=value`` world-config
                                           overrides (dotted keys reach nested configs: ``interests.hidden_enabled
                                           =false``)
``kuairand:PATH``                          a KuaiRand folder (Pure/1K/27K CSVs or a funnelrec Parquet folder)
``movielens:PATH``                         a MovieLens folder (100K/1M/20M), adapted by
                                           :mod:`funnelrec.data.movielens_adapter`
=========================================  =========================================================================

**Simulated worlds are cached on disk.** The first load simulates the world and writes it with ``SimLog.write``
(atomically: a temporary folder renamed at the end) to ``CACHE/sim/<profile>-<hash>/``, where ``<hash>`` is the
first 12 hex digits of the SHA-256 of the resolved world config and ``SIM_VERSION``; every load — the first one
too — reads the log back through the KuaiRand loader, exactly as a real KuaiRand folder would be read. The
``World`` object is rebuilt from the config (cheap: no simulation), so the oracle API (``world.oracle``) answers
for any user and item; ``Source.oracle`` holds the per-row ground truth of the log (row-aligned with
``Source.log``). ``CACHE`` is ``cache_dir`` when given, else ``$FUNNELREC_CACHE_DIR``, else
``~/.cache/funnelrec``.

Example:
    >>> src = load_source("sim:small?num_users=50&days=2", progress=False)  # doctest: +SKIP
    >>> src.log.columns[:3], src.tasks[0], src.world is not None  # doctest: +SKIP
    (['user_id', 'video_id', 'date'], 'is_click', True)
    >>> spec = src.spec_factory().fit(src.users, src.videos)  # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qsl

import polars as pl

from funnelrec.data.features import FeatureField, FeatureSpec
from funnelrec.data.io import read_parquet
from funnelrec.data.loaders.kuairand import load_kuairand
from funnelrec.data.loaders.movielens import load_movielens
from funnelrec.data.movielens_adapter import adapt_movielens, movielens_feature_spec
from funnelrec.data.schema import LABEL_COLUMNS
from funnelrec.errors import ConfigError, DataError

__all__ = ["Source", "load_source", "SOURCE_SCHEMES", "default_cache_dir", "sim_cache_folder"]

#: The schemes ``load_source`` accepts, with the shape of their argument.
SOURCE_SCHEMES = {"sim": "sim:PROFILE[?key=value&...]", "kuairand": "kuairand:PATH", "movielens": "movielens:PATH"}


@dataclass
class Source:
    """A loaded data source.

    Attributes:
        name: the spec string it was loaded from.
        kind: ``"sim"``, ``"kuairand"`` or ``"movielens"``.
        log: interaction log in the KuaiRand schema (``LOG_COLUMNS``), sorted stably by ``(user_id, time_ms)``.
        users: user table (``user_id`` unique; every user of the log present).
        videos: video table (``video_id`` unique; every video of the log present).
        spec_factory: returns a fresh, *unfitted* ``FeatureSpec`` suited to the source (KuaiRand's for KuaiRand and
            the simulator, :func:`~funnelrec.data.movielens_adapter.movielens_feature_spec` for MovieLens).
        tasks: the label columns that carry signal: the six KuaiRand tasks, or ``("is_click",)`` for MovieLens.
        positive: the retrieval positive: a label column (``"is_click"``), or None when every row is an
            interaction (MovieLens: every rating counts, as in RecBole).
        world: the simulated ``World`` (oracle API), or None for real data.
        oracle: per-row ground truth of the simulated log (``funnelrec.sim.world.ORACLE_COLUMNS`` + session
            columns), row-aligned with ``log``; None for real data. Never a model feature.
        path: the folder the data was read from (the cache folder of a simulated world).
    """

    name: str
    kind: str
    log: pl.DataFrame
    users: pl.DataFrame
    videos: pl.DataFrame
    spec_factory: Callable[[], FeatureSpec]
    tasks: tuple[str, ...]
    positive: str | None = "is_click"
    world: object | None = None
    oracle: pl.DataFrame | None = None
    path: Path | None = None

    def feature_spec(self) -> FeatureSpec:
        """A fresh unfitted feature spec (``spec_factory()``)."""
        return self.spec_factory()


def load_source(spec: str, cache_dir: str | os.PathLike | None = None, progress: bool = True) -> Source:
    """Load a data source from its spec string (see the module doc).

    Args:
        spec: ``"sim:PROFILE[?key=value&...]"``, ``"kuairand:PATH"`` or ``"movielens:PATH"``.
        cache_dir: root of the simulated-world cache (default ``$FUNNELREC_CACHE_DIR`` or ``~/.cache/funnelrec``).
        progress: show the simulator's progress bar when a world has to be simulated.

    Returns:
        :class:`Source`.

    Raises:
        ConfigError: an unknown scheme or world profile, a bad override, an empty path (one line, listing the
            valid forms).
        DataError: a missing folder or file, or bad data in it (from the loaders).
    """
    text = str(spec).strip()
    scheme, sep, rest = text.partition(":")
    scheme = scheme.strip().lower()
    forms = ", ".join(SOURCE_SCHEMES.values())
    if not sep or scheme not in SOURCE_SCHEMES:
        raise ConfigError(f"unknown data source {text!r}: expected one of {forms}")
    rest = rest.strip()
    if not rest:
        raise ConfigError(f"data source {text!r} is missing its {'profile' if scheme == 'sim' else 'path'}: "
                          f"expected {SOURCE_SCHEMES[scheme]}")
    if scheme == "sim":
        return _load_sim(text, rest, cache_dir, progress)
    if scheme == "kuairand":
        return _load_kuairand(text, rest)
    return _load_movielens(text, rest)


# --------------------------------------------------------------------------------------------------- simulator


def default_cache_dir() -> Path:
    """``$FUNNELREC_CACHE_DIR``, else ``~/.cache/funnelrec``."""
    env = os.environ.get("FUNNELREC_CACHE_DIR")
    return Path(env).expanduser() if env else Path("~/.cache/funnelrec").expanduser()


def sim_cache_folder(config, cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache folder of a world config: ``CACHE/sim/<profile>-<sha256(config + SIM_VERSION)[:12]>``."""
    from funnelrec.sim.world import SIM_VERSION

    payload = json.dumps({"config": config.to_dict(), "sim_version": SIM_VERSION}, sort_keys=True, default=str)
    digest = hashlib.sha256(payload.encode()).hexdigest()[:12]
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    return root / "sim" / f"{config.name}-{digest}"


def _parse_sim(text: str, rest: str) -> tuple[str, list[str]]:
    name, _, query = rest.partition("?")
    overrides = []
    if query:
        try:
            pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
        except ValueError:
            raise ConfigError(f"data source {text!r}: overrides must look like ?key=value&key=value") from None
        overrides = [f"{k}={v}" for k, v in pairs]
        if any(k.strip() == "name" for k, _ in pairs):
            raise ConfigError(f"data source {text!r}: the profile name cannot be overridden")
    return name.strip(), overrides


def _load_sim(text: str, rest: str, cache_dir, progress: bool) -> Source:
    from funnelrec.sim.config import apply_overrides, profile
    from funnelrec.sim.world import SIM_VERSION, World

    name, overrides = _parse_sim(text, rest)
    try:
        cfg = profile(name)
        if overrides:
            cfg = apply_overrides(cfg, overrides)
    except ConfigError as err:
        raise ConfigError(f"data source {text!r}: {err}") from None
    folder = sim_cache_folder(cfg, cache_dir)
    world = World(cfg)
    if not _cache_hit(folder, SIM_VERSION):
        world.simulate(progress=progress).write(folder)
    data = load_kuairand(folder, version="parquet")
    oracle = read_parquet(folder / "oracle" / "oracle.parquet")
    if oracle.height != data.log.height:
        raise DataError(f"oracle table has {oracle.height} rows, the log {data.log.height}: delete the cache "
                        "folder and load again", path=folder)
    return Source(name=text, kind="sim", log=data.log, users=data.users, videos=data.videos,
                  spec_factory=FeatureSpec.kuairand, tasks=LABEL_COLUMNS, positive="is_click", world=world,
                  oracle=oracle, path=folder)


def _cache_hit(folder: Path, sim_version: str) -> bool:
    meta = folder / "world.json"
    if not (meta.is_file() and (folder / "log.parquet").is_file() and (folder / "oracle" / "oracle.parquet").is_file()):
        return False
    try:
        return json.loads(meta.read_text()).get("sim_version") == sim_version
    except (OSError, ValueError):
        return False


# --------------------------------------------------------------------------------------------------- real data


def _load_kuairand(text: str, path: str) -> Source:
    data = load_kuairand(path)
    users, videos = data.users, data.videos
    # a folder without a side table gets an id-only table and id-only features on that side
    ids_only_users, ids_only_items = users is None, videos is None
    if ids_only_users:
        users = data.log.select("user_id").unique().sort("user_id")
    if ids_only_items:
        videos = data.log.select("video_id").unique().sort("video_id")

    def factory() -> FeatureSpec:  # fresh fields on every call: fitting mutates them
        spec = FeatureSpec.kuairand()
        if ids_only_users:
            spec.user_sparse, spec.user_dense = [FeatureField("user_id", encoding="id", embedding_dim=32)], []
        if ids_only_items:
            spec.item_sparse, spec.item_dense = [FeatureField("video_id", encoding="id", embedding_dim=32)], []
        return spec

    return Source(name=text, kind="kuairand", log=data.log, users=users, videos=videos, spec_factory=factory,
                  tasks=LABEL_COLUMNS, positive="is_click", path=data.path)


def _load_movielens(text: str, path: str) -> Source:
    ml = adapt_movielens(load_movielens(path))
    return Source(name=text, kind="movielens", log=ml.log, users=ml.users, videos=ml.videos,
                  spec_factory=movielens_feature_spec, tasks=("is_click",), positive=None, path=ml.path)
