"""Region waves: one version rolled across regions, a wave at a time.

    configs/waves/recommender-v2.yaml
        name: recommender-v2                    # names the state and lock files
        on_failure: halt                        # or rollback_all
        waves:
          - regions: [{region: us-east-1, plan: configs/rollouts/recommender-v2-canary.yaml}]
            bake_s: 1800                        # after every region of the wave succeeded
          - regions:
              - {region: eu-west-1, plan: configs/rollouts/recommender-v2-canary.yaml}
              - {region: europe-west4, plan: configs/rollouts/recommender-v2-canary.yaml}
            bake_s: 0

Each region runs its own Ray cluster, Serve app and RolloutController; the orchestrator only
talks to them: it declares a region's plan (the region's rendered serve config with the plan
in the controller's `user_config`, PUT to the region's dashboard, which is what `serve deploy`
does; or `POST /admin/rollout/start` when the plan is already declared), reads each region's
`GET /admin/rollout`, and decides. Where a region is and how to reach it (router URL, admin
token file, dashboard URL) comes from the region's overlay (`admin:` in configs/regions/), never
from the waves file.

One reconcile per poll (`WavesRunner.tick`), safe to repeat: it re-reads every region of the
current wave and recomputes from what it sees. A region is
* `pending`: not started yet (its wave has not come);
* `starting`: the orchestrator is declaring or starting its plan (persisted before the call,
  so a restart repeats the call rather than losing it; both calls are idempotent);
* `running`: its controller runs the plan (idle, progressing, paused, promoting);
* `succeeded` / `failed` (rolled back by its own gates, or aborted in the region);
* `unreachable`: the last read failed. Unreachable is "paused, not passed": the wave does not
  finish, its bake does not end, until the region answers again;
* `rolled_back`: rolled back by the orchestrator (`rollback_all`, `rollout waves abort`).

A wave is done when every region succeeded; then the bake starts (`bake_s`, wall clock:
`time.time()`, because the start of the bake must mean the same instant to the next process
that resumes it, on this machine or another; time with no orchestrator running counts, as
the regions keep serving the new version meanwhile; an operator pause does not count). During
the bake the wave's regions are still read: one that stops being `succeeded` (a new
declaration, an abort) fails the wave. After the bake the next wave starts.

On a failure: `halt` starts no later wave (the failing region rolled itself back; the others
keep what they have: earlier waves stay promoted); `rollback_all` sends every region of this
rollout back to stable: a live rollout is aborted (`POST /admin/rollout/abort`), a finished
one is declared again with no plan (`plan: null`: routers follow the region config's declared
weights, the stable version).

State (`<state_dir>/<name>.state.json`) is written atomically (temp file + rename) after every
change and before every action; a lock file (`<name>.lock`, pid and host of the holder) keeps
a second orchestrator off the same waves; a lock whose holder process is gone (same host) is
stale and taken over. Commands for a running orchestrator (`pause`, `resume`, `promote`,
`abort`) go through an inbox directory it reads on every tick.

Every region of the waves file (all waves) is told the whole waves state, for its operator
page (`status["waves"]`): after each tick that changed it, and at least every
`PUBLISH_EVERY_S` while the waves run, the orchestrator POSTs `waves_document()` to the
region's `POST /admin/waves` with its admin token (`WavesPublisher`). The posts run in the
background, latest document wins, with a short timeout and no retry: a region that refuses
or is down is logged and never fails, blocks or slows a tick (the next publish tries again).

Exceptions:

    WavesError                 the orchestrator cannot go on (bad state, declare failed)
    ├── WavesLocked            another orchestrator holds the lock
    └── WavesConfigError       (also a ConfigError) a bad waves file: names the field
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import math
import os
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any, Literal

import httpx
from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.config import (
    LABEL_VALUE_PATTERN,
    load_checked,
    load_yaml,
    project_root,
)
from app.config.waves import MAX_TEXT
from app.constants import IDEMPOTENCY_HEADER
from app.errors import ConfigError
from app.ops.cli.admin_client import error_detail

__all__ = [
    "DEFAULT_STATE_DIR",
    "WAVES_DIR",
    "RegionPlan",
    "RegionTarget",
    "Wave",
    "WavesConfigError",
    "WavesError",
    "WavesLock",
    "WavesLocked",
    "WavesPhase",
    "WavesPublisher",
    "WavesRunner",
    "WavesSpec",
    "load_waves",
    "read_state",
    "region_reading",
    "resolve_waves",
    "send_command",
]

WAVES_DIR = Path("configs/waves")
ROLLOUTS_DIR = Path("configs/rollouts")
DEFAULT_STATE_DIR = Path(".rollout/waves")
STATE_SCHEMA = 1
DEPLOY_PATH = "/api/serve/applications/"
ADMIN_PATH = "/admin/rollout"
WAVES_PATH = "/admin/waves"  # where a region takes the waves state (deployments/router.py)
PUBLISH_EVERY_S = 5.0  # the waves state is published at least this often while they run
PUBLISH_TIMEOUT_S = 2.0  # per post (at most request_timeout_s); a failed one is not retried
NAME_PATTERN = r"^[a-z0-9]([a-z0-9._-]{0,61}[a-z0-9])?$"
HISTORY_LIMIT = 1000


# --------------------------------------------------------------------------------- the waves file


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class RegionPlan(StrictModel):
    """One region of a wave and the rollout plan it runs."""

    region: str = Field(
        pattern=LABEL_VALUE_PATTERN,
        description="Region name: configs/regions/<region>.yaml must exist, with an `admin:` block.",
    )
    plan: str = Field(
        min_length=1,
        description="Rollout plan file under configs/rollouts/ (relative to the project root).",
    )


class Wave(StrictModel):
    """Regions that roll out at the same time, then a bake before the next wave."""

    regions: list[RegionPlan] = Field(min_length=1, description="Regions of this wave.")
    bake_s: float = Field(
        ge=0,
        le=7 * 86400,
        description="Seconds to wait after every region of the wave succeeded, with no failure, "
        "before the next wave starts (wall clock; an orchestrator pause does not count).",
    )


class WavesSpec(StrictModel):
    """`configs/waves/<name>.yaml`."""

    name: str = Field(
        pattern=NAME_PATTERN,
        description="Names this rollout: its state and lock files in the state directory.",
    )
    serve_config: str = Field(
        default="serve_config.yaml",
        min_length=1,
        description="Base serve config; each region's overlay is rendered onto it to declare "
        "the region's plan.",
    )
    on_failure: Literal["halt", "rollback_all"] = Field(
        description="halt: no later wave starts (the failing region rolled itself back); "
        "rollback_all: every region of this rollout goes back to stable."
    )
    poll_interval_s: float = Field(
        default=5.0, gt=0, le=300, description="Seconds between reads of the regions."
    )
    request_timeout_s: float = Field(
        default=5.0, gt=0, le=120, description="Seconds per HTTP request to a region."
    )
    waves: list[Wave] = Field(min_length=1, description="The waves, in order.")

    @model_validator(mode="after")
    def _each_region_once(self) -> WavesSpec:
        seen: dict[str, str] = {}
        for i, wave in enumerate(self.waves):
            for j, entry in enumerate(wave.regions):
                where = f"waves[{i}].regions[{j}]"
                if entry.region in seen:
                    raise ValueError(
                        f"{where}.region: {entry.region!r} is already in {seen[entry.region]}; "
                        "a region rolls out once per waves file"
                    )
                seen[entry.region] = where
        return self

    def regions(self) -> list[tuple[int, RegionPlan]]:
        return [(i, entry) for i, wave in enumerate(self.waves) for entry in wave.regions]


class WavesConfigError(ConfigError):
    """A waves file (or what it names) is wrong; the message names the file and the field."""


@dataclass(frozen=True)
class RegionTarget:
    """A region of the waves, resolved: its plan and how to reach it (from its overlay)."""

    region: str
    wave: int
    plan_file: str
    plan: dict[str, Any]
    plan_digest: str
    candidate: str
    url: str
    token_file: str
    dashboard_url: str | None
    overlay_file: Path


def load_waves(path: Path | str) -> WavesSpec:
    """The waves file, checked against the schema (errors name the file and the field)."""
    return load_checked(path, WavesSpec, "a mapping with name, on_failure, waves",
                        error=WavesConfigError)  # fmt: skip


def resolve_waves(
    spec: WavesSpec, root: Path | None = None, where: str = "waves"
) -> list[RegionTarget]:
    """Each region's overlay (configs/regions/) and plan (configs/rollouts/), checked: every
    problem is reported at once, each naming the field of the waves file."""
    from app.ops.declare import load_plan
    from app.ops.overlay import load_overlay, overlay_path
    from app.rollout import RolloutPlan

    root = root or project_root()
    errors: list[str] = []
    targets: list[RegionTarget] = []
    if not (root / spec.serve_config).is_file():
        errors.append(f"{where}: serve_config: {spec.serve_config} does not exist")
    rollouts = (root / ROLLOUTS_DIR).resolve()
    for i, wave in enumerate(spec.waves):
        for j, entry in enumerate(wave.regions):
            field_ = f"{where}: waves[{i}].regions[{j}]"
            path = overlay_path(entry.region, root)
            overlay = None
            if not path.is_file():
                known = sorted(p.stem for p in (root / "configs/regions").glob("*.yaml"))
                errors.append(
                    f"{field_}.region: no overlay {path.relative_to(root)} for {entry.region!r} "
                    f"(regions: {known})"
                )
            else:
                try:
                    overlay = load_overlay(path)
                except ConfigError as exc:
                    errors.append(f"{field_}.region: {exc}")
                if overlay is not None and overlay.admin is None:
                    errors.append(
                        f"{field_}.region: {path.relative_to(root)} has no `admin:` block "
                        "(url, token_file): the orchestrator cannot reach the region"
                    )
            plan_path = (root / entry.plan).resolve()
            plan = None
            if not plan_path.is_relative_to(rollouts):
                errors.append(f"{field_}.plan: {entry.plan} is not under {ROLLOUTS_DIR}/")
            elif not plan_path.is_file():
                errors.append(f"{field_}.plan: {entry.plan} does not exist")
            else:
                try:
                    plan = load_plan(plan_path)
                except ConfigError as exc:
                    errors.append(f"{field_}.plan: {exc}")
                if plan is None and not errors:
                    errors.append(f"{field_}.plan: {entry.plan} is empty")
            if overlay is None or overlay.admin is None or plan is None:
                continue
            parsed = RolloutPlan.model_validate(plan)
            targets.append(
                RegionTarget(
                    region=entry.region,
                    wave=i,
                    plan_file=entry.plan,
                    plan=plan,
                    plan_digest=parsed.digest(),
                    candidate=parsed.candidate,
                    url=overlay.admin.url.rstrip("/"),
                    token_file=overlay.admin.token_file,
                    dashboard_url=overlay.admin.dashboard_url,
                    overlay_file=path,
                )
            )
    if errors:
        raise WavesConfigError("\n".join(errors))
    return targets


# --------------------------------------------------------------------------------- state, lock


class WavesPhase(str, Enum):
    """Where the waves are. The last four are terminal."""

    RUNNING = "running"  # a wave's regions are rolling out
    BAKING = "baking"  # the current wave succeeded; waiting bake_s
    SUCCEEDED = "succeeded"  # every wave succeeded and baked
    HALTED = "halted"  # a region failed, on_failure: halt
    ROLLED_BACK = "rolled_back"  # a region failed, on_failure: rollback_all
    ABORTED = "aborted"  # `rollout waves abort`

    @property
    def terminal(self) -> bool:
        return self in (self.SUCCEEDED, self.HALTED, self.ROLLED_BACK, self.ABORTED)


class WavesError(Exception):
    """The orchestrator cannot go on."""


class WavesLocked(WavesError):
    """Another orchestrator holds the waves' lock."""


