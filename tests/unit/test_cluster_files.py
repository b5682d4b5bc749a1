"""cluster/*.yaml, offline: Ray's own schema and checks, the project's security and pinning
rules, and that every region's replicas fit its node types (no cloud, no Ray started)."""

from __future__ import annotations

import copy
import re
import shlex
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from app.config import load_yaml, project_root
from app.ops.kuberay import project_version
from app.ops.overlay import load_overlay, region_overlays, render
from app.ops.placement import check_fit, launcher_errors, load_launcher, node_types, replica_demands
from app.ops.serving_mode import HAPROXY_RETRY_ON
from deployments.builder import REQUEST_LOAD_POLICY
from tests.support.configs import router_app, version_app

ROOT = project_root()
LAUNCHERS = sorted((ROOT / "cluster").glob("*.yaml"))
CLOUD = [p for p in LAUNCHERS if load_launcher(p)["provider"]["type"] in ("aws", "gcp")]
OVERLAYS = region_overlays()


def ids(paths: list[Path]) -> list[str]:
    return [p.stem for p in paths]


def start_commands(config: dict) -> list[str]:
    return [c for key in ("head_start_ray_commands", "worker_start_ray_commands")
            for c in config.get(key, []) if "ray start" in c]  # fmt: skip


def test_the_regions_the_issue_asks_for_exist():
    providers = [
        (c["provider"]["type"], c["provider"].get("region")) for c in map(load_launcher, LAUNCHERS)
    ]
    aws = {region for kind, region in providers if kind == "aws"}
    assert len(aws) >= 2 and any(kind == "gcp" for kind, _ in providers), providers
    assert any(kind == "local" for kind, _ in providers), "an on-prem recipe (local provider)"


@pytest.mark.parametrize("path", LAUNCHERS, ids=ids(LAUNCHERS))
def test_launcher_file_passes_rays_schema_and_checks(path):
    assert launcher_errors(load_launcher(path), path.name) == []


def test_schema_check_names_the_bad_field():
    config = load_launcher(ROOT / "cluster/aws-us-east-1.yaml")
    broken = copy.deepcopy(config)
    broken["available_node_types"]["gpu-worker"]["resources"]["GPU"] = 0.5  # must be an integer
    broken["max_wokers"] = 3  # a typo
    errors = launcher_errors(broken, "aws-us-east-1.yaml")
    assert any("available_node_types.gpu-worker.resources.GPU" in e for e in errors), errors
    assert any("max_wokers" in e for e in errors), errors
    no_head = copy.deepcopy(config)
    no_head["head_node_type"] = "ray.missing"
    assert any("head_node_type" in e for e in launcher_errors(no_head, "x.yaml"))
    onprem = load_launcher(ROOT / "cluster/onprem.yaml")
    onprem["available_node_types"] = config["available_node_types"]  # the local provider refuses
    (error,) = launcher_errors({**onprem, "head_node_type": "ray.head"}, "onprem.yaml")
    assert "prepare_config" in error and "available_node_types" in error, error


@pytest.mark.parametrize("path", LAUNCHERS, ids=ids(LAUNCHERS))
def test_token_auth_is_on_everywhere(path):
    config = load_launcher(path)
    commands = start_commands(config)
    assert len(commands) == 2, commands  # head and workers
    for command in commands:
        assert "RAY_AUTH_MODE=token" in command, command
    # Every node gets the token generated on the operator's machine.
    assert any(remote.endswith("/.ray/auth_token") for remote in config["file_mounts"]), config[
        "file_mounts"
    ]


@pytest.mark.parametrize("path", LAUNCHERS, ids=ids(LAUNCHERS))
def test_dashboard_is_not_exposed(path):
    config = load_launcher(path)
    (head,) = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    args = shlex.split(head.split(";")[-1])
    assert "--dashboard-host=127.0.0.1" in args, head
    for command in start_commands(config):
        assert "0.0.0.0" not in command, command
    rules = config["provider"].get("security_group", {}).get("IpPermissions", [])
    for rule in rules:
        open_to_world = any(r.get("CidrIp") == "0.0.0.0/0" for r in rule.get("IpRanges", []))
        ports = range(rule.get("FromPort", 0), rule.get("ToPort", 65535) + 1)
        assert not (open_to_world and (8265 in ports or 6379 in ports or 8000 in ports)), rule
        assert 8265 not in ports, f"a rule opens the dashboard port: {rule}"


