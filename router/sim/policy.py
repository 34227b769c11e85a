"""Which scheduling policy a simulation runs: the daemon's own, from the same files.

The simulator calls ``Scheduler.schedule(features, snapshot, now)`` exactly as the
dispatcher does, so any policy the daemon can load, the simulator can replay.
"""

from __future__ import annotations

from pathlib import Path

from router.errors import ConfigError
from router.scheduling.registry import load_policy
from router.sim.simulator import SchedulerLike


def resolve_policy(policy: str | Path | None = None) -> SchedulerLike:
    """A fresh scheduler for ``policy``: a policy YAML file, or None for the packaged default.

    Fresh on every call, so a planner's runs never share a picker's rotation or any
    other state a policy keeps between decisions.
    """
    if policy is None:
        return load_policy(None)
    path = Path(policy)
    if not path.is_file():
        raise ConfigError(f"policy file {path} not found")
    return load_policy(path)
