"""Rollout plans and the state machine that executes them, one reconcile tick at a time.

A rollout is data (Argo Rollouts' idea): a `RolloutPlan` declares the strategy, the two
versions, the steps and the gates. `RolloutPlan.expand` turns any strategy into one flat list
of concrete steps, so the state machine knows only six step kinds:

    LoadTest(stage)             the plan's load stage, first, candidate at 0%: wait for the
                                replay's verdict (`step(..., load=LoadResult)`); a pass moves
                                on, a failed gate rolls back before any user weight
    SetWeight(set_weight)       move the candidate's share of public traffic (instant)
    Hold(duration_s, analyze)   keep the weight for duration_s; with analyze, the gates must
                                all have passed (with min_requests) when the time is up
    WaitForPromote()            stop until an operator sends `promote`
    Switch(weight=100)          the final move to 100% (phase PROMOTING; instant)
    ScaleDown(delay_s)          keep the old version warm for delay_s, then finish

`step(state, observation, now) -> Decision` is the one reconcile function. The controller
calls it every tick (~250 ms) with the per-version stats gathered since
`state.window_started_at`; it recomputes everything from its inputs, never reads a clock,
returns early while the current step is unfinished, and is safe to repeat: the same inputs
always give the same `Decision`. Operator commands go through `apply_command`.

    IDLE ─tick─> PROGRESSING ─steps done─> PROMOTING ─scale-down done─> SUCCEEDED
                  │    ▲                      │
      pause, wait │    │ resume,              │
      for promote,│    │ promote              │
    inconclusive  ▼    │                      │
                 PAUSED┘                      │
    a gate fails in any live phase ───────────┴──> ROLLED_BACK   (candidate 0%)
    command abort in any live phase ───────────────> ABORTED       (candidate 0%)

SUCCEEDED, ROLLED_BACK and ABORTED are terminal and absorbing: `step` returns them unchanged
and every command raises. A new rollout is a new `RolloutState.start`.

Choices worth knowing (each one is the reason for some code below):

* **Gates judge in every live phase**, not only at the end of an analysis hold: a failing gate
  during a timed pause, a wait for promote, a user pause or a blue-green scale-down rolls back
  on that very tick. Only the *completion* of an analysis hold needs every gate decided.
* **fail_fast_error_rate** ignores min_requests (it needs only `fail_fast_min_requests`, 10 by
  default), which is what rolls a broken candidate back within one tick of the evidence.
* **The stats window restarts with every step** (`window_started_at`): min_requests is per step,
  and an analysis judges the weight it analyses. Stats gathered during a pause stay in the
  window: the weight did not change, so the evidence is as good.
* **Pause time does not count against a hold.** A 60 s analysis paused after 20 s needs 40 s
  more after `resume` (`hold_excluded_s` keeps the paused seconds out of the timer). Gates are
  still judged while paused.
* **An analysis that ends with a gate still pending is inconclusive** (too little traffic, no
  shadow comparisons, Prometheus returned nothing): the rollout goes PAUSED (not by the user),
  as Argo does, so it is visible rather than stuck. `resume` runs the hold timer again while
  the stats window keeps accumulating; `promote` accepts the step without a verdict.
* **Relative gates need a baseline.** With no stable requests (or no stable latency), the
  error-rate-increase and latency-ratio gates are `skipped`, so holds at 100% still finish;
  the absolute gates keep judging.
* **Commands change state at once** (abort sets 0% in the returned state, promote applies the
  next weights); call `step` right after to publish the traffic without waiting for a tick.
* **`generation` counts traffic changes**: it goes up by one whenever the traffic this rollout
  asks for (weights, stable version, shadow percent) changes, so routers can drop stale
  pushes. Pass the previous rollout's generation to `start` to keep it monotonic.
* **`now` is the controller's steady clock**: epoch seconds when its replica started, moving
  on with the monotonic clock, so a step of the wall clock (NTP, an operator) neither ends nor
  stretches a hold, and events still read as dates. Instants in a state mean something only
  to the process that made them: what is persisted for another process is elapsed seconds
  (`to_dict(now=...)`, `RolloutState.resume`), so a restarted controller resumes a hold where
  it was, on whatever node and clock, and time with no controller watching does not count.
* **A restart keeps the hold but not the evidence** (the stats window lived in the old
  replica's memory): the window restarts at the restart, and an analysis whose time is up
  with a gate still pending keeps holding until its window spans a whole hold, before it is
  called inconclusive. So a restart costs at most one hold (what it always cost), and nothing
  when the evidence since the restart already decides the gates.
* **The load stage's replay is an input, not an effect**: the controller runs it and passes
  its `LoadResult` to `step` once it is finished (None before). A failure rolls back as a
  failed gate does, with the load gates' readings in the event. A user pause stops the replay
  (the controller's) and `resume` runs it again from the start, as a controller restart does:
  a replay is minutes long and its partial figures are not a verdict. `promote` skips it.
* **progress_deadline_s** (Flagger's progressDeadlineSeconds): a candidate observed with no
  running replica for that long in a live phase rolls the rollout back. The clock starts when
  it is first seen not ready, stops when it is seen ready, restarts on `resume` from a user
  pause (which suspends it), and ignores readings that are unknown; it does not restart with
  each step, so a plan of short timed pauses cannot carry a dead candidate to 100%.
* **A step waits for capacity** (docs/capacity-aware-steps.md): for a candidate that opts in,
  the controller passes `capacity` (`StepCapacity`: the replica floor of the step that raises
  the candidate's weight, and the replicas it runs). A SetWeight or Switch to that weight
  returns early while the candidate runs fewer ("scaling v2 to 3 replicas for 50%"), for at
  most progress_deadline_s from the step's start; then PAUSED (promote goes on without the
  capacity, resume waits again). Commands pass no capacity: promote never waits for it.

Why one module of ~750 lines: the state, the commands and the reconcile function change
together (a new step kind touches all three), and most of it is this docstring and the
phase table; the plan schema (`plan.py`) and the gate judges (`gates.py`) are apart.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from typing import Any

from app.config import (
    TrafficConfig,
)
from app.config.traffic import apply_override
from app.messages import SHADOW_DECLARED
from app.rollout.capacity import StepCapacity
from app.rollout.gates import (
    LIFT_GATES,
    GateStatus,
    GateVerdict,
    Observation,
    evaluate_gates,
    evaluate_lift_gates,
)
from app.rollout.loadstage import LoadResult
from app.rollout.plan import (
    FAIL_FAST,
    Gates,
    Hold,
    LoadTest,
    RolloutPlan,
    ScaleDown,
    SetWeight,
    Step,
    Switch,
    WaitForPromote,
)

__all__ = [
    "MAX_HISTORY_EVENTS",
    "OPERATOR_COMMANDS",
    "STATE_SCHEMA",
    "START_COMMAND",
    "Command",
    "Decision",
    "Event",
    "Phase",
    "RolloutState",
    "apply_command",
    "command_path",
    "rollout_override",
    "step",
    "traffic_key",
]

# Bumped when the persisted layout of RolloutState.to_dict() changes incompatibly.
STATE_SCHEMA = 1
# Commands can be repeated without limit (pause, resume, pause...); the most recent events are
# what an operator needs, so older ones go first.
MAX_HISTORY_EVENTS = 1000


# -- the state -------------------------------------------------------------------------------


class Phase(str, Enum):
    """Where a rollout is. The last three are terminal."""

    IDLE = "idle"  # declared; the first tick starts it
    PROGRESSING = "progressing"  # executing steps
    PAUSED = "paused"  # by the user, by a `pause_s: null` step, or an inconclusive analysis
    PROMOTING = "promoting"  # switched to 100%; old version kept warm until scale-down
    SUCCEEDED = "succeeded"  # the candidate is the stable version
    ROLLED_BACK = "rolled_back"  # a gate failed; all traffic on stable
    ABORTED = "aborted"  # an operator aborted; all traffic on stable

    @property
    def terminal(self) -> bool:
        return self in _TERMINAL


_TERMINAL = frozenset({Phase.SUCCEEDED, Phase.ROLLED_BACK, Phase.ABORTED})


class Command(str, Enum):
    """Operator commands (`rollout promote [--full] | pause | resume | abort`)."""

    PROMOTE = "promote"  # finish the current wait (pause, analysis, wait for promote) now
    PROMOTE_FULL = "promote_full"  # skip to the switch: 100% now
    PAUSE = "pause"
    RESUME = "resume"
    ABORT = "abort"


# Not a state-machine command: a new rollout of the declared plan (RolloutState.start), which
# the controller runs itself.
START_COMMAND = "start"
# Every operator command, as the CLI and the controller name them.
OPERATOR_COMMANDS: tuple[str, ...] = (START_COMMAND, *(c.value for c in Command))


def command_path(name: str) -> str:
    """The admin API's path segment for an operator command (`promote_full` -> `promote-full`)."""
    return name.replace("_", "-")


