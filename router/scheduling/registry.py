"""Policies by kebab-case name, as settings and configuration files name them."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from router.errors import ConfigError
from router.scheduling.deciders import Decider, PromptLengthDecider
from router.scheduling.pickers import LeastOutstandingPicker, Picker
from router.scheduling.scheduler import Scheduler
from router.settings import Settings

_Factory = TypeVar("_Factory")

DECIDERS: dict[str, Callable[[Settings], Decider]] = {
    PromptLengthDecider.name: lambda s: PromptLengthDecider(s.split_min_prompt_tokens),
}
PICKERS: dict[str, Callable[[Settings], Picker]] = {
    LeastOutstandingPicker.name: lambda s: LeastOutstandingPicker(),
}


def build_scheduler(settings: Settings) -> Scheduler:
    return Scheduler(
        _lookup(DECIDERS, settings.decider, "decider")(settings),
        _lookup(PICKERS, settings.picker, "picker")(settings),
    )


def _lookup(table: dict[str, _Factory], name: str, what: str) -> _Factory:
    if name not in table:
        raise ConfigError(f"unknown {what} {name!r}; known: {', '.join(sorted(table))}")
    return table[name]