def _atomic_write(path: Path, data: Mapping[str, Any]) -> None:
    """Write JSON to a temp file in the same directory, fsync, rename over `path`: a reader
    (or a restart after a crash) sees the old file or the new one, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def read_state(state_dir: Path, name: str) -> dict[str, Any] | None:
    path = state_dir / f"{name}.state.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise WavesError(f"{path}: unreadable state: {exc}") from None
    if not isinstance(data, dict) or data.get("schema") != STATE_SCHEMA:
        raise WavesError(f"{path}: not a waves state (schema {STATE_SCHEMA})")
    return data


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


class WavesLock:
    """An exclusive lock file (`O_CREAT | O_EXCL`) holding the holder's pid and host.

    A lock left by a process that is gone (same host, pid not running) is stale and taken
    over; a lock from another host cannot be checked from here and is refused (remove the file
    once you know its holder is gone)."""

    def __init__(self, path: Path, *, pid: int | None = None, host: str | None = None) -> None:
        self.path = path
        self.pid = os.getpid() if pid is None else pid
        self.host = host or socket.gethostname()
        self.held = False

    def holder(self) -> dict[str, Any] | None:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {"pid": None, "host": None}
        return data if isinstance(data, dict) else {"pid": None, "host": None}

    def stale(self, holder: Mapping[str, Any]) -> bool:
        pid = holder.get("pid")
        return holder.get("host") == self.host and isinstance(pid, int) and not _pid_alive(pid)

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self.holder()
                if holder is None:
                    continue  # released meanwhile
                if self.stale(holder):
                    # Rename, then unlink: of two processes taking over the same stale lock,
                    # only one rename succeeds.
                    grave = self.path.with_name(f"{self.path.name}.stale.{uuid.uuid4().hex}")
                    with contextlib.suppress(FileNotFoundError):
                        os.rename(self.path, grave)
                        os.unlink(grave)
                    continue
                raise WavesLocked(
                    f"{self.path}: held by pid {holder.get('pid')} on {holder.get('host')} "
                    f"since {holder.get('since')}; another orchestrator runs these waves"
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump({"pid": self.pid, "host": self.host, "since": time.time()}, f)
            self.held = True
            return
        raise WavesLocked(f"{self.path}: could not take the lock")

    def release(self) -> None:
        if self.held:
            holder = self.holder()
            if holder and holder.get("pid") == self.pid and holder.get("host") == self.host:
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
            self.held = False

    def __enter__(self) -> WavesLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


# --------------------------------------------------------------------------------- regions


_HTTP: list[httpx.Client] = []


def _http() -> httpx.Client:
    """One client for the process: building one (its TLS context) costs ~70 ms, a pooled
    request to a region ~1 ms, and a poll reads every region of a wave."""
    if not _HTTP:
        _HTTP.append(httpx.Client())
    return _HTTP[0]


class RegionUnreachable(Exception):
    """A region's admin API or dashboard did not answer usefully."""