@dataclass(frozen=True)
class Event:
    """One line of a rollout's history: a phase change, a step done, or a command."""

    time_s: float
    from_phase: Phase
    to_phase: Phase
    step_index: int
    weight: float  # candidate percent after the event
    reason: str
    gates: dict[str, dict[str, Any]] = field(default_factory=dict)  # gate -> reading

    def to_dict(self) -> dict[str, Any]:
        return {
            "time_s": self.time_s,
            "from_phase": self.from_phase.value,
            "to_phase": self.to_phase.value,
            "step_index": self.step_index,
            "weight": self.weight,
            "reason": self.reason,
            "gates": self.gates,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Event:
        return cls(
            time_s=float(data["time_s"]),
            from_phase=Phase(data["from_phase"]),
            to_phase=Phase(data["to_phase"]),
            step_index=int(data["step_index"]),
            weight=float(data["weight"]),
            reason=str(data["reason"]),
            gates={k: dict(v) for k, v in data.get("gates", {}).items()},
        )


@dataclass(frozen=True)
class RolloutState:
    """The live state of one rollout: everything `step` needs besides the observation.

    Immutable; `step` and `apply_command` return new states. Persist with `to_dict` (JSON-safe)
    and load with `from_dict`."""

    plan: RolloutPlan
    phase: Phase
    step_index: int  # index into plan.expand(); len(...) once finished
    candidate_weight: float
    step_started_at: float  # the controller's clock; also the stats window's start (see below)
    paused_by_user: bool = False
    paused_at: float | None = None  # when the user paused (timer frozen since)
    hold_excluded_s: float = 0.0  # seconds since step_started_at that do not count toward it
    history: tuple[Event, ...] = ()
    generation: int = 0
    # The lift gates' sequential tests, carried from tick to tick: gate -> Verdict.reading().
    lift: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    # Set only by `resume` (a controller restart): the stats window starts here, not at
    # step_started_at, because the evidence before it was in the old process's memory.
    evidence_since: float | None = None
    # When the candidate was last seen going without a running replica (None: seen ready, or
    # not seen at all): the progress deadline's clock.
    unready_since: float | None = None

    @classmethod
    def start(
        cls, plan: RolloutPlan, now: float, *, generation: int = 0, reason: str | None = None
    ) -> RolloutState:
        """A new rollout, IDLE at 0%; the first `step` starts it. `reason` (an operator's
        `start` command and who sent it) is the first event of its history."""
        state = cls(
            plan=plan,
            phase=Phase.IDLE,
            step_index=0,
            candidate_weight=0.0,
            step_started_at=now,
            generation=generation,
        )
        if reason:
            state = replace(
                state, history=(_event(state, state, now, f"command start ({reason})"),)
            )
        return state

    @property
    def steps(self) -> list[Step]:
        return self.plan.expand()

    @property
    def current_step(self) -> Step | None:
        steps = self.steps
        return steps[self.step_index] if self.step_index < len(steps) else None

    @property
    def window_started_at(self) -> float:
        """Where the stats passed to the next `step` must start: the step's start, or the
        controller's restart if that came later."""
        return self.step_started_at if self.evidence_since is None else self.evidence_since

    @property
    def stable_version(self) -> str:
        """The version that is stable now: the candidate once the rollout succeeded."""
        return self.plan.candidate if self.phase is Phase.SUCCEEDED else self.plan.stable

    @property
    def weights(self) -> dict[str, float]:
        return {
            self.plan.candidate: self.candidate_weight,
            self.plan.stable: 100.0 - self.candidate_weight,
        }

    @property
    def shadow_percent(self) -> float:
        """Percent mirrored to the candidate: blue-green's shadow, before the switch only."""
        bg = self.plan.blue_green
        if bg is None or self.phase not in (Phase.PROGRESSING, Phase.PAUSED):
            return 0.0
        return bg.shadow_percent

    def elapsed_s(self, now: float) -> float:
        """Seconds the current step has run, paused time excluded."""
        paused = now - self.paused_at if self.paused_at is not None else 0.0
        return max(0.0, now - self.step_started_at - self.hold_excluded_s - paused)

    def remaining_s(self, now: float) -> float | None:
        """Seconds left in the current timed step, or None when it is not timed."""
        current = self.current_step
        if isinstance(current, Hold):
            return max(0.0, current.duration_s - self.elapsed_s(now))
        if isinstance(current, ScaleDown):
            return max(0.0, current.delay_s - self.elapsed_s(now))
        return None

    @property
    def timer_running(self) -> bool:
        """Whether time moves this state on by itself: a timed step (hold, scale-down) in
        progress, or the progress deadline's clock. Only then do stored timers go stale."""
        if self.phase.terminal or self.paused_by_user:
            return False
        timed = isinstance(self.current_step, (Hold, ScaleDown)) and self.phase is not Phase.PAUSED
        return timed or self.unready_since is not None

    def unready_s(self, now: float) -> float | None:
        """Seconds the candidate has gone without a running replica (None: it has one, or no
        one knows)."""
        return None if self.unready_since is None else max(0.0, now - self.unready_since)

    def to_dict(self, now: float | None = None) -> dict[str, Any]:
        """JSON-safe. `from_dict` gives back exactly this state, instants included; they mean
        something only on the clock of the process that made them. With `now`, the timers are
        also written as elapsed seconds at `now` (`timers`): what `resume` needs in another
        process, so a controller persists with `now`."""
        data = {
            "schema": STATE_SCHEMA,
            "plan": self.plan.model_dump(mode="json"),
            "phase": self.phase.value,
            "step_index": self.step_index,
            "candidate_weight": self.candidate_weight,
            "step_started_at": self.step_started_at,
            "paused_by_user": self.paused_by_user,
            "paused_at": self.paused_at,
            "hold_excluded_s": self.hold_excluded_s,
            "history": [event.to_dict() for event in self.history],
            "generation": self.generation,
            "lift": {name: dict(reading) for name, reading in self.lift.items()},
            "evidence_since": self.evidence_since,
            "unready_since": self.unready_since,
        }
        if now is not None:
            data["timers"] = {
                "step_elapsed_s": self.elapsed_s(now),
                "unready_s": self.unready_s(now),
            }
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RolloutState:
        schema = data.get("schema")
        if schema != STATE_SCHEMA:
            raise ValueError(f"rollout state schema {schema!r} is not {STATE_SCHEMA}")
        paused_at = data["paused_at"]
        return cls(
            plan=RolloutPlan.model_validate(data["plan"]),
            phase=Phase(data["phase"]),
            step_index=int(data["step_index"]),
            candidate_weight=float(data["candidate_weight"]),
            step_started_at=float(data["step_started_at"]),
            paused_by_user=bool(data["paused_by_user"]),
            paused_at=None if paused_at is None else float(paused_at),
            hold_excluded_s=float(data["hold_excluded_s"]),
            history=tuple(Event.from_dict(event) for event in data["history"]),
            generation=int(data["generation"]),
            lift={name: dict(reading) for name, reading in data.get("lift", {}).items()},
            evidence_since=_optional_float(data.get("evidence_since")),
            unready_since=_optional_float(data.get("unready_since")),
        )

    @classmethod
    def resume(cls, data: Mapping[str, Any], now: float) -> RolloutState:
        """A state another process stored with `to_dict(now=...)`, its timers carried onto
        this process's clock at `now`.

        Durations travel as elapsed seconds, never as instants: the two processes' clocks need
        not agree (another node, a stepped wall clock, another monotonic origin). The step's
        hold resumes where the stored timers left it (a crash-looping controller still finishes
        a long analysis), a user pause stays frozen, and the time between the write and `now`,
        when no controller watched, does not count. The stats window starts at `now` (the
        evidence was in the old process's memory). A state stored without timers (by a
        controller from before they were written) restarts its step's timer, as that
        controller did. ValueError when the timers are not finite non-negative numbers."""
        state = cls.from_dict(data)
        timers = data.get("timers") or {}
        if not isinstance(timers, Mapping):
            raise ValueError(f"timers ({timers!r}) must be a mapping")
        elapsed = float(timers.get("step_elapsed_s", 0.0))
        unready = _optional_float(timers.get("unready_s"))
        for name, value in (("step_elapsed_s", elapsed), ("unready_s", unready)):
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ValueError(f"timers.{name} ({value}) must be a finite number >= 0")
        return replace(
            state,
            step_started_at=now - elapsed,
            hold_excluded_s=0.0,
            paused_at=now if state.paused_at is not None else None,
            evidence_since=now,
            unready_since=None if unready is None else now - unready,
        )


def _optional_float(value: Any) -> float | None:
    return None if value is None else float(value)


@dataclass(frozen=True)
class Decision:
    """What one tick (or command) decided: the next state and the traffic it asks for."""

    state: RolloutState
    weights: dict[str, float]  # candidate and stable percent, summing to 100
    stable: str  # the stable version now (fallback target); the candidate once SUCCEEDED
    shadow_percent: float  # percent mirrored to the candidate (blue-green before the switch)
    verdicts: tuple[GateVerdict, ...]  # this tick's gate verdicts; () when none were taken
    events: tuple[Event, ...]  # the events this call added to the history
    traffic_changed: bool  # weights, stable or shadow differ from the input state's: push
    # Why the current step waits for the candidate's replicas (None: it does not).
    capacity_wait: str | None = None

    def traffic_config(self, base: TrafficConfig) -> TrafficConfig:
        """`base` (the declared router config) with this decision's traffic, as a router
        applies it (`apply_override`): the rollout owns weights (any other version in base
        gets 0) and the stable version; for blue-green also the shadow rule. Breaker, cache,
        fallbacks and timeouts come from base."""
        return apply_override(base, {"generation": 0, **rollout_override(self.state)})


# -- the reconcile function ------------------------------------------------------------------


def traffic_key(state: RolloutState) -> tuple[Any, ...]:
    """What of `state` routers see: two states with the same key route the same way."""
    return (tuple(sorted(state.weights.items())), state.stable_version, state.shadow_percent)


def rollout_override(state: RolloutState) -> dict[str, Any]:
    """The traffic `state` asks routers for (a TrafficOverride without its generation): the
    weights and the stable version; for blue-green also the shadow copy to the candidate."""
    shadow: Any = SHADOW_DECLARED
    if state.plan.strategy == "blue_green":
        percent = state.shadow_percent
        shadow = {"version": state.plan.candidate, "percent": percent} if percent > 0 else None
    return {"weights": state.weights, "stable": state.stable_version, "shadow": shadow}


def _readings(verdicts: tuple[GateVerdict, ...] | None) -> dict[str, dict[str, Any]]:
    return {v.gate: v.reading() for v in verdicts or ()}


def _event(
    before: RolloutState,
    after: RolloutState,
    now: float,
    reason: str,
    verdicts: tuple[GateVerdict, ...] | None = None,
    *,
    step_index: int | None = None,
) -> Event:
    return Event(
        time_s=now,
        from_phase=before.phase,
        to_phase=after.phase,
        step_index=before.step_index if step_index is None else step_index,
        weight=after.candidate_weight,
        reason=reason,
        gates=_readings(verdicts),
    )


def _next_step(
    state: RolloutState, now: float, *, weight: float | None = None, phase: Phase | None = None
) -> RolloutState:
    """Move to the following step with a fresh timer and stats window."""
    return replace(
        state,
        step_index=state.step_index + 1,
        step_started_at=now,
        evidence_since=None,
        hold_excluded_s=0.0,
        paused_at=None,
        paused_by_user=False,
        candidate_weight=state.candidate_weight if weight is None else weight,
        phase=state.phase if phase is None else phase,
    )


def _end(
    state: RolloutState,
    now: float,
    phase: Phase,
    reason: str,
    verdicts: tuple[GateVerdict, ...] | None,
    events: list[Event],
) -> RolloutState:
    """Roll back or abort: all traffic back on the stable version."""
    after = replace(state, phase=phase, candidate_weight=0.0, paused_by_user=False, paused_at=None)
    events.append(_event(state, after, now, reason, verdicts))
    return after


def _run_steps(
    state: RolloutState,
    now: float,
    verdicts: tuple[GateVerdict, ...] | None,
    events: list[Event],
    *,
    skip_first_wait: bool = False,
    load: LoadResult | None = None,
    capacity: StepCapacity | None = None,
) -> RolloutState:
    """Execute steps from state.step_index until one must wait (or the rollout is done).

    `verdicts` is None when called from a command: an analysis that is due then waits for
    the next tick's verdicts, and a load stage for its result (`load`, None until the
    controller's replay has finished). `skip_first_wait` (promote) ends the first waiting step at once.
    Each loop either returns or moves one step on, so it ends within len(steps) loops."""
    steps = state.plan.expand()
    total = len(steps)
    s = state
    while True:
        index = s.step_index
        if index >= total:
            after = replace(s, phase=Phase.SUCCEEDED, candidate_weight=100.0)
            events.append(
                _event(s, after, now, f"succeeded: {s.plan.candidate} is stable", verdicts)
            )
            return after
        current = steps[index]
        where = f"step {index + 1}/{total}"
        short = _capacity_short(s, capacity)
        if short is not None:
            deadline_s = s.plan.progress_deadline_s
            waited_s = s.elapsed_s(now)
            if deadline_s is None or waited_s < deadline_s:
                return s
            after = replace(s, phase=Phase.PAUSED, paused_by_user=False)
            reason = (
                f"{where}: no capacity after {waited_s:.0f}s (progress_deadline_s: "
                f"{deadline_s:g}): {short.reason()}; promote to go on without it"
            )
            events.append(_event(s, after, now, reason, verdicts))
            return after
        if isinstance(current, SetWeight):
            after = _next_step(s, now, weight=current.set_weight)
            events.append(_event(s, after, now, f"{where}: {current.describe()}", verdicts))
            s = after
            continue
        if isinstance(current, Switch):
            after = _next_step(s, now, weight=current.weight, phase=Phase.PROMOTING)
            events.append(_event(s, after, now, f"{where}: {current.describe()}", verdicts))
            s = after
            continue
        # A waiting step: LoadTest, Hold, WaitForPromote or ScaleDown.
        if skip_first_wait:
            skip_first_wait = False
            after = _next_step(s, now)
            reason = f"{where}: {current.describe()} skipped by promote"
            events.append(_event(s, after, now, reason))
            s = after
            continue
        if isinstance(current, LoadTest):
            if load is None:
                return s
            if not load.passed:
                detail = "; ".join(
                    f"gate {gate} failed: {load.readings[gate]['reason']}" for gate in load.failed
                )
                after = _end(s, now, Phase.ROLLED_BACK, f"rolled back in the load stage: {detail}",
                             None, events)  # fmt: skip
                events[-1] = replace(events[-1], gates=dict(load.readings))
                return after
            after = _next_step(s, now)
            events.append(replace(
                _event(s, after, now, f"{where}: load stage passed: {load.summary}"),
                gates=dict(load.readings),
            ))  # fmt: skip
            load = None
            s = after
            continue
        if isinstance(current, WaitForPromote):
            if s.phase is Phase.PAUSED:
                return s
            after = replace(s, phase=Phase.PAUSED, paused_by_user=False)
            events.append(_event(s, after, now, f"{where}: waiting for promote", verdicts))
            return after
        assert isinstance(current, (Hold, ScaleDown))
        duration_s = current.duration_s if isinstance(current, Hold) else current.delay_s
        if s.elapsed_s(now) < duration_s:
            return s
        reason = f"{where}: {current.describe()} done"
        if isinstance(current, Hold) and current.analyze:
            if verdicts is None:
                return s
            undecided = [
                v for v in verdicts if v.status is GateStatus.PENDING and v.gate != FAIL_FAST
            ]
            if undecided and s.elapsed_s(now) < duration_s + _lift_wait_s(s.plan.gates, undecided):
                return s  # only lift gates are undecided and they may still take their time
            if undecided and now - s.window_started_at < duration_s:
                return s  # a restart cut the evidence short: not inconclusive before a full hold
            if undecided:
                after = replace(s, phase=Phase.PAUSED, paused_by_user=False)
                detail = "; ".join(f"{v.gate}: {v.reason}" for v in undecided)
                events.append(
                    _event(s, after, now, f"{where}: analysis inconclusive: {detail}", verdicts)
                )
                return after
            reason = f"{where}: {current.describe()} passed"
        after = _next_step(s, now)
        events.append(_event(s, after, now, reason, verdicts))
        s = after


def _capacity_short(state: RolloutState, capacity: StepCapacity | None) -> StepCapacity | None:
    """`capacity` when the current step raises the candidate's weight to `capacity.weight` and
    the candidate runs fewer replicas than that weight's floor; else None."""
    current = state.current_step
    if capacity is None or state.phase is not Phase.PROGRESSING:
        return None
    if isinstance(current, SetWeight):
        target = current.set_weight
    elif isinstance(current, Switch):
        target = current.weight
    else:
        return None
    if target <= state.candidate_weight or target != capacity.weight or not capacity.waits:
        return None
    return capacity


def _lift_wait_s(gates: Gates, undecided: list[GateVerdict]) -> float:
    """How much longer than its duration an analysis may hold for `undecided` gates: the
    smallest max_wait_s among them, 0 if any is not a lift gate or is a horizon test that
    has ended (no later look can decide it)."""
    waits = []
    for verdict in undecided:
        gate = getattr(gates, verdict.gate, None) if verdict.gate in LIFT_GATES else None
        ended = bool(verdict.detail.get("ended"))
        waits.append(gate.max_wait_s if gate is not None and not ended else 0.0)
    return min(waits, default=0.0)


def _track_readiness(state: RolloutState, ready: bool | None, now: float) -> RolloutState:
    """Start the progress deadline's clock when the candidate is first seen without a running
    replica, stop it when it is seen with one; an unknown reading changes nothing."""
    if ready is True and state.unready_since is not None:
        return replace(state, unready_since=None)
    if ready is False and state.unready_since is None:
        return replace(state, unready_since=now)
    return state


def _past_progress_deadline(state: RolloutState, ready: bool | None, now: float) -> str | None:
    """Why the rollout is past its progress deadline, or None. Only on a reading that the
    candidate is not ready (an unknown one is no evidence), and never during a user pause (an
    operator is looking; `resume` restarts the clock)."""
    deadline_s = state.plan.progress_deadline_s
    unready_s = state.unready_s(now)
    if deadline_s is None or ready is not False or unready_s is None or state.paused_by_user:
        return None
    if unready_s < deadline_s:
        return None
    return (
        f"progress deadline exceeded: candidate {state.plan.candidate} has had no running "
        f"replica for {unready_s:.0f}s (progress_deadline_s: {deadline_s:g})"
    )


def _decide(
    before: RolloutState,
    after: RolloutState,
    verdicts: tuple[GateVerdict, ...],
    events: list[Event],
    capacity_wait: str | None = None,
) -> Decision:
    changed = traffic_key(after) != traffic_key(before)
    history = (before.history + tuple(events))[-MAX_HISTORY_EVENTS:]
    after = replace(after, history=history, generation=before.generation + (1 if changed else 0))
    return Decision(
        state=after,
        weights=after.weights,
        stable=after.stable_version,
        shadow_percent=after.shadow_percent,
        verdicts=verdicts,
        events=tuple(events),
        traffic_changed=changed,
        capacity_wait=capacity_wait,
    )


def step(
    state: RolloutState,
    observation: Observation,
    now: float,
    *,
    load: LoadResult | None = None,
    capacity: StepCapacity | None = None,
) -> Decision:
    """One reconcile tick: judge the gates, then run the plan as far as it can go now.

    `observation` covers `state.window_started_at` .. `now`; `load` is the finished replay of
    the plan's load stage while it is the current step (else None, and ignored). A failed gate rolls back at once
    (in any live phase); a paused rollout only has its gates judged; otherwise the steps run
    until one must wait. `capacity` (a candidate that opts in to capacity-aware steps) holds
    the step that raises its weight until it runs the replicas the new share needs. Pure: the
    same inputs give the same Decision."""
    if state.phase.terminal:
        return _decide(state, state, (), [])
    events: list[Event] = []
    s = state
    plan = s.plan
    if s.phase is Phase.IDLE:
        s = replace(s, phase=Phase.PROGRESSING, step_started_at=now, evidence_since=None)
        events.append(
            _event(
                state,
                s,
                now,
                f"started: {plan.strategy} rollout of {plan.candidate} (stable {plan.stable}), "
                f"plan {plan.digest()}",
            )  # fmt: skip
        )
    verdicts = evaluate_gates(plan.gates, observation, candidate=plan.candidate, stable=plan.stable)
    lift_verdicts, lift = evaluate_lift_gates(
        plan.gates, observation, s.lift, candidate=plan.candidate, stable=plan.stable
    )
    if lift_verdicts:
        verdicts += lift_verdicts
        s = replace(s, lift=lift)
    s = _track_readiness(s, observation.candidate_ready, now)
    failed = [v for v in verdicts if v.status is GateStatus.FAILED]
    overdue = _past_progress_deadline(s, observation.candidate_ready, now)
    if failed:
        detail = "; ".join(f"gate {v.gate} failed: {v.reason}" for v in failed)
        s = _end(s, now, Phase.ROLLED_BACK, f"rolled back: {detail}", verdicts, events)
    elif overdue is not None:
        s = _end(s, now, Phase.ROLLED_BACK, f"rolled back: {overdue}", verdicts, events)
    elif s.phase is not Phase.PAUSED:
        s = _run_steps(s, now, verdicts, events, load=load, capacity=capacity)
    short = _capacity_short(s, capacity)
    return _decide(state, s, verdicts, events, short.reason() if short is not None else None)


_ALLOWED: dict[Command, frozenset[Phase]] = {
    Command.PROMOTE: frozenset({Phase.PROGRESSING, Phase.PAUSED, Phase.PROMOTING}),
    Command.PROMOTE_FULL: frozenset({Phase.PROGRESSING, Phase.PAUSED, Phase.PROMOTING}),
    Command.PAUSE: frozenset({Phase.PROGRESSING}),
    Command.RESUME: frozenset({Phase.PAUSED}),
    Command.ABORT: frozenset({Phase.IDLE, Phase.PROGRESSING, Phase.PAUSED, Phase.PROMOTING}),
}


def _refusal(command: Command, phase: Phase) -> str:
    if phase.terminal:
        why = "it has ended; declare a new rollout"
    elif phase is Phase.IDLE:
        why = "it has not started yet; the controller's next tick starts it"
    elif command is Command.PAUSE and phase is Phase.PAUSED:
        why = "it is already paused"
    elif command is Command.PAUSE:
        why = "traffic has already switched; abort to roll back or promote to finish"
    else:
        why = "it is not paused"
    return f"cannot {command.value}: the rollout is {phase.value} ({why})"


def apply_command(
    state: RolloutState, command: Command | str, now: float, *, reason: str = ""
) -> RolloutState:
    """An operator command, recorded in the history; `reason` (who, why) goes into the event.

    * promote: end the current wait (pause, analysis, wait for promote, scale-down delay) and
      apply the following weight changes now; gates still judge on the next tick.
    * promote_full: jump to the switch (100%); in PROMOTING, finish now.
    * pause / resume: freeze / unfreeze the step timer (gates keep judging). resume also
      re-runs an inconclusive analysis (timer restarts; the stats window keeps growing).
    * abort: all traffic back on stable, ABORTED.

    Raises ValueError naming the phase when the command does not apply to it."""
    command = Command(command)
    phase = state.phase
    if phase not in _ALLOWED[command]:
        raise ValueError(_refusal(command, phase))
    note = f"command {command.value}" + (f" ({reason})" if reason else "")
    events: list[Event] = []
    if command is Command.ABORT:
        s = _end(state, now, Phase.ABORTED, f"aborted: {note}", None, events)
    elif command is Command.PAUSE:
        s = replace(state, phase=Phase.PAUSED, paused_by_user=True, paused_at=now)
        events.append(_event(state, s, now, note))
    elif command is Command.RESUME:
        current = state.current_step
        if state.paused_by_user:
            assert state.paused_at is not None
            excluded = state.hold_excluded_s + max(0.0, now - state.paused_at)
        elif isinstance(current, Hold) and current.analyze:
            excluded = max(0.0, now - state.step_started_at)  # run the analysis timer again
        elif isinstance(current, (SetWeight, Switch)):
            excluded = max(0.0, now - state.step_started_at)  # wait for capacity again
        else:
            raise ValueError(
                f"cannot resume: the rollout is paused at step {state.step_index + 1} waiting "
                "for promote; use promote"
            )
        s = replace(
            state,
            phase=Phase.PROGRESSING,
            paused_by_user=False,
            paused_at=None,
            hold_excluded_s=excluded,
            # A user pause suspended the progress deadline: it starts again from now.
            unready_since=now
            if state.paused_by_user and state.unready_since is not None
            else state.unready_since,
        )
        events.append(_event(state, s, now, note))
    else:
        s = state
        if s.phase is Phase.PAUSED:
            s = replace(s, phase=Phase.PROGRESSING, paused_by_user=False, paused_at=None)
        if command is Command.PROMOTE_FULL:
            steps = s.plan.expand()
            switch = next(i for i, item in enumerate(steps) if isinstance(item, Switch))
            target = switch if s.step_index <= switch else len(steps)
            s = replace(
                s, step_index=target, step_started_at=now, evidence_since=None, hold_excluded_s=0.0
            )
            events.append(_event(state, s, now, note, step_index=state.step_index))
            s = _run_steps(s, now, None, events)
        else:
            events.append(_event(state, s, now, note))
            # At a SetWeight or Switch the wait is for capacity: promote ends that one (the
            # step goes on without it), not the wait after it.
            waiting_for_capacity = isinstance(s.current_step, (SetWeight, Switch))
            s = _run_steps(s, now, None, events, skip_first_wait=not waiting_for_capacity)
    return _decide(state, s, (), events).state
