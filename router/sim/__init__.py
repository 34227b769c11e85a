"""Discrete-event simulation of the router over clusters no test machine holds.

The same scheduling policies and the same device timing model as the live mock
cluster, one event per device iteration: ``simulate`` answers how a cluster serves a
workload (TTFT, TPOT, goodput, cost per token), ``plan`` which cluster serves it
cheapest within an SLO.
"""

from router.sim.cluster import Cluster, DeviceGroup, DeviceSpec, load_cluster, parse_cluster
from router.sim.planner import PlanResult, PlanTrial, plan_cluster
from router.sim.policy import resolve_policy
from router.sim.results import Outcome, SimResult, SimSummary
from router.sim.simulator import SchedulerLike, SimulationError, Simulator
from router.sim.traces import TRACE_FORMATS, Trace, read_trace
from router.sim.workload import (
    WORKLOADS,
    Bursts,
    LengthDistribution,
    PrefixSharing,
    RequestSpec,
    generate,
    generate_for_duration,
    load_trace,
)

__all__ = [
    "TRACE_FORMATS",
    "WORKLOADS",
    "Bursts",
    "Cluster",
    "DeviceGroup",
    "DeviceSpec",
    "LengthDistribution",
    "Outcome",
    "PlanResult",
    "PlanTrial",
    "PrefixSharing",
    "RequestSpec",
    "SchedulerLike",
    "SimResult",
    "SimSummary",
    "SimulationError",
    "Simulator",
    "Trace",
    "generate",
    "generate_for_duration",
    "load_cluster",
    "load_trace",
    "parse_cluster",
    "plan_cluster",
    "read_trace",
    "resolve_policy",
]
