"""Rollout decisions, pure and Ray-free: the plan schema (`plan.py`), gate verdicts (`gates.py`),
the state machine that runs a plan one reconcile tick at a time (`machine.py`), the A/B test
(`abtest/`), feedback outcomes (`feedback.py`), the Prometheus gate's client and the timeline.

The names below are the rollout API the controller, the CLI and the tests use.
"""

from app.observability.stats import VersionStats
from app.rollout.gates import (
    GateStatus,
    GateVerdict,
    Observation,
    evaluate_gates,
    evaluate_lift_gates,
)
from app.rollout.machine import (
    MAX_HISTORY_EVENTS,
    OPERATOR_COMMANDS,
    START_COMMAND,
    STATE_SCHEMA,
    Command,
    Decision,
    Event,
    Phase,
    RolloutState,
    apply_command,
    command_path,
    rollout_override,
    step,
    traffic_key,
)
from app.rollout.plan import (
    Analysis,
    BlueGreenPlan,
    CanaryPlan,
    CanaryStep,
    Gates,
    Hold,
    LinearPlan,
    Pause,
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
    "START_COMMAND",
    "STATE_SCHEMA",
    "Analysis",
    "BlueGreenPlan",
    "CanaryPlan",
    "CanaryStep",
    "Command",
    "Decision",
    "Event",
    "GateStatus",
    "GateVerdict",
    "Gates",
    "Hold",
    "LinearPlan",
    "Observation",
    "Pause",
    "Phase",
    "RolloutPlan",
    "RolloutState",
    "ScaleDown",
    "SetWeight",
    "Step",
    "Switch",
    "VersionStats",
    "WaitForPromote",
    "apply_command",
    "command_path",
    "evaluate_gates",
    "evaluate_lift_gates",
    "rollout_override",
    "step",
    "traffic_key",
]
