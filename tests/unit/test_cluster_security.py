"""What Ray's cluster launcher will do to the network with cluster/*.yaml, offline.

The declared rules are not the whole story: left to itself, Ray's AWS provider creates a
security group and adds SSH from 0.0.0.0/0 plus all traffic within the group
(`_create_default_inbound_rules` in ray/autoscaler/_private/aws/config.py), and picks only
subnets that give instances a public IP unless `use_internal_ips` is set (`_usable_subnet_ids`);
its GCP provider attaches an external IP (`ONE_TO_ONE_NAT`) to every node whose node_config has
no `networkInterfaces` (`_configure_subnet` in .../gcp/config.py). So these tests run Ray's own
code, the code `ray up` runs, against a fake cloud and look at what it asks the cloud for:

    prepare_config -> provider bootstrap_config -> NodeProvider.create_node, per node type

Ray's provider modules are private API: they are imported here by name, on purpose (what they
do is the subject), and nowhere else; `prepare_config` comes through app/ray_compat.py.
Faked: the cloud API objects (boto3's EC2 resource; googleapiclient's Compute resource) and
the steps that only touch identity, not the network (the IAM role or service account, the SSH
key pair, the GCP project lookup). `test_..._bootstrap_steps_are_the_ones_reviewed` fails when a
Ray upgrade adds a step, so that it gets read before these tests are trusted again. Where the
SDKs are not installed (boto3, google-api-python-client are head-node packages, not test
dependencies), stand-in modules let Ray's provider modules import; every call into them fails.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import importlib.util
import inspect
import re
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from app import ray_compat
from app.config import project_root
from app.ops.placement import load_launcher

ROOT = project_root()
LAUNCHERS = sorted((ROOT / "cluster").glob("*.yaml"))
AWS = [p for p in LAUNCHERS if load_launcher(p)["provider"]["type"] == "aws"]
GCP = [p for p in LAUNCHERS if load_launcher(p)["provider"]["type"] == "gcp"]
WORLD = ("0.0.0.0/0", "::/0")


def ids(paths: list[Path]) -> list[str]:
    return [p.stem for p in paths]


# ----------------------------------------------------------------- importing Ray's providers


def _offline(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("offline test: Ray called the real cloud SDK")


def _cls(name: str, base: type = object) -> type:
    return type(name, (base,), {"__init__": lambda self, *a, **k: None})


# Stand-ins, per top-level package, used only when the real package is not installed.
_STANDINS: dict[str, dict[str, dict[str, Any]]] = {
    "boto3": {
        "boto3": {"__version__": "1.34.0", "resource": _offline, "client": _offline},
        "boto3.exceptions": {"ResourceNotExistsError": _cls("ResourceNotExistsError", Exception)},
        "boto3.resources": {},
        "boto3.resources.base": {"ServiceResource": _cls("ServiceResource")},
    },
    "botocore": {
        "botocore": {},
        "botocore.exceptions": {"ClientError": _cls("ClientError", Exception)},
        "botocore.client": {"BaseClient": _cls("BaseClient")},
        "botocore.config": {"Config": _cls("Config")},
    },
    "googleapiclient": {
        "googleapiclient": {},
        "googleapiclient.discovery": {"Resource": _cls("Resource"), "build": _offline},
        "googleapiclient.errors": {"HttpError": _cls("HttpError", Exception)},
    },
    "google_auth_httplib2": {"google_auth_httplib2": {"AuthorizedHttp": _cls("AuthorizedHttp")}},
    "httplib2": {"httplib2": {"Http": _cls("Http")}},
}


def _installed(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


@contextlib.contextmanager
def _ray_provider(cloud: str, *modules: str) -> Iterator[list[types.ModuleType]]:
    """Fresh imports of Ray's `cloud` provider modules (patch them freely), with stand-ins for
    missing SDKs; sys.modules is as before afterwards."""
    prefix = f"ray.autoscaler._private.{cloud}"
    standins = {
        name: attrs
        for top, group in _STANDINS.items()
        if not _installed(top)
        for name, attrs in group.items()
    }
    saved = {k: v for k, v in sys.modules.items() if k.startswith(prefix) or k in standins}
    try:
        for name in [k for k in sys.modules if k.startswith(prefix)]:
            del sys.modules[name]
        for name, attrs in standins.items():
            module = types.ModuleType(name)
            module.__dict__.update(attrs)
            sys.modules[name] = module
            parent, _, child = name.rpartition(".")
            if parent:
                setattr(sys.modules[parent], child, module)
        yield [importlib.import_module(f"{prefix}.{m}") for m in modules]
    finally:
        for name in [k for k in sys.modules if k.startswith(prefix) or k in standins]:
            del sys.modules[name]
        sys.modules.update(saved)
        package = sys.modules["ray.autoscaler._private"]  # its attribute too, not the patched one
        if prefix in saved:
            setattr(package, cloud, saved[prefix])
        elif hasattr(package, cloud):
            delattr(package, cloud)


def _launch_tags(name: str, head: bool) -> dict[str, str]:
    from ray.autoscaler.tags import (
        NODE_KIND_HEAD,
        NODE_KIND_WORKER,
        TAG_RAY_LAUNCH_CONFIG,
        TAG_RAY_NODE_KIND,
        TAG_RAY_NODE_NAME,
        TAG_RAY_USER_NODE_TYPE,
    )

    return {
        TAG_RAY_NODE_KIND: NODE_KIND_HEAD if head else NODE_KIND_WORKER,
        TAG_RAY_NODE_NAME: f"ray-test-{'head' if head else 'worker'}",
        TAG_RAY_USER_NODE_TYPE: name,
        TAG_RAY_LAUNCH_CONFIG: "offline-test",
    }


def _create_every_node_type(provider_cls: Any, config: dict[str, Any]) -> None:
    """What `ray up` (the head) and the autoscaler (each worker type) ask the provider for."""
    provider = provider_cls(config["provider"], config["cluster_name"])
    for name, node_type in config["available_node_types"].items():
        head = name == config["head_node_type"]
        provider.create_node(copy.deepcopy(node_type["node_config"]), _launch_tags(name, head), 1)


def _bootstrap_steps(function: Any) -> list[str]:
    return re.findall(r"\b(_configure_\w+|_check_ami)\(", inspect.getsource(function))


# ------------------------------------------------------------------------------------ AWS


@dataclass
class FakeSubnet:
    subnet_id: str
    vpc_id: str
    availability_zone: str
    map_public_ip_on_launch: bool
    state: str = "available"


@dataclass
class FakeSecurityGroup:
    id: str
    group_name: str
    vpc_id: str
    ip_permissions: list[dict[str, Any]] = field(default_factory=list)

    def authorize_ingress(self, IpPermissions: list[dict[str, Any]]) -> None:  # noqa: N803 (boto3's name)
        self.ip_permissions.extend(IpPermissions)


class _Collection:
    """boto3's `ec2.subnets` / `ec2.security_groups`: all() and filter(Filters=...)."""

    FILTERS = {"subnet-id": "subnet_id", "group-id": "id", "vpc-id": "vpc_id"}

    def __init__(self, items: list[Any]) -> None:
        self.items = items

    def all(self) -> list[Any]:
        return list(self.items)

    def filter(self, Filters: list[dict[str, Any]]) -> list[Any]:  # noqa: N803
        found = list(self.items)
        for f in Filters:  # a filter this fake does not know fails loudly (KeyError)
            found = [i for i in found if getattr(i, self.FILTERS[f["Name"]]) in f["Values"]]
        return found


