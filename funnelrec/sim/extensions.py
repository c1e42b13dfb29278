"""Extension points of the world for the side systems: questionnaires, network/stalls, server load, uploads, push.

Each extension has a switch in ``ExtensionConfig`` and draws from its own seeded RNG stream, so switching one on or
off never changes the main log. What is modelled here (all of it ours, sized in ``docs/simulator.md``):

* **questionnaire** (EASQ): on ``questionnaire_rate`` of clicked views, an answer ``satisfied`` /
  ``dissatisfied`` / ``uncertain`` drawn from the impression's reward r: P(satisfied) ∝ σ(4(r − 0.35)),
  P(dissatisfied) ∝ σ(4(0.05 − r)), P(uncertain) ∝ 0.3;
* **network** (GRF): per request a bandwidth (log-normal per user) and per impression a stall flag with
  P(stall) = σ(−3 + 1.2·log(bitrate / bandwidth)), bitrate from the display size;
* **server load** (CARL): a diurnal load curve with lunch and evening peaks, ``server_load(time_ms)`` in [0, 1];
* **uploads** (DualRec): ``uploads_per_day`` new items a day sampled from the ``ItemModel``, unavailable before
  their upload day;
* **push** (PushGen): ``push_open_probability(user, item, style)`` with a per-user copy-style sensitivity.

Example:
    >>> import math
    >>> round(server_load(0) , 3) >= 0
    True
"""

from __future__ import annotations

import datetime

import numpy as np
import polars as pl
import torch
from torch import Tensor

from funnelrec.data.schema import DAY_MS
from funnelrec.sim.catalog import Catalog, ItemModel
from funnelrec.sim.config import WorldConfig

ANSWERS = ("satisfied", "dissatisfied", "uncertain")
#: Copy styles a push text can have (PushGen's category prompts).
PUSH_STYLES = ("informative", "emotional", "curiosity", "humorous", "urgent")


def server_load(time_ms: int | np.ndarray | Tensor):
    """Diurnal server load in [0, 1] (Beijing time): base 0.35, peaks around 12:30 and 21:00."""
    hours = ((time_ms + 8 * 3_600_000) % DAY_MS) / 3_600_000
    lib = torch if isinstance(hours, Tensor) else np
    lunch = lib.exp(-0.5 * ((hours - 12.5) / 1.2) ** 2)
    evening = lib.exp(-0.5 * ((hours - 21.0) / 1.8) ** 2)
    return 0.35 + 0.3 * lunch + 0.35 * evening


