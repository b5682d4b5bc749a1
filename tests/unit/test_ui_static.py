"""The operator page's static files (app/ui/static), checked without Ray or a browser: they
exist and are what the Router serves, the HTML parses and names only its own files, the JS
parses (with `node --check`, when node is installed), nothing loads from the internet, and
the admin token can only travel in the Authorization header."""

from __future__ import annotations

import re
import shutil
import subprocess
from html.parser import HTMLParser

import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from app.ui import FILES, STATIC_DIR, operator_page, ui_response

VOID = {"meta", "link", "input", "br", "img", "hr", "source", "col", "area", "base", "wbr"}


class _Document(HTMLParser):
    """The tags of a document, with a check that every non-void element is closed in order."""

    def __init__(self) -> None:
        super().__init__()
        self.open: list[str] = []
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.errors: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))
        if tag not in VOID:
            self.open.append(tag)

    def handle_endtag(self, tag: str) -> None:
        if not self.open or self.open[-1] != tag:
            self.errors.append(f"</{tag}> closes {self.open[-1] if self.open else 'nothing'}")
        else:
            self.open.pop()


def _read(name: str) -> str:
    return (STATIC_DIR / name).read_text(encoding="utf-8")


def _parse_html() -> _Document:
    document = _Document()
    document.feed(_read("index.html"))
    document.close()
    return document


def test_the_page_is_three_files_that_exist():
    assert set(FILES) == {"index.html", "app.js", "app.css"}
    for name in FILES:
        assert (STATIC_DIR / name).stat().st_size > 0, name


def test_the_html_parses_and_loads_only_its_own_files():
    document = _parse_html()
    assert not document.errors, document.errors
    assert document.open == [], f"unclosed: {document.open}"
    scripts = [a.get("src") for tag, a in document.tags if tag == "script"]
    links = {a.get("rel"): a.get("href") for tag, a in document.tags if tag == "link"}
    # The icon is an empty data URL: no favicon request (a 404 in the log on every load).
    assert scripts == ["app.js"] and links == {"stylesheet": "app.css", "icon": "data:,"}
    ids = [a["id"] for _, a in document.tags if a.get("id")]
    assert len(ids) == len(set(ids)), "duplicate ids"
    # Every element the script looks up by id is in the page.
    wanted = set(re.findall(r'\$\("([\w-]+)"\)', _read("app.js")))
    assert wanted and wanted <= set(ids), wanted - set(ids)


def test_the_token_input_can_never_be_submitted_as_a_form_field():
    """A form field with a name is sent in the URL by a GET submit (if the script failed to
    load, say): the token input has no name, and the form is POST in any case."""
    document = _parse_html()
    inputs = [a for tag, a in document.tags if tag == "input"]
    assert [a.get("type") for a in inputs] == ["password"]
    assert all("name" not in a for a in inputs)
    forms = [a for tag, a in document.tags if tag == "form"]
    assert forms and all(a.get("method") == "post" and "action" not in a for a in forms)


@pytest.mark.parametrize("name", sorted(FILES))
def test_no_file_names_an_external_url(name):
    text = _read(name)
    # The SVG namespace is a name, not a URL anything is loaded from.
    urls = set(re.findall(r"(?:https?:)?//[\w.-]+\.[a-z]{2,}[^\s\"')]*", text, re.I))
    assert urls <= {"http://www.w3.org/2000/svg"}, urls
    assert "@import" not in text and "url(" not in text


def test_the_token_is_kept_per_tab_and_sent_only_in_the_authorization_header():
    js = _read("app.js")
    assert "sessionStorage" in js
    for forbidden in ("localStorage", "document.cookie", "innerHTML", "outerHTML",
                      "insertAdjacentHTML", "document.write", "eval(", "new Function"):  # fmt: skip
        assert forbidden not in js, forbidden
    assert 'Authorization: "Bearer " + token()' in js
    # token() (the one reader of the stored token) is called only for that header and to
    # check that there is a token.
    uses = re.findall(r"[^\n]*(?<!function )token\(\)[^\n]*", js)
    assert uses and all("Authorization" in u or "!token()" in u or "if (token())" in u
                        for u in uses), uses  # fmt: skip
    # No URL is ever built with a token in it, and the fetch never sends cookies.
    assert not re.search(r"[?&][\w-]*token[\w-]*=", js, re.I)
    assert 'credentials: "omit"' in js


