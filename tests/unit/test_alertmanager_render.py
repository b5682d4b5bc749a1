"""app/ops/alertmanager.py: the shipped template rendered with URLs from real files, checked by
the real `amtool`, and every refusal one line naming the key or file, exit 2, no URL shown.

`amtool` comes with the Debian package `prometheus-alertmanager` (.ci/run installs it): these
tests fail, not skip, without it."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from app.errors import ConfigError
from app.ops.alertmanager import main, markers, render

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "configs" / "prometheus" / "alertmanager.yml"
# Secrets as receivers hand them out: a token in the query, and characters YAML would misread.
PAGE_URL = "https://pager.test/v2/enqueue?token=s3cr3t-page#frag"
WARN_URL = "http://relay.test:8080/hooks/team:warn?q=\"a\"&r='b'&s=#c"


def amtool(*args: str) -> subprocess.CompletedProcess:
    found = shutil.which("amtool")
    if found is None:
        pytest.fail(
            "amtool not found: install the Debian package `prometheus-alertmanager` (.ci/run does)"
        )
    return subprocess.run([found, *args], capture_output=True, text=True, timeout=60)


@pytest.fixture
def secrets(tmp_path) -> dict[str, Path]:
    """The two URL files, as a secret store mounts them (with a trailing newline)."""
    folder = tmp_path / "secrets"
    folder.mkdir()
    (folder / "am-page-url").write_text(PAGE_URL + "\n")
    (folder / "am-warn-url").write_text(f"  {WARN_URL}\n\n")
    return {"page": folder / "am-page-url", "warn": folder / "am-warn-url"}


def run_main(tmp_path, *url_files: str, template: Path = TEMPLATE) -> tuple[int, Path]:
    output = tmp_path / "alertmanager.yml"
    args = ["--template", str(template), "--output", str(output)]
    for url_file in url_files:
        args += ["--url-file", url_file]
    return main(args), output


def test_the_template_marks_each_receiver_and_holds_no_url():
    assert markers(TEMPLATE) == {"page": "rollout-page", "warn": "rollout-warn"}
    config = yaml.safe_load(TEMPLATE.read_text())
    urls = [w["url"] for r in config["receivers"] for w in r["webhook_configs"]]
    assert urls == ["${URL_FILE:page}", "${URL_FILE:warn}"]


def test_rendered_config_passes_amtool_and_routes_to_the_files_urls(secrets, tmp_path):
    rc, output = run_main(tmp_path, f"page={secrets['page']}", f"warn={secrets['warn']}")
    assert rc == 0
    config = yaml.safe_load(output.read_text())
    urls = {r["name"]: r["webhook_configs"][0]["url"] for r in config["receivers"]}
    assert urls == {"rollout-page": PAGE_URL, "rollout-warn": WARN_URL}
    # Everything else is the template's, comments included.
    template = yaml.safe_load(TEMPLATE.read_text())
    assert config["route"] == template["route"]
    assert config["inhibit_rules"] == template["inhibit_rules"]
    assert "# One notification per alert and model" in output.read_text()
    result = amtool("check-config", str(output))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout
    result = amtool("config", "routes", "test", f"--config.file={output}",
                    "--verify.receivers=rollout-page", "severity=page")  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_output_is_private_and_replaced_atomically(secrets, tmp_path, capsys):
    output = tmp_path / "alertmanager.yml"
    output.write_text("old config\n")
    output.chmod(0o644)
    rc, _ = run_main(tmp_path, f"page={secrets['page']}", f"warn={secrets['warn']}")
    assert rc == 0
    assert stat.S_IMODE(output.stat().st_mode) == 0o600
    assert sorted(p.name for p in tmp_path.iterdir()) == ["alertmanager.yml", "secrets"]
    out, err = capsys.readouterr()
    assert "s3cr3t" not in out + err and "pager.test" not in out + err


def test_a_failed_render_leaves_the_old_output(tmp_path, secrets):
    output = tmp_path / "alertmanager.yml"
    output.write_text("old config\n")
    rc, _ = run_main(tmp_path, f"page={secrets['page']}")
    assert rc == 2
    assert output.read_text() == "old config\n"


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        ("", "the file is empty"),
        ("  \n\n", "the file is empty"),
        ("ftp://pager.test/s3cr3t\n", "does not hold an http:// or https:// URL"),
        ("pager.test/s3cr3t\n", "does not hold an http:// or https:// URL"),
        ("https:///s3cr3t\n", "does not hold an http:// or https:// URL"),
        ("https://pager.test/s3cr3t\nhttps://other.test/\n", "more than one URL"),
    ],
)
def test_a_bad_url_file_is_refused_by_name_without_showing_it(
    secrets, tmp_path, capsys, content, needle
):
    secrets["page"].write_text(content)
    rc, output = run_main(tmp_path, f"page={secrets['page']}", f"warn={secrets['warn']}")
    assert rc == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err, err
    assert f"--url-file page={secrets['page']}" in err
    assert "s3cr3t" not in err and "pager.test" not in err
    assert not output.exists()


def test_a_missing_url_file_is_refused_by_name(secrets, tmp_path, capsys):
    rc, _ = run_main(tmp_path, f"page={tmp_path / 'nowhere'}", f"warn={secrets['warn']}")
    assert rc == 2
    err = capsys.readouterr().err
    assert f"--url-file page={tmp_path / 'nowhere'}: cannot read the file" in err


def test_a_key_the_template_does_not_mark_is_refused(secrets, tmp_path, capsys):
    rc, _ = run_main(tmp_path, f"page={secrets['page']}", f"warn={secrets['warn']}",
                     f"pager={secrets['page']}")  # fmt: skip
    assert rc == 2
    err = capsys.readouterr().err
    assert "--url-file pager=...: " in err and "no ${URL_FILE:pager} marker" in err
    assert "its markers: page, warn" in err


def test_a_receiver_left_without_a_url_is_refused(secrets, tmp_path, capsys):
    rc, _ = run_main(tmp_path, f"page={secrets['page']}")
    assert rc == 2
    err = capsys.readouterr().err
    assert "receiver rollout-warn: no URL: give --url-file warn=<file>" in err


def test_a_webhook_with_neither_marker_nor_url_is_refused(secrets, tmp_path):
    template = tmp_path / "template.yml"
    config = yaml.safe_load(TEMPLATE.read_text())
    config["receivers"].append({"name": "extra", "webhook_configs": [{"url": "REPLACE-ME"}]})
    template.write_text(yaml.safe_dump(config, sort_keys=False))
    with pytest.raises(ConfigError, match=r"^receiver extra: .* gives it no http\(s\) URL$"):
        render(template, secrets)


def test_a_marker_outside_a_url_line_is_refused(secrets, tmp_path):
    template = tmp_path / "template.yml"
    text = TEMPLATE.read_text().replace("url: ${URL_FILE:warn}", "url: '${URL_FILE:warn}'")
    template.write_text(text)
    with pytest.raises(ConfigError, match=r"must be the whole value of a webhook's `url:` line"):
        render(template, secrets)


def test_a_key_given_twice_is_refused(secrets, tmp_path, capsys):
    rc, _ = run_main(tmp_path, f"page={secrets['page']}", f"page={secrets['warn']}",
                     f"warn={secrets['warn']}")  # fmt: skip
    assert rc == 2
    assert "--url-file page=...: given twice" in capsys.readouterr().err


def test_runs_as_a_module(secrets, tmp_path):
    output = tmp_path / "out.yml"
    result = subprocess.run(
        [sys.executable, "-m", "app.ops.alertmanager", "--template", str(TEMPLATE),
         "--url-file", f"page={secrets['page']}", "--url-file", f"warn={secrets['warn']}",
         "--output", str(output)],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert f"{output}: written" in result.stdout and "s3cr3t" not in result.stdout
    assert amtool("check-config", str(output)).returncode == 0


def test_an_output_folder_that_does_not_exist_is_refused(secrets, tmp_path, capsys):
    output = tmp_path / "missing" / "alertmanager.yml"
    args = ["--template", str(TEMPLATE), "--output", str(output),
            "--url-file", f"page={secrets['page']}", "--url-file", f"warn={secrets['warn']}"]  # fmt: skip
    assert main(args) == 2
    err = capsys.readouterr().err
    assert f"--output {output}: cannot write in {output.parent}" in err and err.count("\n") == 1