class Extensions:
    """The side systems of a world (see the module docstring)."""

    def __init__(self, config: WorldConfig, catalog: Catalog, seed: int):
        self.cfg = config
        self.seed = seed
        g = torch.Generator().manual_seed(seed + 9_001)
        self.push_sensitivity = torch.randn(30_000, len(PUSH_STYLES), generator=g) * 0.8

    def extend_catalog(self, catalog: Catalog, days: int) -> Catalog:
        """Add the items uploaded during the simulated days (uploads extension), keeping existing items."""
        ec = self.cfg.extensions
        if not ec.uploads_enabled or ec.uploads_per_day <= 0:
            return catalog
        model = ItemModel.fit(catalog.videos)
        n = ec.uploads_per_day * days
        start = datetime.date(2022, 4, 8)
        dates = [(start + datetime.timedelta(days=int(d))).isoformat()
                 for d in np.repeat(np.arange(days), ec.uploads_per_day)]
        new = model.sample(n, seed=self.seed + 4242, first_video_id=catalog.num_items, upload_dates=dates)
        videos = pl.concat([catalog.videos, new], how="vertical_relaxed")
        cc = self.cfg.catalog
        return Catalog.from_videos(videos, seed=self.cfg.seed, latent_dim=cc.latent_dim, tag_weight=cc.tag_weight,
                                   creator_weight=cc.creator_weight, noise_weight=cc.noise_weight,
                                   quality_scale=cc.quality_scale, start_date=start)

    def questionnaire(self, log: pl.DataFrame, oracle: pl.DataFrame) -> pl.DataFrame:
        """Sparse questionnaire answers on clicked views (empty when the extension is off)."""
        ec = self.cfg.extensions
        schema = {"user_id": pl.Int64, "video_id": pl.Int64, "time_ms": pl.Int64, "answer": pl.String}
        if not ec.questionnaire_enabled or log.height == 0:
            return pl.DataFrame(schema=schema)
        rng = np.random.default_rng(self.seed + 31_337)
        clicked = log["is_click"].to_numpy() == 1
        asked = clicked & (rng.random(log.height) < ec.questionnaire_rate)
        r = oracle["reward"].to_numpy()[asked]
        sat = 1 / (1 + np.exp(-4 * (r - 0.35)))
        dis = 1 / (1 + np.exp(-4 * (0.05 - r)))
        unc = np.full_like(sat, 0.3)
        p = np.stack([sat, dis, unc], 1)
        p /= p.sum(1, keepdims=True)
        pick = (rng.random(len(r))[:, None] > np.cumsum(p, 1)).sum(1)
        rows = log.filter(pl.Series(asked)).select("user_id", "video_id", "time_ms")
        return rows.with_columns(pl.Series("answer", np.asarray(ANSWERS)[pick.clip(max=2)])).cast(schema)

    def side_tables(self, log: pl.DataFrame) -> dict[str, pl.DataFrame]:
        """Per-request network/stall and server-load tables, when those extensions are on."""
        out: dict[str, pl.DataFrame] = {}
        ec = self.cfg.extensions
        if not (ec.server_load_enabled or ec.network_enabled):
            return out
        requests = log.select("user_id", "time_ms").unique(maintain_order=True)
        if ec.server_load_enabled:
            out["server_load"] = requests.with_columns(
                pl.Series("load", server_load(requests["time_ms"].to_numpy())))
        if ec.network_enabled:
            rng = np.random.default_rng(self.seed + 77_777)
            users = requests["user_id"].to_numpy()
            user_bw = np.exp(np.random.default_rng(self.seed + 7).normal(1.5, 0.8, size=int(users.max()) + 1))
            bandwidth = user_bw[users] * np.exp(rng.normal(0, 0.5, size=len(users)))
            net = requests.with_columns(pl.Series("bandwidth_mbps", bandwidth))
            out["network"] = net
            imp = log.select("user_id", "video_id", "time_ms").join(net, on=["user_id", "time_ms"], how="left")
            bitrate = 2.0  # Mbps of a typical 720p short video
            p = 1 / (1 + np.exp(-(-3 + 1.2 * np.log(bitrate / imp["bandwidth_mbps"].to_numpy()))))
            out["stalls"] = imp.with_columns(pl.Series("stall", (rng.random(len(p)) < p).astype(np.int8)),
                                             pl.Series("p_stall", p))
        return out

    def push_open_probability(self, user: Tensor, item_relevance: Tensor, style: Tensor) -> Tensor:
        """[B] P(open) of a push: σ(−3 + 1.5·relevance + sensitivity[user, style]).

        Args:
            user: [B] user indices; item_relevance: [B] the world's relevance of the pushed item;
            style: [B] index into ``PUSH_STYLES``.
        """
        sens = self.push_sensitivity[user % self.push_sensitivity.shape[0], style]
        return torch.sigmoid(-3 + 1.5 * item_relevance + sens)


def stall_probability(bandwidth_mbps: Tensor, bitrate_mbps: float = 2.0) -> Tensor:
    """P(stall) of one playback given bandwidth (the network extension's rule)."""
    return torch.sigmoid(-3 + 1.2 * torch.log(bitrate_mbps / bandwidth_mbps))


__all__ = ["Extensions", "server_load", "stall_probability", "ANSWERS", "PUSH_STYLES"]