@pytest.mark.skipif(shutil.which("node") is None, reason="node is not installed")
def test_the_script_parses():
    result = subprocess.run(
        ["node", "--check", str(STATIC_DIR / "app.js")], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_served_with_their_content_types_no_cache_and_a_strict_policy():
    for name, content_type in FILES.items():
        response = ui_response(name)
        assert response.headers["content-type"] == content_type
        assert response.headers["cache-control"] == "no-cache"
        assert response.headers["x-content-type-options"] == "nosniff"
        policy = response.headers["content-security-policy"]
        assert "default-src 'none'" in policy and "connect-src 'self'" in policy
        assert response.body == (STATIC_DIR / name).read_bytes()
    assert ui_response("").body == ui_response("index.html").body


def test_only_the_pages_files_are_served():
    from starlette.routing import Mount

    app = Starlette(routes=[Mount("/ui", operator_page())])
    with TestClient(app) as client:
        assert client.get("/ui/").headers["content-type"].startswith("text/html")
        assert client.get("/ui/app.js").status_code == 200
        for path in ("/ui/nope.js", "/ui/__init__.py", "/ui/../pyproject.toml",
                     "/ui/%2e%2e%2f__init__.py", "/ui/static/app.js", "/ui/..%2f__init__.py"):  # fmt: skip
            assert client.get(path).status_code == 404, path
        assert client.post("/ui/app.js").status_code == 405


def test_the_router_serves_the_page_at_ui_with_json_errors():
    """Mounted in the Router's FastAPI app: its error handler answers (JSON), and the page
    needs no token."""
    from deployments.router import api

    with TestClient(api, raise_server_exceptions=False) as client:
        page = client.get("/ui/")
        assert page.status_code == 200 and "app.js" in page.text
        assert page.headers["cache-control"] == "no-cache"
        missing = client.get("/ui/nope.js", headers={"x-request-id": "r-1"})
        assert missing.status_code == 404
        assert missing.json() == {"error": missing.json()["error"], "request_id": "r-1"}
        assert "nope.js" in missing.json()["error"]
        bare = client.get("/ui", follow_redirects=False)
        assert bare.status_code in (307, 308) and bare.headers["location"].endswith("/ui/")


def _js_object(name: str) -> dict[str, str]:
    """The entries of a `const NAME = { key: value, ... };` literal in app.js, values as text."""
    block = re.search(rf"const {name} = \{{\n(.*?)\n  \}};", _read("app.js"), re.S)
    assert block, f"no {name} object in app.js"
    entries = re.findall(r'^\s+"?([\w-]+)"?: (.*?),?$', block.group(1), re.M)
    return dict(entries)


def test_every_operator_command_has_a_button_with_a_confirmation():
    """A button per command the admin API takes (start and promote-full included), each named
    by its API path segment, each with its confirmation text and its phases."""
    from app.rollout.machine import OPERATOR_COMMANDS, command_path

    document = _parse_html()
    buttons = [
        a["data-command"] for tag, a in document.tags if tag == "button" and "data-command" in a
    ]
    assert sorted(buttons) == sorted(command_path(c) for c in OPERATOR_COMMANDS)
    assert {"start", "promote-full"} <= set(buttons)
    assert set(_js_object("CONFIRM_TEXT")) == set(buttons)
    assert set(_js_object("ALLOWED")) == set(buttons)
    js = _read("app.js")
    # Every click asks first (unless a command is still out): the click handler's one call
    # goes through the dialog.
    assert re.search(
        r"async function command\(name, label\) \{\n\s+if \(commandInFlight !== null \|\| "
        r"!\(await confirmCommand\(",
        js,
    )
    assert 'addEventListener("click", () => command(button.dataset.command' in js
    # A refusal (409) is shown with the API's message.
    assert 'name + " refused: " + e.message' in js


def test_the_buttons_are_greyed_out_by_the_controllers_own_phase_rules():
    """The page's ALLOWED mirrors the state machine (app/rollout/machine.py `_ALLOWED`) and
    the controller's rule for start (a new rollout once the last one has ended)."""
    from app.rollout.machine import _ALLOWED, Phase, command_path

    allowed = {
        name: set(re.findall(r'"(\w+)"', phases)) for name, phases in _js_object("ALLOWED").items()
    }
    expected = {command_path(c.value): {p.value for p in phases} for c, phases in _ALLOWED.items()}
    expected["start"] = {p.value for p in Phase if p.terminal}
    assert allowed == expected


@pytest.mark.parametrize("key", ["waves", "notifications", "ab_series"])
def test_the_page_reads_the_status_sections(key):
    """Regions (`waves`), webhook counters (`notifications`) and the A/B lift curve
    (`ab_series`): each read from the status, each a section of its own that hides itself
    when the key is missing or null (an older controller)."""
    js = _read("app.js")
    assert f"status.{key}" in js
    assert re.search(rf'section\("[\w /]+", \(\) => render\w+\(status\.{key}\b', js), key


def test_each_section_is_drawn_on_its_own():
    """One section that cannot draw what it got does not blank the others: render calls
    every section through `section(...)`, which logs to the console instead of throwing."""
    js = _read("app.js")
    body = re.search(r"function render\(status, history, router\) \{\n(.*?)\n  \}\n", js, re.S)
    assert body
    calls = re.findall(r"^\s+(render\w+)\(", body.group(1), re.M)
    assert calls == ["renderCommands"], calls  # everything else goes through section()
    assert "console.error(" in js
