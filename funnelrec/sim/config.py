"""Configuration of the simulated world: every effect has a size and an on/off switch.

The world is described by one ``WorldConfig`` made of small per-effect dataclasses. ``profile(name)`` returns the
three built-in profiles:

* ``small``   — a few hundred users, 3 days, for tests (seconds);
* ``bench-v1`` — the frozen benchmark world: all 27,285 KuaiRand-Pure users, the 7,583 real videos, 10 days.
  Published numbers use it; changing any value here is its own piece of work that re-runs every benchmark;
* ``long``    — a few thousand heavy users with hundreds of impressions a day for 30 days and a corpus of 1M items
  sampled from the item model fitted to the real videos (lifelong-history models).

Every effect switch is tested: turning an effect off must remove the advantage of the model that exploits it.

Example:
    >>> cfg = profile("small")
    >>> cfg.interests.long_term_enabled
    True
    >>> cfg = apply_overrides(cfg, ["interests.long_term_enabled=false", "days=2"])
    >>> cfg.interests.long_term_enabled, cfg.days
    (False, 2)
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from funnelrec.errors import ConfigError


@dataclass
class CatalogConfig:
    """Items: real KuaiRand videos, optionally extended with items sampled from the fitted item model.

    Args:
        latent_dim: D of the item/user latent vectors.
        tag_weight: weight of the item's tag-centroid mix in its latent vector.
        creator_weight: weight of the creator's style vector (an item looks like its creator's other items).
        noise_weight: weight of item-specific noise.
        quality_scale: std of the long-tailed (Gumbel) quality scalar.
        num_items: total corpus size; items beyond the 7,583 real ones are sampled from the item model (new items
            with realistic tags, durations and creators — not copies). ``None`` keeps the real corpus.
    """

    latent_dim: int = 16
    tag_weight: float = 1.0
    creator_weight: float = 0.35
    noise_weight: float = 0.35
    quality_scale: float = 0.5
    num_items: int | None = None


@dataclass
class InterestConfig:
    """User tastes.

    Args:
        long_term_enabled: switch of the long-term interests (a Dirichlet mix over tag clusters).
        num_long_term: how many long-term interest clusters a user has.
        dirichlet_alpha: concentration of the long-term mix (small = peaked).
        long_term_weight: weight of ⟨u_long, v⟩ in relevance.
        hidden_enabled: switch of the "hidden" interest: a cluster rarely shown by the logging policy but strong on
            like/follow, so only long histories reveal it.
        hidden_like_boost: logit boost of like/follow/comment/forward for items of the hidden cluster.
        short_term_enabled: switch of the short-term intent that drifts within a session.
        short_term_weight: weight of ⟨u_short, v⟩ in relevance.
        short_term_rho: AR(1) persistence of the short-term intent per page.
        drift_per_day: std of the daily random walk of the long-term vector (interest drift over time).
        creator_affinity_std: std of the per-(user, creator) affinity.
    """

    long_term_enabled: bool = True
    num_long_term: int = 3
    dirichlet_alpha: float = 0.5
    long_term_weight: float = 1.6
    hidden_enabled: bool = True
    hidden_like_boost: float = 1.6
    short_term_enabled: bool = True
    short_term_weight: float = 0.5
    short_term_rho: float = 0.85
    drift_per_day: float = 0.03
    creator_affinity_std: float = 0.3


@dataclass
class ResponseConfig:
    """Per-impression responses (click, watch, like, follow, comment, forward, hate).

    Rates are set so the logged label rates sit near public KuaiRand-Pure figures (see ``docs/simulator.md``).

    Args:
        click_bias: intercept of the click logit.
        relevance_scale: multiplier of relevance in the click logit (controls the oracle AUC).
        activity_effect: add the user-activity bias to the click logit.
        tab_effect: add per-tab biases (and the tab × cluster cross).
        duration_effect: add the activity × duration-bucket cross to the click logit.
        popularity_weight: weight of item quality in the click logit.
        watch_log_ratio_bias: μ0 of the log watch ratio given a click.
        watch_relevance_scale: how much relevance raises the log watch ratio.
        watch_duration_slope: how much longer videos are watched less in ratio (per log-duration unit).
        watch_sigma: σ of the log watch ratio.
        like_bias, follow_bias, comment_bias, forward_bias: intercepts of the conditional (given click) logits.
        task_projection_noise: how different each task's projection of (u, v) is (0 = all tasks read the same
            relevance; larger = a stronger multi-task seesaw).
        hate_bias: intercept of the is_hate logit (hate needs no click).
        tab_response: how differently users respond in each tab (0 = not at all, every frozen profile). At size s
            each tab t gets its own reading of the long-term interest (I + 0.6·s·R_t/√d)·u_long (rescaled to
            u_long's length), its own multiplier exp(0.5·s·z_t) on the relevance term of the click logit and its
            own offsets 0.5·s·z_{t,task} on the like/follow/comment/forward logits (R, z standard normal, from a
            random stream of their own). Unlike ``tab_effect`` (additive biases), this changes *how* a tab's users
            respond: the scenario setting of multi-scenario rankers (MTmixAtt).
    """

    click_bias: float = -2.7
    relevance_scale: float = 2.0
    activity_effect: bool = True
    tab_effect: bool = True
    duration_effect: bool = True
    popularity_weight: float = 0.35
    watch_log_ratio_bias: float = -1.5
    watch_relevance_scale: float = 0.45
    watch_duration_slope: float = 0.35
    watch_sigma: float = 0.8
    like_bias: float = -5.6
    follow_bias: float = -7.8
    comment_bias: float = -7.0
    forward_bias: float = -7.3
    task_projection_noise: float = 0.6
    hate_bias: float = -6.5
    tab_response: float = 0.0


@dataclass
class ListEffectConfig:
    """Effects of the shown list (each switchable), so the best list is not simply the sorted one.

    Args:
        cascade_enabled: cascade examination down the list: e_{k+1} = γ·e_k·(1 − λ·p_click_k).
        cascade_continue: γ, the chance to look at the next item.
        cascade_click_stop: λ, how much a click at k lowers examination of k+1.
        saturation_enabled: relevance penalty for every earlier item in the list with the same primary tag.
        saturation_tag: penalty per repeated primary tag.
        saturation_creator: penalty per repeated creator.
        similarity_enabled: penalty when an item is too similar to the one directly above it.
        similarity_threshold: cosine similarity above which the penalty starts.
        similarity_penalty: penalty per unit of cosine similarity above the threshold.
    """

    cascade_enabled: bool = True
    cascade_continue: float = 0.97
    cascade_click_stop: float = 0.15
    saturation_enabled: bool = True
    saturation_tag: float = 0.25
    saturation_creator: float = 0.5
    similarity_enabled: bool = True
    similarity_threshold: float = 0.8
    similarity_penalty: float = 1.5


@dataclass
class SessionConfig:
    """Sessions, satisfaction and leaving.

    Args:
        page_size: items per request (a page of the feed).
        satisfaction_decay: s ← decay·s + (1 − decay)·r after every impression (xMTF's simulator uses 0.95).
        reward_watch, reward_like, reward_follow, reward_comment, reward_forward: weights of the per-impression
            reward r; watch enters as min(watch ratio, 1) on a click.
        reward_hate: penalty of is_hate in r.
        reward_repeat: penalty in r for an item whose primary tag or creator appeared in the last
            ``repeat_window`` impressions of the session (repetition tires users beyond what watch time shows).
        repeat_window: see ``reward_repeat``.
        leave_bias, leave_slope: leave hazard after each page, sigmoid(leave_bias + leave_slope·(0.5 − s)).
        max_pages: documented hard cap on pages per session.
        initial_satisfaction: mean initial satisfaction.
    """

    page_size: int = 6
    satisfaction_decay: float = 0.95
    reward_watch: float = 2.0
    reward_like: float = 1.5
    reward_follow: float = 2.5
    reward_comment: float = 1.0
    reward_forward: float = 1.0
    reward_hate: float = 4.0
    reward_repeat: float = 0.08
    repeat_window: int = 6
    leave_bias: float = -2.6
    leave_slope: float = 6.0
    max_pages: int = 16
    initial_satisfaction: float = 0.5


@dataclass
class ActivityConfig:
    """How often users come back (driven by the real ``user_active_degree``).

    Args:
        sessions_per_day: mean sessions a day per activity degree (unknown degrees use ``default_sessions``).
        default_sessions: see above.
        scale: multiplies every rate (``long`` uses it for heavy users).
        guarantee_every_user: give every user at least one session in the simulated span.
    """

    sessions_per_day: dict[str, float] = field(default_factory=lambda: {
        "full_active": 0.35, "high_active": 0.22, "middle_active": 0.15, "low_active": 0.09,
        "single_low_active": 0.05, "2_14_day_new": 0.15, "30day_retention": 0.09, "day_new": 0.15, "UNKNOWN": 0.09,
    })
    default_sessions: float = 0.09
    scale: float = 1.0
    guarantee_every_user: bool = True


@dataclass
class LoggingPolicyConfig:
    """The production-like policy that produced the logs: noisy, popularity- and position-biased.

    Args:
        num_popular: candidates drawn by popularity per request.
        num_interest: candidates drawn from the user's (noisily known) interest clusters per request.
        popularity_weight: weight of log popularity in the policy score.
        relevance_weight: weight of the policy's noisy relevance estimate.
        relevance_noise: std of the noise on that estimate.
        temperature: Gumbel noise scale of the policy score.
        random_share: share of slots replaced by a uniformly random item (``is_rand`` = 1).
    """

    num_popular: int = 16
    num_interest: int = 16
    popularity_weight: float = 0.6
    relevance_weight: float = 0.6
    relevance_noise: float = 0.8
    temperature: float = 0.5
    random_share: float = 0.05


@dataclass
class ExtensionConfig:
    """Side systems of the world, each off unless its issue needs it (the questionnaire is on: EASQ reads it).

    Args:
        questionnaire_enabled: sparse satisfaction answers on ``questionnaire_rate`` of clicked views.
        questionnaire_rate: share of clicked views that get a questionnaire (EASQ: about 0.5%).
        network_enabled: device/network state and playback stalls (GRF).
        server_load_enabled: a diurnal server-load curve with peak periods (CARL).
        uploads_enabled: new items uploaded every day from the item model (DualRec).
        uploads_per_day: how many.

    Push notifications (PushGen) need no switch: ``Extensions.push_open_probability`` answers for any push.
    """

    questionnaire_enabled: bool = True
    questionnaire_rate: float = 0.005
    network_enabled: bool = False
    server_load_enabled: bool = False
    uploads_enabled: bool = False
    uploads_per_day: int = 200


@dataclass
class WorldConfig:
    """The whole world.

    Args:
        name: profile name (recorded in every output).
        seed: the world seed: everything is a deterministic function of (config, seed, code version).
        num_users: how many of the real users to simulate (the first ``num_users`` by a seeded permutation;
            ``None`` = all 27,285).
        heavy_users_only: pick the most active users first (``long``).
        days: simulated days, starting 2022-04-08.
        tabs: the tab mix, {tab: share}.
    """

    name: str = "custom"
    seed: int = 0
    num_users: int | None = None
    heavy_users_only: bool = False
    days: int = 14
    tabs: dict[int, float] = field(default_factory=lambda: {0: 0.05, 1: 0.45, 2: 0.2, 3: 0.05, 4: 0.15, 5: 0.04,
                                                            6: 0.03, 7: 0.03})
    catalog: CatalogConfig = field(default_factory=CatalogConfig)
    interests: InterestConfig = field(default_factory=InterestConfig)
    responses: ResponseConfig = field(default_factory=ResponseConfig)
    lists: ListEffectConfig = field(default_factory=ListEffectConfig)
    sessions: SessionConfig = field(default_factory=SessionConfig)
    activity: ActivityConfig = field(default_factory=ActivityConfig)
    logging: LoggingPolicyConfig = field(default_factory=LoggingPolicyConfig)
    extensions: ExtensionConfig = field(default_factory=ExtensionConfig)

    def validate(self) -> "WorldConfig":
        """Raise ``ConfigError`` on impossible values (negative sizes, shares outside [0, 1])."""
        checks = [
            ("days", self.days, self.days >= 1),
            ("num_users", self.num_users, self.num_users is None or self.num_users >= 1),
            ("catalog.latent_dim", self.catalog.latent_dim, self.catalog.latent_dim >= 1),
            ("catalog.num_items", self.catalog.num_items, self.catalog.num_items is None or self.catalog.num_items >= 1),
            ("sessions.page_size", self.sessions.page_size, 1 <= self.sessions.page_size <= 64),
            ("sessions.max_pages", self.sessions.max_pages, self.sessions.max_pages >= 1),
            ("interests.num_long_term", self.interests.num_long_term, self.interests.num_long_term >= 1),
            ("logging.random_share", self.logging.random_share, 0.0 <= self.logging.random_share <= 1.0),
            ("logging.num_popular", self.logging.num_popular, self.logging.num_popular >= 0),
            ("logging.num_interest", self.logging.num_interest, self.logging.num_interest >= 0),
            ("extensions.questionnaire_rate", self.extensions.questionnaire_rate,
             0.0 <= self.extensions.questionnaire_rate <= 1.0),
            ("activity.scale", self.activity.scale, self.activity.scale > 0),
            ("responses.tab_response", self.responses.tab_response, self.responses.tab_response >= 0),
        ]
        for name, value, ok in checks:
            if not ok:
                raise ConfigError(f"world config: {name}={value!r} is out of range")
        if self.logging.num_popular + self.logging.num_interest < self.sessions.page_size:
            raise ConfigError("world config: logging.num_popular + logging.num_interest must be >= sessions.page_size")
        if any(t < 0 or t >= 15 for t in self.tabs) or any(s < 0 for s in self.tabs.values()) or not self.tabs:
            raise ConfigError(f"world config: tabs={self.tabs!r} must map tabs in [0, 15) to non-negative shares")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "WorldConfig":
        sub = {f.name: f.type for f in dataclasses.fields(cls)}
        kwargs: dict[str, Any] = {}
        nested = {"catalog": CatalogConfig, "interests": InterestConfig, "responses": ResponseConfig,
                  "lists": ListEffectConfig, "sessions": SessionConfig, "activity": ActivityConfig,
                  "logging": LoggingPolicyConfig, "extensions": ExtensionConfig}
        for key, value in d.items():
            if key not in sub:
                raise ConfigError(f"world config: unknown key {key!r}")
            if key in nested:
                known = {f.name for f in dataclasses.fields(nested[key])}
                bad = set(value) - known
                if bad:
                    raise ConfigError(f"world config: unknown key {key}.{sorted(bad)[0]!r}")
                kwargs[key] = nested[key](**value)
            elif key == "tabs":
                kwargs[key] = {int(k): float(v) for k, v in value.items()}
            else:
                kwargs[key] = value
        return cls(**kwargs).validate()


def load_world_config(path: str) -> WorldConfig:
    """A ``WorldConfig`` from a YAML file (as in ``configs/sim/``); ``ConfigError`` naming the file on bad input."""
    import yaml
    from pathlib import Path

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: no such world config file")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"{p}: not valid YAML ({str(err).splitlines()[0]})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: expected a mapping of world config keys")
    try:
        return WorldConfig.from_dict(data)
    except (ConfigError, TypeError) as err:
        raise ConfigError(f"{p}: {err}") from None


PROFILES = ("small", "bench-v1", "long")


def profile(name: str) -> WorldConfig:
    """The built-in profile ``name`` (``small``, ``bench-v1`` or ``long``; a ``sim:`` prefix is accepted)."""
    name = name.removeprefix("sim:")
    if name == "small":
        cfg = WorldConfig(name="small", seed=7, num_users=400, days=4)
        cfg.activity.scale = 3.0
    elif name == "bench-v1":
        # FROZEN: published benchmark numbers use exactly this world. Do not edit; add bench-v2 instead.
        cfg = WorldConfig(name="bench-v1", seed=20220408, num_users=None, days=10)
    elif name == "long":
        cfg = WorldConfig(name="long", seed=1009, num_users=3000, heavy_users_only=True, days=30)
        cfg.activity.scale = 6.0
        cfg.sessions.max_pages = 40
        cfg.catalog.num_items = 1_000_000
    else:
        raise ConfigError(f"unknown world profile {name!r}; choose one of {', '.join(PROFILES)}")
    return cfg.validate()


def _parse_value(text: str, current: Any) -> Any:
    if isinstance(current, dict) or dataclasses.is_dataclass(current):
        raise ConfigError("this key holds a mapping; override its entries one by one (key.sub=value) or use a "
                          "config file")
    low = text.strip().lower()
    if isinstance(current, bool):
        if low in ("true", "1", "yes", "on"):
            return True
        if low in ("false", "0", "no", "off"):
            return False
        raise ConfigError(f"expected a boolean, got {text!r}")
    if low in ("none", "null"):
        return None
    if isinstance(current, int) or current is None:
        try:
            return int(text)
        except ValueError:
            if current is not None:
                raise ConfigError(f"expected an integer, got {text!r}") from None
    if isinstance(current, float) or current is None:
        try:
            return float(text)
        except ValueError:
            raise ConfigError(f"expected a number, got {text!r}") from None
    return text


def apply_overrides(cfg: WorldConfig, overrides: list[str]) -> WorldConfig:
    """Return a copy of ``cfg`` with ``key=value`` overrides applied (dotted keys reach nested configs)."""
    cfg = WorldConfig.from_dict(cfg.to_dict())
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key, text = item.split("=", 1)
        target: Any = cfg
        parts = key.strip().split(".")
        for part in parts[:-1]:
            if not dataclasses.is_dataclass(target) or not hasattr(target, part):
                raise ConfigError(f"override {item!r}: unknown key {key!r}")
            target = getattr(target, part)
        last = parts[-1]
        if not dataclasses.is_dataclass(target) or last not in {f.name for f in dataclasses.fields(target)}:
            raise ConfigError(f"override {item!r}: unknown key {key!r}")
        try:
            setattr(target, last, _parse_value(text, getattr(target, last)))
        except ConfigError as e:
            raise ConfigError(f"override {item!r}: {e}") from None
    return cfg.validate()
