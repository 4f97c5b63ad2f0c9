"""The calls a paid stage says it will make, before it makes them: the planning types every stage shares.

Each paid stage builds its plan with the very request builders it sends with (04: `evaluate.planned_*_calls`,
05: `synthesize.planned_*_calls`, 06: `deploy.parity.planned_parity_calls`); the forecast only prices and sums
the plans (`forecast`). A plan never re-derives a stage's arithmetic: the stage that decides what it sends says
it here.

    PlannedCall(stage, cycle, provider, request, reply_tokens, count=1, max_count=None)

* `stage`: the ledger stage its pool writes (`schemas.LEDGER_*`); `cycle`: None for once-per-run work.
* `request`: the request as the stage sends it (a `services.ChatRequest`; read duck-typed here: `messages`,
  `max_tokens`, `json_schema`), or a representative one when `count` calls alike stand behind it (the same
  prompt sent again with another `repeat`, or a reply the stage cannot know yet, such as a synthetic pair).
* `reply_tokens`: the reply the stage expects (at most `max_tokens`); `count`: the calls expected (0: a call
  that goes out only when needed, e.g. a synthesis request beyond the expected yield); `max_count`: the most
  calls it can become (default `count`), each reply at `max_tokens` in the worst case.

`PlannedCalls` holds a stage's calls plus its `choices`: each a list of alternatives of which the run makes one,
decided at run time (05's generator is chosen by the teacher study): the forecast prices the costliest.

Foundation: imports nothing of the package.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class PlannedCall:
    """One request a paid stage will send (or `count` alike, up to `max_count`)."""

    stage: str
    cycle: int | None
    provider: str
    request: Any  # services.ChatRequest (messages, max_tokens, json_schema), or anything shaped like it
    reply_tokens: int
    count: int = 1
    max_count: int | None = None

    @property
    def max_tokens(self) -> int:
        return int(self.request.max_tokens)

    @property
    def most(self) -> int:
        """The most calls this line can become."""
        return self.count if self.max_count is None else self.max_count


@dataclass
class PlannedCalls:
    """A stage's planned calls, and its choices: per choice, alternatives of which the run makes one."""

    calls: list[PlannedCall] = field(default_factory=list)
    choices: list[list[list[PlannedCall]]] = field(default_factory=list)

    def __add__(self, other: PlannedCalls) -> PlannedCalls:
        return PlannedCalls([*self.calls, *other.calls], [*self.choices, *other.choices])

    def __bool__(self) -> bool:
        return bool(self.calls) or any(any(alt) for alt in self.choices)
