"""Items of the world: the real KuaiRand-Pure videos, and an item model fitted to them for larger corpora.

The real table fixes each video's creator, tags, duration and upload date. The world adds what no log shows:

* a latent vector ``v = normalise(w_tag · mean(centroid[tags]) + w_creator · style[creator] + w_noise · ε)``
  (tag clusters give centroids, so items of a tag look alike, and a creator's items share a style);
* a long-tailed quality scalar (Gumbel), which drives popularity and click/watch rates.

``ItemModel`` is fitted to the real videos (tag-set frequencies, log-duration mean/std per primary tag, items per
creator, display sizes, upload types) and samples *new* items — new creators with Zipf-like output, durations from
the fitted per-tag log-normals — for the 100k/1M corpora of scale tests and for daily uploads.

Example:
    >>> import torch
    >>> cat = Catalog.build(seed=0, latent_dim=8)
    >>> cat.num_items, cat.latent.shape[1]
    (7583, 8)
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from importlib import resources

import numpy as np
import polars as pl
import torch
from torch import Tensor

from funnelrec.data.schema import VIDEO_FEATURE_COLUMNS
from funnelrec.errors import DataError

_ASSETS = "funnelrec.assets"


def real_table(name: str) -> pl.DataFrame:
    """Read one vendored KuaiRand-Pure table: ``users`` or ``videos``."""
    files = {"users": "user_features_pure.parquet", "videos": "video_features_basic_pure.parquet"}
    if name not in files:
        raise DataError(f"unknown vendored table {name!r}; choose users or videos")
    path = resources.files(_ASSETS).joinpath("kuairand_pure", files[name])
    with resources.as_file(path) as p:
        return pl.read_parquet(p)


@dataclass
class Catalog:
    """All items of a world, as aligned tensors over items ``I``.

    Args:
        videos: the video feature table (KuaiRand columns), one row per item, row i = item i = video_id i.
        author_index: [I] int64 dense creator index.
        tags: [I, 3] int64 tag-cluster indices, -1 padded; ``primary_tag`` = tags[:, 0].
        duration_ms: [I] float32 durations (nulls in the real table filled with the median of the primary tag).
        upload_day: [I] int64 day index of the upload relative to the world's day 0 (negative = before).
        quality: [I] float32 long-tailed quality.
        latent: [I, D] float32 unit latent vectors.
        centroids: [C, D] float32 tag-cluster centroids.
        creator_style: [A, D] float32 creator style vectors.
        tag_names: tag string of each cluster index.
    """

    videos: pl.DataFrame
    author_index: Tensor
    tags: Tensor
    duration_ms: Tensor
    upload_day: Tensor
    quality: Tensor
    latent: Tensor
    centroids: Tensor
    creator_style: Tensor
    tag_names: list[str]

    @property
    def num_items(self) -> int:
        return int(self.latent.shape[0])

    @property
    def num_clusters(self) -> int:
        return int(self.centroids.shape[0])

    @property
    def num_creators(self) -> int:
        return int(self.creator_style.shape[0])

    @property
    def primary_tag(self) -> Tensor:
        return self.tags[:, 0]

    def cluster_members(self) -> tuple[Tensor, Tensor]:
        """CSR of items by primary tag: (order [I] item indices sorted by cluster, offsets [C + 1])."""
        order = torch.argsort(self.primary_tag, stable=True)
        counts = torch.bincount(self.primary_tag, minlength=self.num_clusters)
        offsets = torch.zeros(self.num_clusters + 1, dtype=torch.int64)
        offsets[1:] = torch.cumsum(counts, 0)
        return order, offsets

    @classmethod
    def build(cls, seed: int, latent_dim: int = 16, tag_weight: float = 1.0, creator_weight: float = 0.35,
              noise_weight: float = 0.35, quality_scale: float = 0.5, num_items: int | None = None,
              start_date: datetime.date = datetime.date(2022, 4, 8)) -> "Catalog":
        """Build the catalog from the real videos (+ ``num_items - 7583`` items sampled from the item model)."""
        videos = real_table("videos")
        if num_items is not None and num_items > videos.height:
            model = ItemModel.fit(videos)
            extra = model.sample(num_items - videos.height, seed=seed + 1, first_video_id=videos.height,
                                 upload_dates=None)
            videos = pl.concat([videos, extra], how="vertical_relaxed")
        elif num_items is not None:
            videos = videos.head(num_items)
        return cls.from_videos(videos, seed=seed, latent_dim=latent_dim, tag_weight=tag_weight,
                               creator_weight=creator_weight, noise_weight=noise_weight,
                               quality_scale=quality_scale, start_date=start_date)

    @classmethod
    def from_videos(cls, videos: pl.DataFrame, seed: int, latent_dim: int, tag_weight: float,
                    creator_weight: float, noise_weight: float, quality_scale: float,
                    start_date: datetime.date) -> "Catalog":
        """Derive the latent side of every video in ``videos`` (rows must be video_id 0..I-1 in order)."""
        if videos.height == 0:
            raise DataError("the video table is empty", path="videos")
        ids = videos["video_id"].to_numpy()
        if not np.array_equal(ids, np.arange(len(ids))):
            raise DataError("video ids must be 0..I-1 in row order", path="videos", column="video_id")
        tag_lists = videos["tag"].fill_null("unknown").str.split(",").list.head(3)
        flat = tag_lists.explode()
        tag_names = sorted(set(flat.to_list()), key=lambda t: (not t.isdigit(), int(t) if t.isdigit() else 0, t))
        tag_index = {t: i for i, t in enumerate(tag_names)}
        flat_idx = flat.replace_strict(tag_index, return_dtype=pl.Int64).to_numpy()
        lengths = tag_lists.list.len().to_numpy().astype(np.int64)
        tags = np.full((videos.height, 3), -1, dtype=np.int64)
        rows = np.repeat(np.arange(videos.height), lengths)
        cols = np.arange(len(flat_idx)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        tags[rows, cols] = flat_idx
        tags_t = torch.from_numpy(tags)

        authors = videos["author_id"].to_numpy()
        _, author_index = np.unique(authors, return_inverse=True)
        author_index_t = torch.from_numpy(author_index.astype(np.int64))

        duration = videos["video_duration"].to_numpy().astype(np.float64)
        duration = _fill_by_group(duration, tags[:, 0])

        dates = videos["upload_dt"].fill_null(start_date.isoformat()).str.to_date("%Y-%m-%d")
        upload_day = (dates - start_date).dt.total_days().to_numpy().astype(np.int64)

        d = latent_dim
        # Row-stable draws: adding items or creators (uploads, larger corpora) never changes the existing ones.
        centroids = _unit(_rows_randn(len(tag_names), d, seed, stream=1))
        style = _unit(_rows_randn(int(author_index.max()) + 1, d, seed, stream=2))
        valid = (tags_t >= 0).float()
        mix = (centroids[tags_t.clamp(min=0)] * valid.unsqueeze(-1)).sum(1) / valid.sum(1, keepdim=True)
        noise = _rows_randn(videos.height, d, seed, stream=3)
        latent = _unit(tag_weight * mix + creator_weight * style[author_index_t] + noise_weight * _unit(noise))
        uniform = torch.special.ndtr(_rows_randn(videos.height, 1, seed, stream=4).squeeze(1))
        gumbel = -torch.log(-torch.log(uniform.clamp(1e-6, 1 - 1e-6)))
        quality = quality_scale * (gumbel - 0.5772) / 1.2825  # standardised Gumbel: mean 0, std quality_scale
        return cls(
            videos=videos, author_index=author_index_t, tags=tags_t,
            duration_ms=torch.from_numpy(duration.astype(np.float32)), upload_day=torch.from_numpy(upload_day),
            quality=quality.float(), latent=latent.float(), centroids=centroids.float(),
            creator_style=style.float(), tag_names=tag_names,
        )


_CHUNK = 1024


def _rows_randn(rows: int, cols: int, seed: int, stream: int) -> Tensor:
    """[rows, cols] standard normals whose first k rows do not depend on ``rows`` (drawn in seeded chunks)."""
    chunks = [torch.randn(_CHUNK, cols, generator=torch.Generator().manual_seed(
        ((seed * 1_000_003 + stream) * 1_000_003 + c) % 2**63)) for c in range((rows + _CHUNK - 1) // _CHUNK)]
    return torch.cat(chunks)[:rows] if chunks else torch.zeros(0, cols)


def _unit(x: Tensor) -> Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-6)


def _fill_by_group(values: np.ndarray, groups: np.ndarray) -> np.ndarray:
    """Replace NaN values with the median of their group (or the global median)."""
    out = values.copy()
    missing = np.isnan(out)
    if not missing.any():
        return out
    frame = pl.DataFrame({"g": groups, "v": values}).with_columns(pl.col("v").fill_nan(None))
    med = frame.group_by("g").agg(pl.col("v").median().alias("m"))
    lookup = dict(zip(med["g"].to_list(), med["m"].to_list()))
    global_median = float(np.nanmedian(values))
    fill = np.array([lookup.get(int(gv)) or global_median for gv in groups[missing]], dtype=np.float64)
    out[missing] = fill
    return out


@dataclass
class ItemModel:
    """A generative model of videos fitted to the real table, for sampling new items.

    Fitted parts: the empirical distribution of tag sets, log-duration mean and std per primary tag, the
    distribution of items per creator (new creators get Zipf-like output with the same mean), and the empirical
    distributions of upload type, display size and music type.

    Example:
        >>> model = ItemModel.fit(real_table("videos"))
        >>> new = model.sample(100, seed=0, first_video_id=7583)
        >>> new.height, new["video_id"].min()
        (100, 7583)
    """

    tag_sets: list[str]
    tag_set_probs: np.ndarray
    log_duration: dict[str, tuple[float, float]]
    items_per_creator: float
    upload_types: list[str]
    upload_type_probs: np.ndarray
    sizes: np.ndarray
    music_types: np.ndarray
    max_author_id: int

    @classmethod
    def fit(cls, videos: pl.DataFrame) -> "ItemModel":
        tags = videos["tag"].fill_null("unknown")
        sets = tags.value_counts(sort=True)
        primary = tags.str.split(",").list.first()
        frame = pl.DataFrame({"p": primary, "d": videos["video_duration"]}).drop_nulls()
        frame = frame.with_columns(pl.col("d").log().alias("ld"))
        stats = frame.group_by("p").agg(pl.col("ld").mean().alias("m"), pl.col("ld").std().alias("s"),
                                        pl.len().alias("n"))
        g_mean, g_std = float(frame["ld"].mean()), float(frame["ld"].std())
        log_duration = {p: (m, s if (s is not None and n > 5) else g_std)
                        for p, m, s, n in stats.iter_rows()}
        log_duration["__global__"] = (g_mean, g_std)
        ut = videos["upload_type"].fill_null("UNKNOWN").value_counts(sort=True)
        sizes = videos.select("server_width", "server_height").drop_nulls().to_numpy()
        music = videos["music_type"].drop_nulls().to_numpy()
        return cls(
            tag_sets=sets["tag"].to_list(), tag_set_probs=(sets["count"] / sets["count"].sum()).to_numpy(),
            log_duration=log_duration,
            items_per_creator=videos.height / videos["author_id"].n_unique(),
            upload_types=ut["upload_type"].to_list(), upload_type_probs=(ut["count"] / ut["count"].sum()).to_numpy(),
            sizes=sizes, music_types=music, max_author_id=int(videos["author_id"].max()),
        )

    def sample(self, n: int, seed: int, first_video_id: int, upload_dates: list[str] | None = None) -> pl.DataFrame:
        """Sample ``n`` new videos in the KuaiRand video-table schema, with ids from ``first_video_id``.

        Args:
            n: how many.
            seed: RNG seed.
            first_video_id: id of the first new video.
            upload_dates: per-item upload dates (YYYY-MM-DD); default: spread over the real upload dates.
        """
        if n < 0:
            raise DataError(f"cannot sample a negative number of items ({n})", column="num_items")
        rng = np.random.default_rng(seed)
        tag_pick = rng.choice(len(self.tag_sets), size=n, p=self.tag_set_probs)
        tags = np.asarray(self.tag_sets, dtype=object)[tag_pick]
        primary = np.array([t.split(",")[0] for t in self.tag_sets], dtype=object)[tag_pick]
        gm, gs = self.log_duration["__global__"]
        means = np.array([self.log_duration.get(p, (gm, gs))[0] for p in self.tag_sets])[tag_pick]
        stds = np.array([self.log_duration.get(p, (gm, gs))[1] for p in self.tag_sets])[tag_pick]
        duration = np.clip(np.exp(means + stds * rng.standard_normal(n)), 5000, 1_200_000).round()
        # New creators with Zipf-like output (mean items per creator as in the real table).
        creators = max(1, int(round(n / self.items_per_creator)))
        weights = 1.0 / np.arange(1, creators + 1) ** 1.1
        author = self.max_author_id + 1 + rng.choice(creators, size=n, p=weights / weights.sum())
        size = self.sizes[rng.integers(0, len(self.sizes), size=n)]
        if upload_dates is None:
            upload_dates = list(rng.choice(["2022-04-09", "2022-04-10", "2022-04-11"], size=n))
        out = pl.DataFrame({
            "video_id": np.arange(first_video_id, first_video_id + n, dtype=np.int64),
            "author_id": author.astype(np.int64),
            "video_type": ["NORMAL"] * n,
            "upload_dt": upload_dates,
            "upload_type": np.asarray(self.upload_types, dtype=object)[
                rng.choice(len(self.upload_types), size=n, p=self.upload_type_probs)].tolist(),
            "visible_status": np.zeros(n),
            "video_duration": duration,
            "server_width": size[:, 0].astype(np.float64),
            "server_height": size[:, 1].astype(np.float64),
            "music_id": rng.integers(0, 9_170_000_000, size=n, dtype=np.int64),
            "music_type": self.music_types[rng.integers(0, len(self.music_types), size=n)].astype(np.float64),
            "tag": tags.tolist(),
        })
        return out.cast(VIDEO_FEATURE_COLUMNS)
