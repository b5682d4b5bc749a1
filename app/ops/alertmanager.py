"""Render configs/prometheus/alertmanager.yml with its receivers' webhook URLs read from files.

    python -m app.ops.alertmanager --template configs/prometheus/alertmanager.yml \\
        --url-file page=/run/secrets/am-page-url --url-file warn=/run/secrets/am-warn-url \\
        --output /etc/alertmanager/alertmanager.yml

A receiver URL is a credential (incident tools and chat relays put a token in it), and Debian
12's Alertmanager (0.25) has no `url_file` for webhooks (0.26 added it), so the template holds
a marker where each URL goes, `url: ${URL_FILE:<key>}`, and this fills it from the file given
as `--url-file <key>=<path>`. Refused, each with a one-line error naming the key or file (exit
2): an empty or unreadable file, a file that is not one http(s) URL, a key the template has no
marker for, a marker no file was given for. The output is written atomically (a temporary
file beside it, renamed into place) with mode 0600, keeping the owner and group of the file it
replaces; URLs are never printed. Only the marker is replaced: the rest of the template, its
comments included, is copied as it is.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from app.errors import ConfigError

__all__ = ["MARKER", "main", "markers", "render", "write_private"]

MARKER = re.compile(r"\$\{URL_FILE:([A-Za-z0-9_.-]+)\}")
# A marker is the whole value of a `url:` line (a trailing comment allowed): nothing else in the
# template, comments included, is ever replaced.
_URL_LINE = re.compile(
    r"^(?P<lead>[ \t]*(?:-[ \t]+)?url:[ \t]*)\$\{URL_FILE:(?P<key>[A-Za-z0-9_.-]+)\}"
    r"(?P<tail>[ \t]*(?:#.*)?)$",
    re.MULTILINE,
)


def _webhooks(config: Any) -> list[tuple[str, dict[str, Any]]]:
    """(receiver name, webhook config) for every webhook in a parsed Alertmanager config."""
    receivers = config.get("receivers") if isinstance(config, dict) else None
    return [
        (str(receiver.get("name")), hook)
        for receiver in receivers or []
        if isinstance(receiver, dict)
        for hook in receiver.get("webhook_configs") or []
        if isinstance(hook, dict)
    ]


def markers(template_path: Path) -> dict[str, str]:
    """The template's URL markers: key -> the receiver whose webhook it fills."""
    text = template_path.read_text()
    try:
        config = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{template_path}: not YAML: {str(exc).splitlines()[0]}") from None
    found: dict[str, str] = {}
    for receiver, hook in _webhooks(config):
        match = MARKER.fullmatch(str(hook.get("url", "")))
        if match is None:
            continue
        key = match.group(1)
        if key in found:
            raise ConfigError(
                f"{template_path}: marker ${{URL_FILE:{key}}} is used twice "
                f"(receivers {found[key]} and {receiver}); give each webhook its own key"
            )
        found[key] = receiver
    on_lines = [m.group("key") for m in _URL_LINE.finditer(text)]
    if sorted(on_lines) != sorted(found):
        raise ConfigError(
            f"{template_path}: a ${{URL_FILE:<key>}} marker must be the whole value of a "
            "webhook's `url:` line (a trailing comment allowed)"
        )
    return found


def _read_url(key: str, path: Path) -> str:
    """The one http(s) URL in `path`, stripped. Errors never quote the file's content."""
    where = f"--url-file {key}={path}"
    try:
        url = path.read_text().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{where}: cannot read the file ({type(exc).__name__})") from None
    if not url:
        raise ConfigError(f"{where}: the file is empty")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{where}: the file does not hold an http:// or https:// URL")
    if any(c.isspace() or ord(c) < 0x20 or ord(c) == 0x7F for c in url):
        raise ConfigError(f"{where}: the file holds more than one URL (whitespace inside)")
    return url


def render(template_path: Path, url_files: dict[str, Path]) -> str:
    """The template with each `${URL_FILE:<key>}` replaced by the URL in `url_files[key]`."""
    wanted = markers(template_path)
    unknown = sorted(set(url_files) - set(wanted))
    if unknown:
        raise ConfigError(
            f"--url-file {unknown[0]}=...: {template_path} has no ${{URL_FILE:{unknown[0]}}} "
            f"marker (its markers: {', '.join(sorted(wanted)) or 'none'})"
        )
    missing = sorted(set(wanted) - set(url_files))
    if missing:
        raise ConfigError(
            f"receiver {wanted[missing[0]]}: no URL: give --url-file {missing[0]}=<file> "
            f"for its ${{URL_FILE:{missing[0]}}} marker"
        )
    urls = {key: _read_url(key, Path(path)) for key, path in sorted(url_files.items())}

    def fill(match: re.Match[str]) -> str:
        # A JSON string is a YAML double-quoted scalar: `#`, `: ` or quotes in a URL stay data.
        return match.group("lead") + json.dumps(urls[match.group("key")]) + match.group("tail")

    rendered = _URL_LINE.sub(fill, template_path.read_text())
    left = [
        receiver
        for receiver, hook in _webhooks(yaml.safe_load(rendered))
        if urlsplit(str(hook.get("url", ""))).scheme not in ("http", "https")
    ]
    if left:  # a webhook with neither a marker nor a URL of its own
        raise ConfigError(f"receiver {left[0]}: {template_path} gives it no http(s) URL")
    header = f"# Rendered from {template_path} by app/ops/alertmanager.py: edit the template.\n"
    return header + rendered


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path` atomically with mode 0600, keeping the replaced file's owner and
    group where this process may (root); otherwise the file is the caller's."""
    try:
        fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)  # mode 0600
    except OSError as exc:
        raise ConfigError(
            f"--output {path}: cannot write in {path.parent} ({exc.strerror})"
        ) from None
    try:
        with contextlib.suppress(FileNotFoundError, PermissionError):
            old = path.stat()
            os.fchown(fd, old.st_uid, old.st_gid)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _url_file(value: str) -> tuple[str, Path]:
    key, sep, path = value.partition("=")
    if not sep or not key or not path:
        raise argparse.ArgumentTypeError(f"{value!r}: expected KEY=PATH (page=/run/secrets/url)")
    return key, Path(path)


def main(argv: list[str] | None = None) -> int:
    """Render an Alertmanager config from a template and files that hold its webhook URLs."""
    prog = "python -m app.ops.alertmanager"
    parser = argparse.ArgumentParser(prog=prog, description=main.__doc__)
    parser.add_argument("--template", type=Path, required=True,
                        help="the template (configs/prometheus/alertmanager.yml)")  # fmt: skip
    parser.add_argument("--url-file", type=_url_file, action="append", default=[],
                        metavar="KEY=PATH", help="the file holding the URL for ${URL_FILE:KEY}")  # fmt: skip
    parser.add_argument("--output", type=Path, required=True,
                        help="where to write the config (mode 0600, replaced atomically)")  # fmt: skip
    args = parser.parse_args(argv)
    url_files: dict[str, Path] = {}
    try:
        for key, path in args.url_file:
            if key in url_files:
                raise ConfigError(f"--url-file {key}=...: given twice")
            url_files[key] = path
        text = render(args.template, url_files)
        write_private(args.output, text)
    except ConfigError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the template or the output: paths only, never a URL
        print(f"{prog}: error: {exc.filename}: {exc.strerror}", file=sys.stderr)
        return 2
    print(f"{args.output}: written ({len(url_files)} receiver URLs from files)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