def region_reading(status: Mapping[str, Any], candidate: str | None = None) -> dict[str, Any]:
    """The part of a region's `GET /admin/rollout` that goes into a decision's record."""
    raw = status.get("versions")
    versions: Mapping[str, Any] = raw if isinstance(raw, Mapping) else {}
    cand = candidate or status.get("candidate")
    stats = versions.get(cand) if isinstance(cand, str) else None
    return {
        "phase": status.get("phase"),
        "plan_digest": status.get("plan_digest"),
        "candidate": status.get("candidate"),
        "stable": status.get("stable"),
        "step": status.get("step"),
        "step_index": status.get("step_index"),
        "weights": status.get("weights"),
        "candidate_requests": stats.get("requests") if isinstance(stats, Mapping) else None,
        "candidate_error_rate": stats.get("error_rate") if isinstance(stats, Mapping) else None,
        "message": status.get("message"),
    }


class RegionClient:
    """One region's admin API (and dashboard, for declarations)."""

    def __init__(self, target: RegionTarget, timeout_s: float) -> None:
        self.target = target
        self.timeout_s = timeout_s

    def _token(self) -> str | None:
        from app.serving.auth import load_admin_token

        path = os.path.expanduser(self.target.token_file)
        try:
            return load_admin_token({"ROLLOUT_ADMIN_TOKEN_FILE": path})
        except ConfigError as exc:
            raise RegionUnreachable(f"admin token: {exc}") from None

    def _admin(
        self,
        method: str,
        path: str,
        body: Mapping[str, Any] | None = None,
        timeout_s: float | None = None,
        key: str | None = None,
    ) -> dict[str, Any]:
        token = self._token()
        headers = {"accept": "application/json", "x-rollout-actor": _actor()}
        if key is not None:
            headers[IDEMPOTENCY_HEADER] = key
        if token:
            headers["authorization"] = f"Bearer {token}"
        url = f"{self.target.url}{path}"
        try:
            response = _http().request(
                method, url, headers=headers, json=None if body is None else dict(body),
                timeout=self.timeout_s if timeout_s is None else timeout_s,
            )  # fmt: skip
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise RegionUnreachable(f"{method} {url}: {type(exc).__name__}: {exc}") from None
        if response.status_code == 409:
            raise RegionRefused(f"{method} {url}: refused: {error_detail(response)}")
        if response.status_code != 200:
            raise RegionUnreachable(
                f"{method} {url}: HTTP {response.status_code}: {error_detail(response)}"
            )
        try:
            data = response.json()
        except ValueError:
            raise RegionUnreachable(f"{method} {url}: the answer is not JSON") from None
        if not isinstance(data, dict):
            raise RegionUnreachable(f"{method} {url}: expected a JSON object")
        return data

    def status(self) -> dict[str, Any]:
        return self._admin("GET", ADMIN_PATH)

    def command(self, name: str) -> dict[str, Any]:
        # A fresh key per command: one the region's ingress re-sends is applied once.
        return self._admin("POST", f"{ADMIN_PATH}/{name}", key=uuid.uuid4().hex)

    def publish_waves(
        self, document: Mapping[str, Any], timeout_s: float = PUBLISH_TIMEOUT_S
    ) -> dict[str, Any]:
        """POST the waves state to the region (`POST /admin/waves`), with a short timeout."""
        return self._admin("POST", WAVES_PATH, document, min(self.timeout_s, timeout_s))

    def end_reason(self, phase: str) -> str | None:
        """Why the region's rollout reached `phase`: its last such history event's reason
        (the status's `message` says what the controller last did, not why it ended)."""
        try:
            events = self._admin("GET", f"{ADMIN_PATH}/history").get("events")
        except RegionUnreachable:
            return None
        if not isinstance(events, list):
            return None
        for event in reversed(events):
            if isinstance(event, dict) and event.get("to_phase") == phase and event.get("reason"):
                return str(event["reason"])
        return None

    def deploy(self, config: Mapping[str, Any]) -> None:
        """PUT the region's whole serve config to its dashboard, as `serve deploy` does."""
        if self.target.dashboard_url is None:
            raise WavesError(
                f"region {self.target.region}: its overlay ({self.target.overlay_file}) has no "
                "admin.dashboard_url, so the orchestrator cannot declare a plan there"
            )
        url = f"{self.target.dashboard_url.rstrip('/')}{DEPLOY_PATH}"
        try:
            response = _http().put(url, json=dict(config), timeout=max(self.timeout_s, 30.0))
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise RegionUnreachable(f"PUT {url}: {type(exc).__name__}: {exc}") from None
        if response.status_code != 200:
            raise RegionUnreachable(
                f"PUT {url}: HTTP {response.status_code}: {error_detail(response)}"
            )


