"""Traffic capture: a bounded, opt-in sample of live V2 infer requests, one JSON line each.

A later load stage replays the sample against a candidate, so a record is exactly what a
replayer needs and nothing about who sent it:

    {"model":"recommender","version":"v1","captured_at":1765004400.123,"request":{"inputs":[...]}}

`request` is a V2 infer request body in the JSON form (binary tensors are turned into JSON
`data`), without `id`, `model_name`, `model_version`, the routing-key parameter, and the fields
the settings drop; hashed fields hold an HMAC-SHA256 hex digest instead of their value. Headers
(routing key, auth, pin) and the client's address are never handed to the capturer at all.

Where it goes: `{directory}/{model}/{host}-{pid}-{n}.jsonl`. Each writer (one per Router
replica) appends to its own file and opens the next one at `max_file_bytes`; whoever opens a
file then deletes the oldest files of the model (by modification time, any writer's, imported
ones too) until `max_files` remain, so the model's directory holds at most `max_files` files of
at most `max_file_bytes` each (plus, for a moment, a file another writer still has open after
it was deleted: that writer notices and starts a new one).

How it stays off the request path: `Capturer.offer` decides in O(1) (a coin flip against
`sample_rate`, the body's length against `max_record_bytes`, a token bucket of
`max_records_per_s`) and puts the raw body on a bounded queue; one background thread parses,
redacts, encodes and writes. A full queue drops the record; nothing here raises into the
caller. Every outcome is counted (`Capturer.counters`, for the Router's `/status`).

Reading back: `iter_sample` yields the records of a model's directory, oldest file first, and
skips (and counts) lines that are not valid records: a line torn by a crash, or one being written.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import os
import queue
import random
import re
import socket
import threading
from collections import Counter
from collections.abc import Collection, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from app.adapters.base import NUMPY_DTYPES, TensorSpec
from app.config._base import NAME_PATTERN
from app.config.router import CaptureSettings
from app.errors import ConfigError, InvalidInput
from app.serving.auth import load_admin_token
from app.serving.protocol import RawRequest, check_request, decode_body

__all__ = [
    "RECORD_FIELDS",
    "SALT_ENV",
    "SALT_FILE_ENV",
    "CaptureRecord",
    "CaptureSettings",
    "Capturer",
    "RecordError",
    "SampleStats",
    "check_request_document",
    "decode_record_request",
    "iter_sample",
    "load_capture_salt",
    "model_directory",
    "parse_line",
    "parse_record",
    "redact_request",
    "write_sample",
]

SALT_ENV = "ROLLOUT_CAPTURE_SALT"
SALT_FILE_ENV = "ROLLOUT_CAPTURE_SALT_FILE"
RECORD_FIELDS = ("model", "version", "captured_at", "request")
# Request fields a replayer must not send as captured: `id` may be a client's trace id, and
# the path (the replayer's target) decides the model and version, never the body.
_STRIPPED_REQUEST_FIELDS = ("id", "model_name", "model_version")
_NAME = re.compile(NAME_PATTERN)
_HOST_CHARS = re.compile(r"[^A-Za-z0-9_.-]")
_LATEST_CAPTURE = 1e11  # Unix seconds, about the year 5100: anything later is not a time
_BATCH = 256  # records the writer takes off the queue per write
_STOP = object()


# ----------------------------------------------------------------------------- settings


def load_capture_salt(env: Mapping[str, str] | None = None) -> bytes | None:
    """The key of hashed fields: ROLLOUT_CAPTURE_SALT, or the file named by
    ROLLOUT_CAPTURE_SALT_FILE (the admin token's rules: at least 16 characters, no whitespace;
    an unreadable file is a ConfigError). None when neither is set. The same salt on every
    Router replica keeps equal values equal across the whole sample."""
    salt = load_admin_token(env, token_env=SALT_ENV, file_env=SALT_FILE_ENV)
    return None if salt is None else salt.encode("utf-8")


# ----------------------------------------------------------------------------- records


class RecordError(ValueError):
    """A line is not a capture record; the message names the field."""


@dataclass(frozen=True)
class CaptureRecord:
    """One captured (or imported) request: what served it, when, and the V2 body."""

    model: str
    version: str
    captured_at: float
    request: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "version": self.version,
            "captured_at": self.captured_at,
            "request": self.request,
        }

    def to_line(self) -> bytes:
        """The record as one JSON line (compact, UTF-8, newline-terminated)."""
        text = json.dumps(
            self.to_json(), separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )
        return text.encode("utf-8") + b"\n"


def _canonical(value: Any) -> bytes:
    return json.dumps(
        value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8", "surrogatepass")


def _digest(value: Any, salt: bytes) -> str:
    return hmac.new(salt, _canonical(value), hashlib.sha256).hexdigest()


def redact_request(
    document: Mapping[str, Any],
    *,
    drop: Collection[str] = (),
    hash_: Collection[str] = (),
    salt: bytes = b"",
    identity: Collection[str] = (),
) -> dict[str, Any]:
    """A copy of a V2 request body fit to store: without `id`, `model_name`, `model_version`,
    the `identity` parameters (the routing key) and the `drop` fields; with each `hash_` field's
    value replaced by its HMAC-SHA256 hex digest (keyed by `salt`) of its canonical JSON.

    A field name matches an input tensor's `name` and a request `parameters` key. A hashed BYTES
    tensor keeps its shape and datatype, each element replaced by its digest, so the request
    still fits a text model; a tensor of any other datatype cannot hold a digest and is
    dropped instead. The input is never modified."""
    out: dict[str, Any] = {
        k: v for k, v in document.items() if k not in _STRIPPED_REQUEST_FIELDS
    }  # in the body's own order; inputs and parameters are replaced below
    inputs = document.get("inputs")
    if isinstance(inputs, list):
        kept = []
        for tensor in inputs:
            name = tensor.get("name") if isinstance(tensor, dict) else None
            name = name if isinstance(name, str) else None
            if name in drop:
                continue
            if name in hash_:
                assert isinstance(tensor, dict)
                if tensor.get("datatype") != "BYTES" or "data" not in tensor:
                    continue
                tensor = {**tensor, "data": _hash_elements(tensor["data"], salt)}
            kept.append(tensor)
        out["inputs"] = kept
    parameters = document.get("parameters")
    if isinstance(parameters, dict):
        params = {}
        for key, value in parameters.items():
            if key in drop or key in identity:
                continue
            params[key] = _digest(value, salt) if key in hash_ else value
        if params:
            out["parameters"] = params
        else:
            out.pop("parameters", None)
    return out


def _hash_elements(data: Any, salt: bytes) -> Any:
    if isinstance(data, list):
        return [_hash_elements(item, salt) for item in data]
    return _digest(data, salt)


def _datatypes() -> str:
    return ", ".join(NUMPY_DTYPES)


def _own_specs(document: Mapping[str, Any]) -> tuple[list[TensorSpec], list[TensorSpec]]:
    """Tensor specs taken from the request itself (a sample is read without the model's
    config): each input's declared datatype and exact shape, and the outputs it names."""
    inputs = document.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise RecordError("inputs must be a non-empty list of tensors")
    specs = []
    for index, tensor in enumerate(inputs):
        if not isinstance(tensor, dict):
            raise RecordError(f"inputs[{index}] must be an object")
        name = tensor.get("name")
        if not isinstance(name, str):
            raise RecordError(f"inputs[{index}].name must be a string")
        datatype = tensor.get("datatype")
        if not isinstance(datatype, str) or datatype not in NUMPY_DTYPES:
            raise RecordError(
                f"inputs[{index}] (input {name!r}).datatype must be one of {_datatypes()}, "
                f"got {datatype!r}"
            )
        shape = tensor.get("shape")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise RecordError(
                f"inputs[{index}] (input {name!r}).shape must be a list of non-negative "
                f"integers, got {shape!r}"
            )
        specs.append(TensorSpec(name=name, datatype=datatype, shape=tuple(shape)))  # type: ignore[arg-type]
    outputs = []
    raw_outputs = document.get("outputs")
    if isinstance(raw_outputs, list):
        for item in raw_outputs:
            if isinstance(item, dict) and isinstance(item.get("name"), str):
                outputs.append(TensorSpec(name=item["name"], datatype="BYTES", shape=(-1,)))
    return specs, outputs