class FakeEC2:
    """An AWS account as Ray's launcher sees it: a VPC holding the subnets and security groups
    the file names (private: no public IP on launch), and the default VPC every account has,
    with a public subnet per availability zone. Records what Ray creates and launches."""

    def __init__(self, config: dict[str, Any]) -> None:
        azs = config["provider"]["availability_zone"].split(",")
        configs = [t["node_config"] for t in config["available_node_types"].values()]
        named = list(dict.fromkeys(s for c in configs for s in c.get("SubnetIds", [])))
        groups = list(dict.fromkeys(g for c in configs for g in c.get("SecurityGroupIds", [])))
        self.subnets = _Collection(
            [FakeSubnet(s, "vpc-private", azs[i % len(azs)], False) for i, s in enumerate(named)]
            + [FakeSubnet(f"subnet-default-{az}", "vpc-default", az, True) for az in azs]
        )
        # Created beforehand by the operator; empty here, so any rule Ray adds shows.
        self.security_groups = _Collection(
            [FakeSecurityGroup(g, f"operator-{g}", "vpc-private") for g in groups]
        )
        self.meta = types.SimpleNamespace(client=self)  # the client API lives here too
        self.created_groups: list[FakeSecurityGroup] = []
        self.launched: list[dict[str, Any]] = []

    def subnet(self, subnet_id: str) -> FakeSubnet:
        (subnet,) = [s for s in self.subnets.items if s.subnet_id == subnet_id]
        return subnet

    def create_security_group(self, GroupName: str, VpcId: str, **_: Any) -> None:  # noqa: N803
        group = FakeSecurityGroup(f"sg-created-{len(self.created_groups)}", GroupName, VpcId)
        self.security_groups.items.append(group)
        self.created_groups.append(group)

    def create_instances(self, **request: Any) -> list[Any]:
        self.launched.append(copy.deepcopy(request))
        n = len(self.launched)
        return [types.SimpleNamespace(id=f"i-{n}", instance_id=f"i-{n}",
                                      state={"Name": "pending"}, state_reason=None)]  # fmt: skip

    def rules_added(self) -> list[dict[str, Any]]:
        return [rule for g in self.security_groups.items for rule in g.ip_permissions]

    def public_ip(self, request: dict[str, Any]) -> bool:
        """Whether EC2 gives the instance of this RunInstances request a public IP."""
        interfaces = request.get("NetworkInterfaces")
        if interfaces:
            return any(i.get("AssociatePublicIpAddress") for i in interfaces)
        return self.subnet(request["SubnetId"]).map_public_ip_on_launch