def head_start(config: dict) -> tuple[dict[str, str], list[str]]:
    """The head's `ray start` line: the environment it sets and its arguments (the simple
    command after the last `;` or `&&`)."""
    (head,) = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    words = shlex.split(head.split(";")[-1])
    while "&&" in words:
        words = words[words.index("&&") + 1 :]
    at = words.index("ray")
    env = dict(w.split("=", 1) for w in words[:at])
    return env, words[at:]


@pytest.mark.parametrize("path", LAUNCHERS, ids=ids(LAUNCHERS))
def test_the_head_keeps_the_gcs_in_an_external_redis(path):
    """Head-node loss: GCS fault tolerance on every head, with a TLS Redis (rediss://) whose
    password is read from a file at start, never written in the file; workers need none."""
    config = load_launcher(path)
    env, args = head_start(config)
    assert args[:3] == ["ray", "start", "--head"], args
    assert env["RAY_REDIS_ADDRESS"].startswith("rediss://"), env  # TLS in transit
    assert re.fullmatch(r"rediss://[\w.-]+:\d+", env["RAY_REDIS_ADDRESS"]), env
    # A namespace of the cluster's own: two clusters sharing one Redis never mix tables.
    assert env["RAY_external_storage_namespace"] == config["cluster_name"]
    assert "RAY_REDIS_CA_CERT" in env or "RAY_REDIS_CA_PATH" in env, env
    passwords = [a for a in args if a.startswith("--redis-password")]
    assert passwords == ["--redis-password=$(cat ~/.rollout/gcs_redis_password)"], args
    # The password file (and a CA file, if named) reaches the head through file_mounts.
    mounted = {remote.replace("/home/ubuntu", "~") for remote in config["file_mounts"]}
    assert "~/.rollout/gcs_redis_password" in mounted, config["file_mounts"]
    if "RAY_REDIS_CA_CERT" in env:
        assert env["RAY_REDIS_CA_CERT"].replace("$HOME", "~") in mounted, env
    (head,) = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    # No password file: no start (not a head without GCS fault tolerance that no one notices).
    assert "test -s ~/.rollout/gcs_redis_password &&" in head
    for command in config["worker_start_ray_commands"]:
        assert "REDIS" not in command.upper(), command  # workers reach the GCS, never Redis
    # Every node outlasts a head's replacement (Ray's default: its processes exit after 60 s).
    for command in start_commands(config):
        assert "RAY_gcs_rpc_server_reconnect_timeout_s=600 " in command, command
    text = path.read_text()
    assert "requirepass " not in text and not re.search(r"--redis-password[= ](?!\"\$\(cat )", text)
    # The header says where the Redis comes from.
    provider = config["provider"]["type"]
    managed = {"aws": "ElastiCache", "gcp": "Memorystore", "local": "Redis Sentinel"}[provider]
    assert managed in text, f"{path.name}: say where the GCS's Redis comes from"


@pytest.mark.parametrize("path", LAUNCHERS, ids=ids(LAUNCHERS))
def test_every_node_serves_through_haproxy_and_direct_ingress(path):
    """HAProxy on every node's Serve port, in front of each Router replica's own server
    (app/ops/serving_mode.py): set on every `ray start`, head and workers, since each node runs
    its own HAProxy and Serve reads the flag in every process."""
    for command in start_commands(load_launcher(path)):
        assert "RAY_SERVE_ENABLE_HA_PROXY=1 " in command, command
        # HAProxy re-sends a request whose Router died without answering to another Router.
        assert f"RAY_SERVE_HAPROXY_RETRY_ON='{HAPROXY_RETRY_ON}' " in command, command


# ------------------------------------------------------------- setup: code and dependencies