def _checked(raw: RawRequest) -> dict[str, Any]:
    """Check a decoded request against its own specs; return its body in the JSON form (binary
    tensors inlined as JSON `data`). Raises RecordError naming the field."""
    specs, outputs = _own_specs(raw.document)
    try:
        parsed = check_request(raw, specs, outputs)
    except InvalidInput as exc:
        raise RecordError(str(exc)) from None
    except ValidationError as exc:  # a spec pydantic refuses (the checks above let none through)
        raise RecordError(str(exc).splitlines()[0]) from None
    document = dict(raw.document)
    inputs = []
    for tensor in document["inputs"]:
        params = tensor.get("parameters")
        if isinstance(params, dict) and "binary_data_size" in params:
            rest = {k: v for k, v in params.items() if k != "binary_data_size"}
            tensor = {k: v for k, v in tensor.items() if k != "parameters"}
            if rest:
                tensor["parameters"] = rest
            tensor["data"] = parsed.inputs[tensor["name"]].ravel().tolist()
        inputs.append(tensor)
    document["inputs"] = inputs
    return document


def check_request_document(document: Any) -> dict[str, Any]:
    """A stored `request` must be a V2 infer body in the JSON form; RecordError names the field."""
    if not isinstance(document, dict):
        raise RecordError("must be a JSON object (a V2 infer request body)")
    try:
        body = json.dumps(document, allow_nan=False).encode("utf-8")
        raw = decode_body(body, header_length=None)
    except InvalidInput as exc:
        raise RecordError(str(exc)) from None
    except (ValueError, UnicodeEncodeError, RecursionError) as exc:
        raise RecordError(f"not encodable as JSON: {exc}") from None
    return _checked(raw)