AWS_BOOTSTRAP_STEPS = [
    "_configure_from_launch_template",
    "_configure_from_network_interfaces",
    "_configure_iam_role",  # faked: the head's instance profile
    "_configure_key_pair",  # faked: the SSH key pair
    "_configure_subnet",  # Ray's: which subnets, public or private
    "_configure_security_group",  # Ray's: creates a group and its rules unless given
    "_check_ami",
]


def _with_key_pair(config: dict[str, Any]) -> dict[str, Any]:
    config["auth"]["ssh_private_key"] = "~/.ssh/offline-test.pem"
    for node_type in config["available_node_types"].values():
        node_type["node_config"].setdefault("KeyName", "offline-test")
    return config


def launch_aws(config: dict[str, Any]) -> FakeEC2:
    """Run Ray's AWS bootstrap and create_node for every node type against a FakeEC2."""
    prepare_config, _ = ray_compat.autoscaler_config_checks()
    ec2 = FakeEC2(config)
    with _ray_provider("aws", "config", "node_provider") as (aws_config, aws_provider):
        assert _bootstrap_steps(aws_config.bootstrap_aws) == AWS_BOOTSTRAP_STEPS
        aws_config._resource = lambda name, _config: ec2 if name == "ec2" else _offline()
        aws_config._client = lambda name, _config: ec2 if name == "ec2" else _offline()
        aws_config._configure_iam_role = lambda c: c
        aws_config._configure_key_pair = _with_key_pair
        aws_provider.make_ec2_resource = lambda **_: ec2
        prepared = prepare_config(copy.deepcopy(config))
        provider_cls = aws_provider.AWSNodeProvider  # what Ray's registry picks for type: aws
        _create_every_node_type(provider_cls, provider_cls.bootstrap_config(prepared))
    return ec2


def open_to_the_world(rule: dict[str, Any]) -> bool:
    cidrs = [r.get("CidrIp") for r in rule.get("IpRanges", [])]
    cidrs += [r.get("CidrIpv6") for r in rule.get("Ipv6Ranges", [])]
    return any(c in WORLD for c in cidrs)