def setup_commands(config: dict) -> list[str]:
    """Every command the launcher runs to set a node up, in the order it runs them."""
    commands = list(config.get("setup_commands", []))
    for key in ("head_setup_commands", "worker_setup_commands"):
        commands += config.get(key, [])
    for spec in (config.get("available_node_types") or {}).values():
        commands += spec.get("worker_setup_commands", [])
    return commands


def pip_installs(commands: list[str]) -> list[list[str]]:
    """The arguments after `pip install` of every install in these shell lines, in order."""
    found = []
    for command in commands:
        lexer = shlex.shlex(command, posix=True, punctuation_chars=True)
        lexer.whitespace_split, lexer.commenters = True, ""
        simple: list[str] = []
        for word in [*lexer, ";"]:  # split at ; && || | and if/then/else/fi
            if word in (";", "&&", "||", "|", "then", "else", "fi"):
                if "pip" in simple and simple[simple.index("pip") + 1 :][:1] == ["install"]:
                    found.append(simple[simple.index("pip") + 2 :])
                simple = []
            else:
                simple.append(word)
    return found


def requirements(args: list[str]) -> list[str]:
    """The positional requirements of a `pip install` argument list."""
    takes_value = {"--python", "--index-url", "--extra-index-url", "-r", "-e", "-c"}
    found, skip = [], False
    for word in args:
        if not skip and not word.startswith("-"):
            found.append(word)
        skip = word in takes_value
    return found


def makefile_pin(name: str) -> str:
    match = re.search(rf"^{name}\s*:=\s*(\S+)", (ROOT / "Makefile").read_text(), re.M)
    assert match, f"Makefile: no {name}"
    return match.group(1)


@pytest.mark.parametrize("path", LAUNCHERS, ids=ids(LAUNCHERS))
def test_every_command_is_a_valid_shell_line(path):
    """What the launcher runs is the YAML scalar: an unquoted ` #` starts a YAML comment and
    cuts the command (it once cut the .bashrc line in half, an unclosed quote)."""
    bash = shutil.which("bash") or pytest.skip("no bash")
    config = load_launcher(path)
    keys = ("head_start_ray_commands", "worker_start_ray_commands")
    for command in setup_commands(config) + [c for k in keys for c in config.get(k, [])]:
        checked = subprocess.run([bash, "-n", "-c", command], capture_output=True, text=True)
        assert checked.returncode == 0, f"{path.name}: {command!r}: {checked.stderr}"


@pytest.mark.parametrize("path", LAUNCHERS, ids=ids(LAUNCHERS))
def test_setup_installs_every_dependency_from_the_hashed_lock(path):
    """Three installs and no other: requirements.lock with --require-hashes (--no-deps: the lock
    is the whole closure, nothing resolved at boot), torch by the Makefile's pin (CPU or CUDA
    build, its index), the project itself with --no-deps; then `uv pip check`."""
    commands = setup_commands(load_launcher(path))
    installs = pip_installs(commands)
    torch = makefile_pin("TORCH")
    kinds = []
    for args in installs:
        if "-r" in args:
            assert args[args.index("-r") + 1] == "~/ray-rollout/requirements.lock", args
            assert "--require-hashes" in args and "--no-deps" in args, args
            assert requirements(args) == [], args
            kinds.append("lock")
        elif "-e" in args:
            assert args[args.index("-e") + 1] == "~/ray-rollout", args
            assert "--no-deps" in args and "--no-build-isolation" in args, args
            kinds.append("project")
        else:
            assert requirements(args) == [torch], (
                f"{path.name}: an install not from the lock: {args}"
            )
            kinds.append("torch")
    # the lock first, so torch's own dependencies (sympy, networkx, ...) come from it too
    assert kinds == ["lock", "torch", "torch", "project"], kinds
    assert "download.pytorch.org/whl/cpu" in " ".join(commands)  # the CPU build without a GPU
    assert commands[-1] == "~/.local/bin/uv pip check --python ~/venv/bin/python", commands[-1]