def decode_record_request(document: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A stored `request` as a version's `infer(inputs, parameters)` takes it, checked against
    its own tensors (a sample is read without the model's config; the version checks the
    rest). Raises RecordError or InvalidInput naming the field."""
    specs, outputs = _own_specs(document)
    raw = decode_body(json.dumps(document).encode(), header_length=None)
    parsed = check_request(raw, specs, outputs)
    return parsed.inputs, parsed.parameters


def _name(value: Any, field_name: str) -> str:
    if not isinstance(value, str) or not _NAME.fullmatch(value):
        raise RecordError(
            f"{field_name} must be a name like 'recommender' or 'v2' "
            f"(lowercase letters, digits, '_', '.', '-'), got {value!r}"
        )
    return value


def parse_record(obj: Any) -> CaptureRecord:
    """Check one decoded record; RecordError names the field that is wrong."""
    if not isinstance(obj, dict):
        raise RecordError(f"a record must be a JSON object with fields {', '.join(RECORD_FIELDS)}")
    unknown = sorted(str(k) for k in obj if k not in RECORD_FIELDS)
    if unknown:
        raise RecordError(f"unknown field(s) {unknown}; a record has {', '.join(RECORD_FIELDS)}")
    missing = [k for k in RECORD_FIELDS if k not in obj]
    if missing:
        raise RecordError(f"missing field(s) {missing}")
    model = _name(obj["model"], "model")
    version = _name(obj["version"], "version")
    at = obj["captured_at"]
    try:
        seconds = float(at) if isinstance(at, (int, float)) and not isinstance(at, bool) else -1.0
    except OverflowError:  # an integer too large for a float
        seconds = -1.0
    if not (math.isfinite(seconds) and 0 <= seconds <= _LATEST_CAPTURE):
        raise RecordError(
            f"captured_at must be Unix seconds (a number from 0 to {_LATEST_CAPTURE:.0f}), "
            f"got {str(at)[:40]}"
        )
    try:
        request = check_request_document(obj["request"])
    except RecordError as exc:
        raise RecordError(f"request: {exc}") from None
    return CaptureRecord(model, version, seconds, request)


def parse_line(line: bytes) -> Any:
    """One line's JSON value; RecordError when it is not UTF-8 JSON."""
    try:
        return json.loads(line.decode("utf-8"))
    except UnicodeDecodeError:
        raise RecordError("the line is not UTF-8") from None
    except RecursionError:
        raise RecordError("the line is nested too deeply") from None
    except ValueError as exc:
        raise RecordError(f"not valid JSON: {exc}") from None


# ----------------------------------------------------------------------------- files


def model_directory(directory: str | os.PathLike[str], model: str) -> Path:
    """`{directory}/{model}`; the model must be a plain name (no path tricks)."""
    if not _NAME.fullmatch(model):
        raise ValueError(f"model {model!r} is not a valid model name")
    return Path(directory) / model


def _writer_name() -> str:
    host = _HOST_CHARS.sub("_", socket.gethostname() or "host")[:64] or "host"
    return f"{host}-{os.getpid()}"


def _open_new(folder: Path, prefix: str, start: int) -> tuple[int, Path, int]:
    """Create `{prefix}-{n}.jsonl` for the first free n >= start (O_EXCL: a restarted process
    with the same pid, common in containers, never appends to a file it did not write)."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    n = start
    while True:
        path = folder / f"{prefix}-{n}.jsonl"
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        except FileExistsError:
            n += 1
            continue
        return fd, path, n


def _sample_files(folder: Path) -> list[Path]:
    """The `*.jsonl` files of a model's folder, oldest first (mtime, then name)."""
    entries = []
    for path in folder.glob("*.jsonl"):
        try:
            entries.append((path.stat().st_mtime, path.name, path))
        except FileNotFoundError:
            continue
    return [path for _, _, path in sorted(entries)]


def _prune(folder: Path, keep: int, spare: Path | None) -> None:
    """Delete the oldest `*.jsonl` files (by mtime, then name) until `keep` remain; never
    `spare` (the caller's own open file)."""
    files = _sample_files(folder)
    excess = len(files) - keep
    for path in files:
        if excess <= 0:
            break
        if path == spare:
            continue
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        excess -= 1


def write_sample(
    directory: str | os.PathLike[str], model: str, records: Iterable[CaptureRecord]
) -> tuple[Path, int]:
    """Write `records` as one new file of the model's sample, in the capturer's format and file
    naming. The file appears complete or not at all (written under a hidden name, then renamed).
    Returns (path, records written)."""
    folder = model_directory(directory, model)
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = folder / f".import-{_writer_name()}.tmp"
    count = 0
    try:
        with open(tmp, "wb") as out:
            os.chmod(tmp, 0o600)
            for record in records:
                out.write(record.to_line())
                count += 1
            out.flush()
            os.fsync(out.fileno())
        fd, path, _ = _open_new(folder, _writer_name(), 0)
        os.close(fd)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path, count


@dataclass
class SampleStats:
    """What `iter_sample` read: files, lines, records, and lines skipped as corrupt."""

    files: int = 0
    bytes: int = 0
    records: int = 0
    corrupt: int = 0
    unreadable_files: int = 0
    versions: Counter[str] = field(default_factory=Counter)
    first_at: float | None = None
    last_at: float | None = None
    first_error: str | None = None  # where and why the first corrupt line was skipped

    def to_json(self) -> dict[str, Any]:
        return {
            "files": self.files,
            "bytes": self.bytes,
            "records": self.records,
            "corrupt": self.corrupt,
            "unreadable_files": self.unreadable_files,
            "versions": dict(sorted(self.versions.items())),
            "first_at": self.first_at,
            "last_at": self.last_at,
            "first_error": self.first_error,
        }


def iter_sample(
    directory: str | os.PathLike[str],
    model: str,
    limit: int | None = None,
    stats: SampleStats | None = None,
) -> Iterator[CaptureRecord]:
    """Yield the model's records, oldest file first, at most `limit`. A line that is not a valid
    record of this model (torn by a crash, still being written, edited by hand) is skipped and
    counted in `stats.corrupt`; a file deleted while it is read is counted and skipped."""
    stats = SampleStats() if stats is None else stats
    folder = model_directory(directory, model)
    if not folder.is_dir():
        return
    for path in _sample_files(folder):
        if limit is not None and stats.records >= limit:
            return
        try:
            handle = open(path, "rb")
        except OSError:
            stats.unreadable_files += 1
            continue
        stats.files += 1
        with handle:
            for number, line in enumerate(handle, start=1):
                stats.bytes += len(line)
                if not line.strip():
                    continue
                try:
                    record = parse_record(parse_line(line))
                    if record.model != model:
                        raise RecordError(f"model is {record.model!r}, not {model!r}")
                except RecordError as exc:
                    stats.corrupt += 1
                    if stats.first_error is None:
                        stats.first_error = f"{path.name} line {number}: {exc}"
                    continue
                stats.records += 1
                stats.versions[record.version] += 1
                at = record.captured_at
                stats.first_at = at if stats.first_at is None else min(stats.first_at, at)
                stats.last_at = at if stats.last_at is None else max(stats.last_at, at)
                yield record
                if limit is not None and stats.records >= limit:
                    return


# ----------------------------------------------------------------------------- the capturer


@dataclass(frozen=True)
class _Offer:
    model: str
    version: str
    at: float
    body: bytes | Mapping[str, Any]
    header_length: str | None


class _OpenFile:
    def __init__(self, fd: int, path: Path, number: int) -> None:
        self.fd, self.path, self.number, self.size = fd, path, number, 0


class Capturer:
    """Samples answered requests into the capture directory (see the module docstring).

    `offer` is called on the Router's event loop (one thread); everything slow happens on one
    daemon writer thread, started by the first record. Counters are split by the thread that
    writes them, so neither side takes a lock."""

    def __init__(
        self,
        settings: CaptureSettings,
        *,
        identity_parameters: Collection[str] = (),
        salt: bytes | None = None,
        rng: random.Random | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        """Raises ConfigError when `hash_fields` is set and no salt is given or configured
        ($ROLLOUT_CAPTURE_SALT[_FILE]): an unsalted digest of a low-entropy value (an email, an
        id) is reversed by hashing guesses."""
        self.settings = settings
        self.identity = frozenset(identity_parameters)
        if settings.hash_fields and salt is None:
            salt = load_capture_salt(env)
            if salt is None:
                raise ConfigError(
                    f"capture.hash_fields {list(settings.hash_fields)} needs a salt: set "
                    f"{SALT_ENV}, or {SALT_FILE_ENV} to a file holding one (at least 16 characters)"
                )
        self._salt = salt or b""
        self._rng = rng or random.Random()
        self._queue: queue.Queue[Any] = queue.Queue(maxsize=settings.max_queue_records)
        self._tokens = float(max(1.0, settings.max_records_per_s))
        self._token_at: float | None = None
        self._front = {"offered": 0, "skipped_sample": 0, "skipped_rate": 0, "skipped_size": 0,
                       "dropped_queue": 0, "offer_errors": 0}  # fmt: skip
        self._back = {"captured": 0, "skipped_size": 0, "skipped_invalid": 0, "write_errors": 0}
        self.last_error: str | None = None
        self._files: dict[str, _OpenFile] = {}
        self._prefix = _writer_name()
        self._thread: threading.Thread | None = None
        self._closed = False

    @property
    def enabled(self) -> bool:
        return self.settings.enabled and not self._closed

    # -- the request path --------------------------------------------------------------------

    def offer(
        self,
        model: str,
        version: str,
        body: bytes | Mapping[str, Any],
        now: float,
        *,
        header_length: str | None = None,
    ) -> bool:
        """Maybe capture one answered request: `body` as received (with its
        Inference-Header-Content-Length, for the binary extension) or its decoded JSON document;
        `now` in Unix seconds (the record's `captured_at`, and the token bucket's clock).
        Returns whether it was queued. Never blocks, never raises."""
        if not self.enabled:
            return False
        front = self._front
        try:
            front["offered"] += 1
            if self._rng.random() >= self.settings.sample_rate:
                front["skipped_sample"] += 1
                return False
            if isinstance(body, (bytes, bytearray)) and len(body) > self.settings.max_record_bytes:
                front["skipped_size"] += 1
                return False
            if not self._take_token(now):
                front["skipped_rate"] += 1
                return False
            self._ensure_writer()
            self._queue.put_nowait(_Offer(model, version, now, body, header_length))
            return True
        except queue.Full:
            front["dropped_queue"] += 1
            return False
        except Exception as exc:  # a bug here must cost a record, never a request
            front["offer_errors"] += 1
            self.last_error = f"offer: {type(exc).__name__}: {exc}"
            return False

    def _take_token(self, now: float) -> bool:
        rate = self.settings.max_records_per_s
        burst = max(1.0, rate)
        if self._token_at is not None:
            # max(0, ...): a wall clock stepped back refills nothing (and takes nothing back).
            self._tokens = min(burst, self._tokens + max(0.0, now - self._token_at) * rate)
        self._token_at = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True

    def counters(self) -> dict[str, Any]:
        """For `/status`: what was offered and what became of it."""
        front, back = self._front, self._back
        return {
            "enabled": self.enabled,
            "offered": front["offered"],
            "captured": back["captured"],
            "skipped_sample": front["skipped_sample"],
            "skipped_rate": front["skipped_rate"],
            "skipped_size": front["skipped_size"] + back["skipped_size"],
            "skipped_invalid": back["skipped_invalid"],
            "dropped_queue": front["dropped_queue"],
            "write_errors": back["write_errors"] + front["offer_errors"],
            "queued": self._queue.qsize(),
            "last_error": self.last_error,
        }

    # -- the writer thread ------------------------------------------------------------------

    def _ensure_writer(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="capture-writer", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        stop = False
        while not stop:
            batch = [self._queue.get()]
            while len(batch) < _BATCH:
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if _STOP in batch:
                stop = True
                batch = [item for item in batch if item is not _STOP]
            try:
                self._write_batch(batch)
            except Exception as exc:  # never let the thread die: count and go on
                self._back["write_errors"] += len(batch)
                self.last_error = f"writer: {type(exc).__name__}: {exc}"
        self._close_files()

    def _encode(self, item: _Offer) -> bytes | None:
        back = self._back
        try:
            if isinstance(item.body, (bytes, bytearray)):
                raw = decode_body(bytes(item.body), header_length=item.header_length)
                document = _checked(raw) if raw.binary else raw.document
            else:
                document = dict(item.body)
            request = redact_request(
                document, drop=self.settings.drop_fields, hash_=self.settings.hash_fields,
                salt=self._salt, identity=self.identity,
            )  # fmt: skip
            if not isinstance(request.get("inputs"), list) or not request["inputs"]:
                raise RecordError("no inputs left after drop_fields/hash_fields")
            line = CaptureRecord(item.model, item.version, round(item.at, 3), request).to_line()
        except (InvalidInput, RecordError, ValueError, TypeError, RecursionError) as exc:
            back["skipped_invalid"] += 1
            self.last_error = f"skipped a request: {exc}"[:500]
            return None
        if len(line) > self.settings.max_record_bytes:
            back["skipped_size"] += 1
            return None
        return line

    def _write_batch(self, batch: list[_Offer]) -> None:
        by_model: dict[str, list[bytes]] = {}
        for item in batch:
            line = self._encode(item)
            if line is not None:
                by_model.setdefault(item.model, []).append(line)
        for model, lines in by_model.items():
            before = self._back["captured"]
            try:
                self._write_lines(model, lines)
            except (OSError, ValueError) as exc:
                self._back["write_errors"] += len(lines) - (self._back["captured"] - before)
                self.last_error = f"writing {model}: {exc}"[:500]
                self._drop_file(model)

    def _write_lines(self, model: str, lines: list[bytes]) -> None:
        folder = model_directory(self.settings.directory or ".", model)
        current = self._files.get(model)
        if current is not None and os.fstat(current.fd).st_nlink == 0:
            self._drop_file(model)  # another writer pruned it: start a new one
            current = None
        chunk: list[bytes] = []
        size = 0
        for line in lines:
            if current is None or current.size + size + len(line) > self.settings.max_file_bytes:
                if current is not None and chunk:
                    self._write_chunk(current, chunk, size)
                chunk, size = [], 0
                current = self._rotate(model, folder, current)
            chunk.append(line)
            size += len(line)
        if current is not None and chunk:
            self._write_chunk(current, chunk, size)

    def _write_chunk(self, current: _OpenFile, chunk: list[bytes], size: int) -> None:
        data = memoryview(b"".join(chunk))
        while data:  # a regular file writes short only when the disk is full; the next raises
            written = os.write(current.fd, data)
            data = data[written:]
        current.size += size
        self._back["captured"] += len(chunk)

    def _rotate(self, model: str, folder: Path, current: _OpenFile | None) -> _OpenFile:
        start = 0 if current is None else current.number + 1
        self._drop_file(model)
        fd, path, number = _open_new(folder, self._prefix, start)
        opened = self._files[model] = _OpenFile(fd, path, number)
        _prune(folder, self.settings.max_files, spare=path)
        return opened

    def _drop_file(self, model: str) -> None:
        current = self._files.pop(model, None)
        if current is not None:
            try:
                os.close(current.fd)
            except OSError:
                pass

    def _close_files(self) -> None:
        for model in list(self._files):
            self._drop_file(model)

    # -- shutdown ----------------------------------------------------------------------------

    def close(self, timeout_s: float = 5.0) -> None:
        """Stop taking records, write the queued ones, close the files. Waits at most
        `timeout_s` for the writer; safe to call twice."""
        if self._closed:
            return
        self._closed = True
        if self._thread is None and self._queue.empty():
            return
        self._ensure_writer()
        thread = self._thread
        assert thread is not None
        try:
            self._queue.put(_STOP, timeout=timeout_s)
        except queue.Full:
            return
        thread.join(timeout_s)