def _as_ray_left_alone(config: dict[str, Any]) -> dict[str, Any]:
    """The file without what keeps Ray's defaults out (the shape of the files before)."""
    config = copy.deepcopy(config)
    config["provider"].pop("use_internal_ips", None)
    for node_type in config["available_node_types"].values():
        node_type["node_config"].pop("SubnetIds", None)
        node_type["node_config"].pop("SecurityGroupIds", None)
    return config


def test_aws_bootstrap_steps_are_the_ones_reviewed():
    with _ray_provider("aws", "config") as (aws_config,):
        assert _bootstrap_steps(aws_config.bootstrap_aws) == AWS_BOOTSTRAP_STEPS, (
            "Ray's bootstrap_aws changed: read the new steps, then update AWS_BOOTSTRAP_STEPS"
        )


@pytest.mark.parametrize("path", AWS, ids=ids(AWS))
def test_rays_aws_launcher_adds_no_rule_and_no_group(path):
    config = load_launcher(path)
    ec2 = launch_aws(config)
    assert [g.group_name for g in ec2.created_groups] == []
    assert ec2.rules_added() == []  # so none from 0.0.0.0/0 or ::/0 either
    declared = config["provider"].get("security_group", {}).get("IpPermissions", [])
    assert not [r for r in declared if open_to_the_world(r)], declared


@pytest.mark.parametrize("path", AWS, ids=ids(AWS))
def test_rays_aws_launcher_puts_every_node_in_the_named_private_subnets(path):
    config = load_launcher(path)
    assert config["provider"].get("use_internal_ips") is True  # Ray SSHes to internal IPs
    ec2 = launch_aws(config)
    types_ = config["available_node_types"]
    assert len(ec2.launched) == len(types_)
    for request, (name, node_type) in zip(ec2.launched, types_.items()):
        declared = node_type["node_config"]
        assert request["SubnetId"] in declared["SubnetIds"], (name, request["SubnetId"])
        assert ec2.subnet(request["SubnetId"]).vpc_id == "vpc-private", name
        assert not ec2.public_ip(request), f"{name} would get a public IP"
        assert request["SecurityGroupIds"] == declared["SecurityGroupIds"], name


@pytest.mark.parametrize("path", AWS, ids=ids(AWS))
def test_without_use_internal_ips_ray_refuses_the_private_subnets(path):
    """Ray keeps only subnets that map public IPs unless use_internal_ips is set: the flag is
    what lets the nodes stay private, not decoration."""
    from click import ClickException

    config = load_launcher(path)
    config["provider"].pop("use_internal_ips")
    with pytest.raises(ClickException, match="must map public IPs"):
        launch_aws(config)


def test_the_aws_check_sees_rays_defaults():
    """Control: the same file without SubnetIds, SecurityGroupIds and use_internal_ips (as the
    files were): Ray creates a group that opens SSH to the world and launches every node in a
    public subnet. If this fails, Ray changed its defaults: re-read its AWS provider."""
    ec2 = launch_aws(_as_ray_left_alone(load_launcher(ROOT / "cluster/aws-us-east-1.yaml")))
    assert len(ec2.created_groups) == 1
    ssh = [r for r in ec2.rules_added() if r.get("FromPort") == 22 and open_to_the_world(r)]
    assert ssh, ec2.rules_added()
    assert ec2.launched and all(ec2.public_ip(r) for r in ec2.launched)


# ------------------------------------------------------------------------------------ GCP


class _Request:
    def __init__(self, result: dict[str, Any]) -> None:
        self.result = result

    def execute(self, http: Any = None) -> dict[str, Any]:
        return self.result