@pytest.mark.parametrize("path", LAUNCHERS, ids=ids(LAUNCHERS))
def test_setup_checks_out_a_commit_of_the_pinned_version(path):
    """A tag can be moved; a commit SHA cannot. RELEASE_COMMIT_SHA is the placeholder the
    operator replaces (`git rev-parse v<version>`); until then `git fetch` fails the setup."""
    setup = "\n".join(setup_commands(load_launcher(path)))
    fetched = re.findall(r"fetch --quiet origin (\S+)", setup)
    checked_out = re.findall(r"checkout --quiet --detach (\S+)", setup)
    assert len(checked_out) == 1 and fetched == checked_out, (fetched, checked_out)
    assert re.fullmatch(r"[0-9a-f]{40}|RELEASE_COMMIT_SHA", checked_out[0]), checked_out
    versions = re.findall(r"grep -qx 'version = \"([^\"]+)\"' ~/ray-rollout/pyproject.toml", setup)
    assert versions == [project_version()], versions  # the commit must be of this version
    assert setup.index("checkout") < setup.index("pyproject.toml") < setup.index("pip install")


def test_every_launcher_installs_the_same_commit_and_uv():
    setups = ["\n".join(setup_commands(load_launcher(p))) for p in LAUNCHERS]
    commits = {tuple(re.findall(r"checkout --quiet --detach (\S+)", s)) for s in setups}
    assert len(commits) == 1, commits
    uv = {tuple(re.findall(r"astral\.sh/uv/([^/]+)/install\.sh", s)) for s in setups}
    assert uv == {(makefile_pin("UV_VERSION"),)}, (
        "the uv that writes the lock (make lock) installs it"
    )


LOCK = ROOT / "requirements.lock"


def lock_entries() -> dict[str, tuple[str, list[str]]]:
    """requirements.lock: canonical name -> (pinned version, sha256 hashes)."""
    entries = {}
    for block in re.split(r"\n(?=\S)", LOCK.read_text()):
        if block.startswith("#") or not block.strip():
            continue
        match = re.match(r"([A-Za-z0-9_.-]+)==(\S+) \\\n", block)
        assert match, f"requirements.lock: not an exact pin with hashes: {block[:80]!r}"
        hashes = re.findall(r"--hash=sha256:([0-9a-f]{64})", block)
        assert hashes, f"requirements.lock: {match.group(1)} has no sha256 hash"
        entries[canonicalize_name(match.group(1))] = (match.group(2), hashes)
    return entries