class RegionRefused(RegionUnreachable):
    """The region answered 409: the command does not fit its rollout's phase."""


def _actor() -> str:
    return os.environ.get("ROLLOUT_ACTOR") or f"rollout-waves@{socket.gethostname()}"


class WavesPublisher:
    """Posts the waves state to every region in the background, so a slow or dead region never
    holds a tick: one post in flight per region at a time, the latest document wins (one
    published while a post is on the way replaces any not yet sent), no retry (the next
    publish is the retry). A failure is logged when a region's error changes, not every time."""

    def __init__(self, clients: Mapping[str, RegionClient], log: Callable[[str], None]) -> None:
        self.clients = dict(clients)
        self.log = log
        self.timeout_s = PUBLISH_TIMEOUT_S  # per post
        self._lock = threading.Lock()
        self._pending: dict[str, dict[str, Any]] = {}
        self._busy: dict[str, concurrent.futures.Future[None]] = {}
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None
        self.errors: dict[str, str | None] = {}  # region -> its last publish error (None: ok)
        self.sent: dict[str, int] = {}  # region -> posts it accepted

    def publish(self, document: Mapping[str, Any]) -> None:
        """Queue `document` for every region; returns at once."""
        with self._lock:
            if self._pool is None:
                workers = max(1, min(8, len(self.clients)))
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    workers, thread_name_prefix="waves-publish"
                )
            for region in self.clients:
                self._pending[region] = dict(document)
                if region not in self._busy:
                    self._busy[region] = self._pool.submit(self._drain, region)

    def _drain(self, region: str) -> None:
        while True:
            with self._lock:
                document = self._pending.pop(region, None)
                if document is None:
                    del self._busy[region]
                    return
            try:
                self.clients[region].publish_waves(document, self.timeout_s)
            except Exception as exc:  # RegionUnreachable, a bug: logged, never raised
                error = str(exc)[:300]
                if self.errors.get(region) != error:
                    self.log(f"could not publish the waves state to {region}: {error}")
                self.errors[region] = error
                continue
            if self.errors.get(region):
                self.log(f"publishing the waves state to {region} works again")
            self.errors[region] = None
            self.sent[region] = self.sent.get(region, 0) + 1

    def wait(self, timeout_s: float | None = None, regions: Iterable[str] | None = None) -> bool:
        """Wait until nothing is queued or on the way to `regions` (default: all) (tests, and
        before the process exits); True if it all went out (or failed) within `timeout_s`."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        names = None if regions is None else set(regions)
        while True:
            with self._lock:
                futures = [f for r, f in self._busy.items() if names is None or r in names]
            if not futures:
                return True
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            concurrent.futures.wait(futures, left)


def _text(value: Any) -> str | None:
    """A string for the waves document: at most MAX_TEXT characters (the regions refuse more)."""
    if value is None:
        return None
    text = str(value)
    return text if len(text) <= MAX_TEXT else text[: MAX_TEXT - 1] + "…"


def _weights(value: Any) -> dict[str, float] | None:
    if not isinstance(value, Mapping):
        return None
    weights: dict[str, float] = {}
    for version, weight in list(value.items())[:64]:
        if isinstance(weight, (int, float)) and not isinstance(weight, bool):
            if math.isfinite(weight) and 0 <= weight <= 100:
                weights[str(version)[:MAX_TEXT]] = float(weight)
    return weights


# --------------------------------------------------------------------------------- the runner

LIVE_PHASES = frozenset({"idle", "progressing", "paused", "promoting"})
FAILED_PHASES = frozenset({"rolled_back", "aborted"})
COMMANDS = ("pause", "resume", "promote", "abort")


@dataclass
class WavesRunner:
    """Runs one waves file: `tick()` once per poll until `done`. See the module docstring."""

    spec: WavesSpec
    targets: list[RegionTarget]
    state_dir: Path
    root: Path
    clock: Callable[[], float] = time.time
    sleep: Callable[[float], None] = time.sleep
    log: Callable[[str], None] = lambda line: None
    state: dict[str, Any] = field(init=False)

    def __post_init__(self) -> None:
        self.state_path = self.state_dir / f"{self.spec.name}.state.json"
        self.lock = WavesLock(self.state_dir / f"{self.spec.name}.lock")
        self.inbox = self.state_dir / f"{self.spec.name}.inbox"
        self.clients = {
            t.region: RegionClient(t, self.spec.request_timeout_s) for t in self.targets
        }
        self.by_region = {t.region: t for t in self.targets}
        self.publisher = WavesPublisher(self.clients, self.log)
        self._published: dict[str, Any] | None = None  # the last document, less published_at
        self._published_at = -math.inf
        self.state = read_state(self.state_dir, self.spec.name) or self._new_state()
        if self.state.get("name") != self.spec.name:
            raise WavesError(f"{self.state_path}: holds waves {self.state.get('name')!r}")
        missing = set(self.by_region) - set(self.state["regions"])
        if missing or self.state.get("spec_digest") != self._spec_digest():
            if self.state["wave"] > 0 or any(
                r["status"] != "pending" for r in self.state["regions"].values()
            ):
                raise WavesError(
                    f"{self.state_path}: the waves file changed since these waves started; "
                    "finish or abort them first, or use a new name"
                )
            self.state = self._new_state()

    # -- state --------------------------------------------------------------------------------

    def _spec_digest(self) -> str:
        from app.config import config_hash

        return config_hash({
            "spec": self.spec.model_dump(mode="json"),
            "plans": {t.region: t.plan_digest for t in self.targets},
        })  # fmt: skip

    def _new_state(self) -> dict[str, Any]:
        now = self.clock()
        return {
            "schema": STATE_SCHEMA,
            "name": self.spec.name,
            "spec_digest": self._spec_digest(),
            "on_failure": self.spec.on_failure,
            "phase": WavesPhase.RUNNING.value,
            "wave": 0,
            "waves_total": len(self.spec.waves),
            "waves_completed": 0,
            "paused": False,
            "paused_since": None,
            "bake": None,
            "reason": None,
            "halted_at_region": None,
            "failure_detected_at": None,
            "started_at": now,
            "updated_at": now,
            "regions": {
                t.region: {
                    "wave": t.wave,
                    "plan": t.plan_file,
                    "plan_digest": t.plan_digest,
                    "status": "pending",
                    "phase": None,
                    "reading": None,
                    "error": None,
                    "last_seen_at": None,
                    "started_at": None,
                }
                for t in self.targets
            },  # fmt: skip
            "history": [],
        }

    def save(self) -> None:
        self.state["updated_at"] = self.clock()
        _atomic_write(self.state_path, self.state)

    @property
    def phase(self) -> WavesPhase:
        return WavesPhase(self.state["phase"])

    @property
    def done(self) -> bool:
        return self.phase.terminal

    def _record(self, decision: str, regions: list[str] | None = None, **extra: Any) -> None:
        names = regions if regions is not None else list(self.state["regions"])
        entry = {
            "time": self.clock(),
            "wave": self.state["wave"],
            "decision": decision,
            "readings": {
                r: {
                    "status": self.state["regions"][r]["status"],
                    "error": self.state["regions"][r]["error"],
                    **(self.state["regions"][r]["reading"] or {}),
                }
                for r in names
            },
            **extra,
        }
        history = self.state["history"]
        history.append(entry)
        del history[:-HISTORY_LIMIT]
        self.log(f"wave {self.state['wave'] + 1}: {decision}")

    # -- commands -----------------------------------------------------------------------------

    def _take_inbox(self) -> list[dict[str, Any]]:
        if not self.inbox.is_dir():
            return []
        commands = []
        for path in sorted(self.inbox.glob("*.json")):
            with contextlib.suppress(OSError, ValueError):
                data = json.loads(path.read_text())
                if isinstance(data, dict) and data.get("command") in COMMANDS:
                    commands.append(data)
            with contextlib.suppress(OSError):
                path.unlink()
        return commands

    def apply_command(self, name: str, actor: str = "") -> str:
        """pause / resume / promote / abort, applied to the state (the caller persists)."""
        now = self.clock()
        by = f" (by {actor})" if actor else ""
        if self.done:
            return f"the waves already ended: {self.phase.value}"
        if name == "pause":
            if not self.state["paused"]:
                self.state["paused"], self.state["paused_since"] = True, now
            self._record(f"paused{by}: no region starts and the bake clock stops", [])
            return "paused"
        if name in ("resume", "promote"):
            if self.state["paused"]:
                self._unpause(now)
            if name == "promote" and self.state["bake"] is not None:
                self.state["bake"]["skipped"] = True
                self._record(f"bake skipped{by}", [])
            else:
                self._record(f"resumed{by}", [])
            return name + "d"
        if name == "abort":
            self._record(f"abort{by}: every region of this rollout goes back to stable")
            self._rollback_all(WavesPhase.ABORTED, f"aborted{by}")
            return "aborted"
        raise WavesError(f"unknown command {name!r}; commands: {COMMANDS}")

    def _unpause(self, now: float) -> None:
        bake = self.state["bake"]
        if bake is not None and self.state["paused_since"] is not None:
            bake["paused_s"] += max(0.0, now - self.state["paused_since"])
        self.state["paused"], self.state["paused_since"] = False, None

    # -- reading regions ----------------------------------------------------------------------

    def _read(self, region: str) -> dict[str, Any] | None:
        """Read a region; update its record. None when unreachable."""
        record = self.state["regions"][region]
        target = self.by_region[region]
        try:
            status = self.clients[region].status()
        except RegionUnreachable as exc:
            if record["status"] not in ("pending", "rolled_back"):
                if record["status"] != "unreachable":
                    record["was"] = record["status"]
                record["status"] = "unreachable"
            record["error"] = str(exc)
            return None
        record["error"] = None
        record["last_seen_at"] = self.clock()
        record["reading"] = region_reading(status, target.candidate)
        record["phase"] = status.get("phase")
        if record["status"] == "unreachable":
            record["status"] = record.pop("was", "running")
        return status

    def _classify(self, region: str, status: Mapping[str, Any]) -> None:
        """Move a started region's status from what its controller says."""
        record = self.state["regions"][region]
        if record["status"] in ("pending", "rolled_back"):
            return
        if status.get("plan_digest") != record["plan_digest"]:
            if record["status"] in ("succeeded", "running"):
                # It ran our plan, and now runs another (or none): someone redeclared it.
                record["status"] = "failed"
                record["error"] = f"the region now runs plan {status.get('plan_digest')}"
            return  # starting: the declaration has not reached the controller yet
        phase = status.get("phase")
        if (
            record["status"] == "starting"
            and phase in FAILED_PHASES | {"succeeded"}
            and record.get("prior_digest") == record["plan_digest"]
            and record.get("sent") != "start"
        ):
            return  # an earlier run of this plan, which the start has not replaced yet
        if phase == "succeeded":
            record["status"] = "succeeded"
        elif phase in FAILED_PHASES:
            record["status"] = "failed"
            record["error"] = str(status.get("message") or f"rollout {phase}")
        elif phase in LIVE_PHASES:
            record["status"] = "running"

    # -- actions ------------------------------------------------------------------------------

    def _start_region(self, region: str, status: Mapping[str, Any] | None) -> None:
        """Declare the region's plan (or start it, if declared already). Idempotent: a
        declaration already there is not sent again; a start is sent only when the declared
        plan's rollout has ended."""
        record = self.state["regions"][region]
        target = self.by_region[region]
        if status is None:
            return
        if status.get("plan_digest") == target.plan_digest and status.get("phase") in LIVE_PHASES:
            record["status"] = "running"  # declared already (a restart, or by hand): adopt it
            return
        if record["status"] == "pending":
            record["status"], record["started_at"] = "starting", self.clock()
            # What ran there before: seeing our digest later means our declaration landed
            # (unless it was there already, then a start is needed).
            record["prior_digest"] = status.get("plan_digest")
            self._record(f"start {region}: plan {target.plan_file}", [region])
            self.save()  # before acting: a restart repeats the action, never loses it
        try:
            if status.get("plan_digest") == target.plan_digest:
                if record.get("prior_digest") == target.plan_digest and not record.get("sent"):
                    answer = self.clients[region].command("start")
                    record["sent"] = "start"
                    if answer.get("phase") in LIVE_PHASES:
                        record["status"] = "running"
            elif not record.get("sent"):
                self.clients[region].deploy(self._region_config(target, target.plan))
                record["sent"] = "declare"
        except RegionRefused as exc:
            record["error"] = str(exc)
        except RegionUnreachable as exc:
            record["error"] = str(exc)
            record["sent"] = None  # try again on the next tick

    def _region_config(self, target: RegionTarget, plan: dict[str, Any] | None) -> dict[str, Any]:
        from app.ops.declare import declare_plan
        from app.ops.overlay import load_overlay, render

        base = load_yaml(self.root / self.spec.serve_config)
        return declare_plan(render(base, load_overlay(target.overlay_file)), plan)

    def _rollback_region(self, region: str) -> None:
        record = self.state["regions"][region]
        if record["status"] in ("pending", "rolled_back"):
            return
        target = self.by_region[region]
        status = self._read(region)
        try:
            if status is None:
                raise RegionUnreachable(record["error"] or "unreachable")
            if (
                status.get("plan_digest") == target.plan_digest
                and status.get("phase") in LIVE_PHASES
            ):
                self.clients[region].command("abort")
            elif (
                status.get("plan_digest") == target.plan_digest
                and status.get("phase") == "succeeded"
            ):
                # A finished rollout cannot be aborted: declare no plan, so the routers follow
                # the region config's declared weights (its stable version) again.
                self.clients[region].deploy(self._region_config(target, None))
            record["status"] = "rolled_back"
            record["error"] = None
        except (RegionUnreachable, WavesError) as exc:
            record["error"] = f"rollback: {exc}"
            record["rollback_pending"] = True

    def _rollback_all(self, phase: WavesPhase, reason: str) -> None:
        for region in self.state["regions"]:
            self._rollback_region(region)
        self.state["phase"], self.state["reason"] = phase.value, reason
        self.state["bake"] = None
        pending = [r for r, rec in self.state["regions"].items() if rec.get("rollback_pending")]
        self._record(
            f"{phase.value}: {reason}"
            + (f"; could not roll back {pending} yet (retried each tick)" if pending else "")
        )

    # -- the reconcile ------------------------------------------------------------------------

    def tick(self) -> WavesPhase:
        """Read, decide, act, persist, then tell the regions if anything changed. Safe to repeat."""
        phase = self._reconcile()
        self.publish_state()
        return phase

    def _reconcile(self) -> WavesPhase:
        for command in self._take_inbox():
            self.apply_command(command["command"], str(command.get("actor") or ""))
        if self.done:
            self._retry_rollbacks()
            self.save()
            return self.phase
        wave_index = self.state["wave"]
        wave = self.spec.waves[wave_index]
        names = [entry.region for entry in wave.regions]
        statuses = {name: self._read(name) for name in names}
        for name, status in statuses.items():
            if status is not None:
                self._classify(name, status)
        failed = [n for n in names if self.state["regions"][n]["status"] == "failed"]
        if self.phase is WavesPhase.BAKING:
            for n in names:  # a baking region must stay succeeded (or be unreadable for now)
                record = self.state["regions"][n]
                if record["status"] not in ("succeeded", "unreachable", "failed"):
                    record["error"] = f"left succeeded during the bake: {record['phase']}"
                    record["status"] = "failed"
                    failed.append(n)
        if failed:
            self._fail(failed)
            self.save()
            return self.phase
        unreachable = [n for n in names if statuses[n] is None]
        reason = (
            f"unreachable: {', '.join(unreachable)} (paused, not passed)" if unreachable else None
        )
        if reason != self.state["reason"]:
            self.state["reason"] = reason
            self._record(reason or "all regions of the wave answer again", names)
        if self.phase is WavesPhase.RUNNING:
            if not self.state["paused"]:
                for name in names:
                    if self.state["regions"][name]["status"] in ("pending", "starting"):
                        self._start_region(name, statuses[name])
            if all(self.state["regions"][n]["status"] == "succeeded" for n in names):
                self.state["phase"] = WavesPhase.BAKING.value
                self.state["bake"] = {"started_at": self.clock(), "bake_s": wave.bake_s,
                                      "paused_s": 0.0, "skipped": False}  # fmt: skip
                self._record(f"wave {wave_index + 1} succeeded; bake {wave.bake_s:g}s", names)
        if self.phase is WavesPhase.BAKING and not unreachable and not self.state["paused"]:
            if self.bake_remaining_s() <= 0:
                self._next_wave(names)
        self.save()
        return self.phase

    # -- publishing to the regions ------------------------------------------------------------

    def waves_document(self) -> dict[str, Any]:
        """The whole waves state as every region shows it (`status["waves"]`, less the region's
        `received_at`): app/config/waves.py `WavesDocument` is its schema."""
        state, phase = self.state, self.phase
        current = int(state["wave"])
        paused = bool(state["paused"]) and not phase.terminal
        current_state = {
            WavesPhase.RUNNING: "running", WavesPhase.BAKING: "baking",
            WavesPhase.SUCCEEDED: "succeeded", WavesPhase.HALTED: "failed",
            WavesPhase.ROLLED_BACK: "rolled_back", WavesPhase.ABORTED: "aborted",
        }[phase]  # fmt: skip
        waves = []
        for index, wave in enumerate(self.spec.waves):
            regions = [self._region_document(entry.region) for entry in wave.regions]
            rolled_back = any(r["state"] == "rolled_back" for r in regions)
            if index < current:
                wave_state = "rolled_back" if rolled_back else "succeeded"
            elif index > current:
                wave_state = "pending"
            else:
                wave_state = "paused" if paused else current_state
            waves.append({"index": index, "state": wave_state, "regions": regions,
                          "bake_until": self._bake_until() if index == current else None})  # fmt: skip
        return {
            "name": self.spec.name,
            "published_at": self.clock(),
            "on_failure": self.spec.on_failure,
            "phase": "paused" if paused else phase.value,
            "current_wave": current,
            "waves": waves,
        }

    def _region_document(self, region: str) -> dict[str, Any]:
        record = self.state["regions"][region]
        reading = record.get("reading") or {}
        return {
            "region": _text(region),
            "state": record["status"],
            "phase": _text(record.get("phase")),
            "step": _text(reading.get("step")),
            "weights": _weights(reading.get("weights")),
            "reason": _text(record.get("error")),
        }

    def _bake_until(self) -> float | None:
        """When the current bake ends on the orchestrator's clock (None: not baking); while
        paused it moves on with the clock, as a pause does not count."""
        bake = self.state["bake"]
        if self.phase is not WavesPhase.BAKING or bake is None or bake.get("skipped"):
            return None
        paused = bake["paused_s"]
        if self.state["paused"] and self.state["paused_since"] is not None:
            paused += max(0.0, self.clock() - self.state["paused_since"])
        return float(bake["started_at"] + bake["bake_s"] + paused)

    def publish_state(self, *, force: bool = False) -> bool:
        """Publish the waves state to every region if it changed since the last publish, or
        `PUBLISH_EVERY_S` passed while the waves run (or `force`). Never raises, never waits
        for a region. True if a publish was queued."""
        try:
            document = self.waves_document()
            same = {k: v for k, v in document.items() if k != "published_at"}
            due = not self.done and document["published_at"] - self._published_at >= PUBLISH_EVERY_S
            if not (force or due or same != self._published):
                return False
            self._published, self._published_at = same, document["published_at"]
            self.publisher.publish(document)
            return True
        except Exception as exc:  # the regions' pages are not worth a tick
            self.log(f"could not publish the waves state: {type(exc).__name__}: {exc}")
            return False

    def bake_remaining_s(self) -> float:
        """Seconds of the current bake left (wall clock; paused time does not count)."""
        bake = self.state["bake"]
        if bake is None:
            return 0.0
        if bake.get("skipped"):
            return 0.0
        now = self.clock()
        paused = bake["paused_s"]
        if self.state["paused"] and self.state["paused_since"] is not None:
            paused += max(0.0, now - self.state["paused_since"])
        return max(0.0, bake["bake_s"] - (now - bake["started_at"] - paused))

    def _next_wave(self, names: list[str]) -> None:
        self.state["waves_completed"] = self.state["wave"] + 1
        self.state["bake"] = None
        if self.state["wave"] + 1 >= len(self.spec.waves):
            self.state["phase"] = WavesPhase.SUCCEEDED.value
            self._record("every wave succeeded", names)
            return
        self.state["wave"] += 1
        self.state["phase"] = WavesPhase.RUNNING.value
        self._record(f"bake done; wave {self.state['wave'] + 1} starts", names)

    def _fail(self, failed: list[str]) -> None:
        self.state["halted_at_region"] = failed[0]
        self.state["failure_detected_at"] = self.clock()
        for region in failed:
            record = self.state["regions"][region]
            if record["phase"] in FAILED_PHASES:
                reason = self.clients[region].end_reason(record["phase"])
                if reason:
                    record["error"] = reason
        errors = "; ".join(f"{r}: {self.state['regions'][r]['error']}" for r in failed)
        if self.spec.on_failure == "halt":
            self.state["phase"], self.state["reason"] = WavesPhase.HALTED.value, errors
            self.state["bake"] = None
            self._record(f"halted: {errors}; no later wave starts")
        else:
            self._rollback_all(WavesPhase.ROLLED_BACK, f"rollback_all after {errors}")

    def _retry_rollbacks(self) -> None:
        for region, record in self.state["regions"].items():
            if record.pop("rollback_pending", False):
                self._rollback_region(region)
                if record["status"] == "rolled_back":
                    self._record(f"rolled back {region}", [region])

    def run(self, *, max_ticks: int | None = None) -> WavesPhase:
        """Tick until the waves end (or `max_ticks`), holding the lock."""
        with self.lock:
            ticks = 0
            while True:
                phase = self.tick()
                ticks += 1
                if phase.terminal or (max_ticks is not None and ticks >= max_ticks):
                    # The last state reaches the regions before the process exits (bounded).
                    self.publisher.wait(PUBLISH_TIMEOUT_S * 2)
                    return phase
                self.sleep(self.spec.poll_interval_s)


def send_command(runner: WavesRunner, name: str, actor: str) -> str:
    """A command for the waves: applied now when no orchestrator runs them (this process takes
    the lock and runs one tick), else left in the running one's inbox for its next tick."""
    if name not in COMMANDS:
        raise WavesError(f"unknown command {name!r}; commands: {COMMANDS}")
    try:
        runner.lock.acquire()
    except WavesLocked:
        runner.inbox.mkdir(parents=True, exist_ok=True)
        data = {"command": name, "actor": actor, "time": runner.clock()}
        _atomic_write(runner.inbox / f"{time.time_ns()}-{uuid.uuid4().hex[:8]}.json", data)
        holder = runner.lock.holder() or {}
        return (f"{name}: queued for the running orchestrator (pid {holder.get('pid')} on "
                f"{holder.get('host')}); it applies it on its next poll")  # fmt: skip
    try:
        result = runner.apply_command(name, actor)
        runner.save()
        runner.publish_state(force=True)
        runner.publisher.wait(PUBLISH_TIMEOUT_S * 2)
        return f"{name}: {result}"
    finally:
        runner.lock.release()