class FakeCompute:
    """The Compute API as Ray's GCP launcher uses it: subnetworks().list (its default subnet
    lookup), instances().insert (recorded), zoneOperations().get. Nothing else exists here, so
    a firewall call (or any other) fails the test."""

    def __init__(self, config: dict[str, Any]) -> None:
        provider = config["provider"]
        self.default_subnet = {
            "selfLink": f"projects/{provider['project_id']}/regions/{provider['region']}"
            "/subnetworks/default"
        }
        self.inserted: list[dict[str, Any]] = []
        self._http = types.SimpleNamespace(credentials=None)

    def subnetworks(self) -> Any:
        return types.SimpleNamespace(list=lambda **_: _Request({"items": [self.default_subnet]}))

    def instances(self) -> Any:
        def insert(**request: Any) -> _Request:
            self.inserted.append(copy.deepcopy(request))
            return _Request({"name": f"operation-{len(self.inserted)}"})

        return types.SimpleNamespace(insert=insert)

    def zoneOperations(self) -> Any:  # noqa: N802 (the API's name)
        return types.SimpleNamespace(get=lambda **kw: _Request({"name": kw["operation"],
                                                                "status": "DONE"}))  # fmt: skip


GCP_BOOTSTRAP_STEPS = [
    "_configure_project",  # faked: looks the project up
    "_configure_iam_role",  # faked: the service account
    "_configure_key_pair",  # faked: the SSH key in project metadata
    "_configure_subnet",  # Ray's: adds an external IP to nodes without networkInterfaces
]


def launch_gcp(config: dict[str, Any]) -> FakeCompute:
    """Run Ray's GCP bootstrap and create_node for every node type against a FakeCompute."""
    prepare_config, _ = ray_compat.autoscaler_config_checks()
    compute = FakeCompute(config)
    with _ray_provider("gcp", "config", "node_provider") as (gcp_config, gcp_provider):
        assert _bootstrap_steps(gcp_config.bootstrap_gcp) == GCP_BOOTSTRAP_STEPS
        clients = lambda _provider: (None, None, compute, None)  # noqa: E731
        gcp_config.construct_clients_from_provider_config = clients
        gcp_provider.construct_clients_from_provider_config = clients
        gcp_config._configure_project = lambda c, _crm: c
        gcp_config._configure_iam_role = lambda c, _crm, _iam: c
        gcp_config._configure_key_pair = lambda c, _compute: c
        prepared = prepare_config(copy.deepcopy(config))
        provider_cls = gcp_provider.GCPNodeProvider  # what Ray's registry picks for type: gcp
        _create_every_node_type(provider_cls, provider_cls.bootstrap_config(prepared))
    return compute


def test_gcp_bootstrap_steps_are_the_ones_reviewed():
    with _ray_provider("gcp", "config") as (gcp_config,):
        assert _bootstrap_steps(gcp_config.bootstrap_gcp) == GCP_BOOTSTRAP_STEPS, (
            "Ray's bootstrap_gcp changed: read the new steps, then update GCP_BOOTSTRAP_STEPS"
        )


@pytest.mark.parametrize("path", GCP, ids=ids(GCP))
def test_rays_gcp_launcher_gives_no_node_an_external_ip(path):
    config = load_launcher(path)
    provider = config["provider"]
    assert provider.get("use_internal_ips") is True  # no external IP to SSH to
    compute = launch_gcp(config)
    assert len(compute.inserted) == len(config["available_node_types"])
    for request in compute.inserted:
        body = request["body"]
        assert body["networkInterfaces"], body["name"]
        for interface in body["networkInterfaces"]:
            assert "accessConfigs" not in interface, (body["name"], interface)  # no external IP
            assert f"/regions/{provider['region']}/subnetworks/" in interface["subnetwork"]
        assert body["tags"]["items"] == [f"ray-rollout-{provider['region']}"]  # firewall target


def test_the_gcp_check_sees_rays_defaults():
    """Control: without networkInterfaces (as the file was), Ray gives every node an
    external IP (ONE_TO_ONE_NAT) on the project's first subnet."""
    config = copy.deepcopy(load_launcher(GCP[0]))
    for node_type in config["available_node_types"].values():
        node_type["node_config"].pop("networkInterfaces")
    compute = launch_gcp(config)
    for request in compute.inserted:
        (interface,) = request["body"]["networkInterfaces"]
        assert interface["accessConfigs"][0]["type"] == "ONE_TO_ONE_NAT"