def test_the_lock_covers_the_runtime_dependencies_with_hashes():
    """Every runtime dependency of pyproject.toml (and of ray's `serve` extra), its `mlflow`
    extra (`mlflow:` artifacts load on the nodes), the build backend (the project installs with
    --no-build-isolation) and the head's autoscaler libraries are pinned with hashes, at
    versions the pyproject allows."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

    entries = lock_entries()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    wanted = [Requirement(r) for r in pyproject["project"]["dependencies"]]
    wanted += [Requirement(r) for r in pyproject["project"]["optional-dependencies"]["mlflow"]]
    wanted += [Requirement(r) for r in pyproject["build-system"]["requires"]]
    wanted += [Requirement("boto3"), Requirement("google-api-python-client")]  # the autoscalers
    for requirement in wanted:
        name = canonicalize_name(requirement.name)
        assert name in entries, f"requirements.lock lacks {requirement} (run `make lock`)"
        assert requirement.specifier.contains(entries[name][0], prereleases=True), (
            f"requirements.lock pins {name}=={entries[name][0]}, pyproject wants {requirement}"
        )
    if metadata.version("ray") == entries["ray"][0]:  # its metadata is the locked release's
        linux = {"sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
                 "python_version": "3.11", "extra": "serve"}  # fmt: skip
        for line in metadata.requires("ray") or []:
            requirement = Requirement(line)
            if requirement.marker is None or requirement.marker.evaluate(linux):
                assert canonicalize_name(requirement.name) in entries, f"ray[serve]: {line}"
    # torch comes by version per node (CPU or CUDA build); the CUDA libraries only where the
    # CUDA torch pulls them in: not on every node from the lock.
    cuda = [
        n for n in entries if n == "torch" or n == "triton" or n.startswith(("nvidia-", "cuda-"))
    ]
    assert cuda == [], cuda


@pytest.mark.parametrize("path", CLOUD, ids=ids(CLOUD))
def test_cloud_cluster_shape(path):
    config = load_launcher(path)
    types = node_types(config)
    (head,) = [t for t in types if t.head]
    assert head.resources.get("GPU", 0) == 0, "the head runs no GPU work"
    gpu_workers = [t for t in types if not t.head and t.resources.get("GPU", 0) >= 1]
    assert gpu_workers, "a GPU worker type"
    for t in types:
        assert t.labels.get("region") == config["provider"]["region"], (t.name, t.labels)
        if not t.head:
            assert 0 <= t.min_workers <= t.max_workers, t
    assert sum(t.min_workers for t in types) <= config["max_workers"]


def test_onprem_recipe_labels_its_nodes_with_its_region():
    config = load_launcher(ROOT / "cluster/onprem.yaml")
    region = load_overlay(ROOT / "configs/regions/onprem.yaml").region
    for command in start_commands(config):
        assert f"--labels=region={region}" in command, command
    assert "--num-gpus=0" in config["head_start_ray_commands"][-1]


# ----------------------------------------------------------------------------- regions and fit


def test_every_cloud_launcher_has_a_region_overlay():
    overlays = {load_overlay(p).region: load_overlay(p) for p in OVERLAYS}
    for path in CLOUD:
        region = load_launcher(path)["provider"]["region"]
        assert region in overlays, f"{path.name}: no configs/regions/{region}.yaml"
        assert f"cluster/{path.name}" in overlays[region].clusters


@pytest.mark.parametrize("path", OVERLAYS, ids=ids(OVERLAYS))
def test_every_version_fits_a_node_type_in_its_region(path):
    overlay = load_overlay(path)
    document = render(load_yaml(ROOT / "serve_config.yaml"), overlay)
    demands = replica_demands(document)
    versions = [d for d in demands if d.deployment.startswith("recommender-")]
    assert {d.deployment for d in versions} == {"recommender-v1", "recommender-v2"}
    for name in overlay.clusters:
        launcher = load_launcher(ROOT / name)
        report = check_fit(demands, launcher, name)
        assert report.errors == [], report.errors
        types = node_types(launcher)
        if not any(t.resources for t in types):
            assert "not checked" in report.notes[0]  # on-prem: resources detected at ray start
            continue
        for demand in versions:
            fits = [t for t in types if t.missing(demand) is None]
            assert fits and all(not t.head for t in fits), (demand, fits)
            if demand.resources["GPU"] > 0:  # a GPU version lands only on GPU workers
                assert all(t.resources.get("GPU", 0) >= demand.resources["GPU"] for t in fits)


def us_east() -> tuple[dict, dict]:
    overlay = load_overlay(ROOT / "configs/regions/us-east-1.yaml")
    return render(load_yaml(ROOT / "serve_config.yaml"), overlay), load_launcher(
        ROOT / "cluster/aws-us-east-1.yaml"
    )


def test_a_version_wanting_two_gpus_fits_nowhere():
    document, launcher = us_east()
    version_app(document, "recommender-v2")["args"]["resources"]["num_gpus"] = 2
    errors = check_fit(replica_demands(document), launcher, "aws-us-east-1.yaml").errors
    assert len(errors) == 1 and "recommender-v2/recommender-v2" in errors[0], errors
    assert "fits no node type" in errors[0] and "gpu-worker: GPU 1 < 2" in errors[0]


def test_a_config_for_another_region_fits_no_node():
    document, _ = us_east()
    eu = load_launcher(ROOT / "cluster/aws-eu-west-1.yaml")
    errors = check_fit(replica_demands(document), eu, "aws-eu-west-1.yaml").errors
    assert errors and all("label region='eu-west-1', needs 'us-east-1'" in e for e in errors), (
        errors
    )


def test_max_replicas_beyond_max_workers_is_an_error():
    document, launcher = us_east()
    for deployment in version_app(document, "recommender-v1")["deployments"]:
        if deployment["name"] == "recommender-v1":
            deployment["autoscaling_config"]["max_replicas"] = 10  # 10 + 2 GPU replicas > 7 nodes
    errors = check_fit(replica_demands(document), launcher, "aws-us-east-1.yaml").errors
    assert len(errors) == 1 and "at max_replicas" in errors[0] and "recommender-v1" in errors[0], (
        errors
    )


def test_a_serve_ray_actor_options_override_replaces_the_builders():
    document, launcher = us_east()
    router_app(document)["deployments"].append(
        {"name": "Router", "ray_actor_options": {"num_cpus": 8}}  # Serve replaces the whole dict
    )
    demands = {d.deployment: d for d in replica_demands(document)}
    assert demands["Router"].resources["CPU"] == 8 and demands["Router"].selector is None
    errors = check_fit(list(demands.values()), launcher, "aws-us-east-1.yaml").errors
    assert any("recommender/Router" in e and "CPU 4 < 8" in e for e in errors), errors


def test_the_fit_leaves_room_for_a_rolling_update():
    """Serve replaces a deployment's replicas a batch at a time (max(1, 20%) of the target):
    old ones still stopping while new ones start. A cluster with exactly max_replicas GPU
    workers can never finish that update at max scale, so the fit check refuses it."""
    document, launcher = us_east()
    for node_type in launcher["available_node_types"].values():
        if node_type.get("resources", {}).get("GPU"):
            node_type["max_workers"] -= 1  # exactly v1 max 4 + v2 max 2
    errors = check_fit(replica_demands(document), launcher, "aws-us-east-1.yaml").errors
    assert errors and all("a rolling update of" in e for e in errors), errors
    assert any("recommender-v1/recommender-v1" in e for e in errors)


def test_version_apps_and_the_router_memory_are_demands():
    document, _ = us_east()
    demands = {d.deployment: d for d in replica_demands(document)}
    assert demands["recommender-v1"].app == "recommender-v1"
    assert demands["recommender-v1"].resources["GPU"] == 1
    assert (demands["recommender-v1"].min_replicas, demands["recommender-v1"].max_replicas) == (
        2,
        4,
    )
    assert demands["recommender-v1"].selector == {"region": "us-east-1"}
    assert demands["Router"].resources["memory"] == 1024 * 1024 * 1024


def _version_scaling_overrides(document: dict) -> list[tuple[str, dict]]:
    return [
        (d["name"], d["autoscaling_config"])
        for app in document["applications"]
        for d in app.get("deployments") or []
        if d["name"].startswith("recommender-") and "autoscaling_config" in d
    ]


@pytest.mark.parametrize("path", OVERLAYS, ids=ids(OVERLAYS))
def test_a_region_that_sizes_a_version_keeps_its_request_counting_policy(path):
    """Serve replaces a deployment's whole `autoscaling_config` with an override, policy
    included: without it the version falls back to Serve's default policy, which counts calls,
    and Router -> model micro-batching would hide its load (deployments/capacity_policy.py)."""
    document = render(load_yaml(ROOT / "serve_config.yaml"), load_overlay(path))
    for name, scaling in _version_scaling_overrides(document):
        function = (scaling.get("policy") or {}).get("policy_function")
        assert function == REQUEST_LOAD_POLICY, (path.name, name, scaling)


def test_the_kuberay_manifest_keeps_the_request_counting_policy():
    manifest, *_policies = yaml.safe_load_all(
        (ROOT / "cluster/kuberay/rayservice.yaml").read_text()
    )
    document = yaml.safe_load(manifest["spec"]["serveConfigV2"])
    overrides = _version_scaling_overrides(document)
    assert overrides  # the manifest sizes its versions
    for name, scaling in overrides:
        assert scaling["policy"]["policy_function"] == REQUEST_LOAD_POLICY, (name, scaling)
