"""The simulated world (DESIGN §3): KuaiRand-calibrated users and items, responses, sessions, oracle.

Example:
    >>> from funnelrec.sim import World
    >>> sim = World.from_profile("small").simulate(days=1, progress=False)
    >>> set(sim.log["is_click"].unique().to_list()) <= {0, 1}
    True
"""

from funnelrec.sim.config import WorldConfig, apply_overrides, profile, PROFILES
from funnelrec.sim.oracle import Oracle
from funnelrec.sim.world import SimLog, World, simulate

__all__ = ["World", "WorldConfig", "SimLog", "Oracle", "profile", "apply_overrides", "simulate", "PROFILES"]
