"""`tests.support.serving.settled`, what `Cluster.wait_running` waits for before a test
snapshots replica ids: a RUNNING application whose replicas are not all up yet is not
settled (the hot-patch test once counted a v2 replica still starting as a restart)."""

from __future__ import annotations

import copy

import pytest

from tests.support.serving import settled


def _app(**v2: object) -> dict:
    deployment = {"status": "HEALTHY", "target_num_replicas": 1,
                  "replicas": [{"replica_id": "a", "state": "RUNNING"}]}  # fmt: skip
    return {
        "status": "RUNNING",
        "deployments": {
            "Router": copy.deepcopy(deployment),
            "recommender-v2": {**deployment, **v2},
        },
    }


def test_every_replica_running_at_target_is_settled():
    assert settled(_app())


@pytest.mark.parametrize(
    "v2",
    [
        {"replicas": [{"replica_id": "b", "state": "STARTING"}]},  # RUNNING app, replica starting
        {"replicas": []},
        {
            "replicas": [
                {"replica_id": "a", "state": "RUNNING"},
                {"replica_id": "b", "state": "STOPPING"},
            ]
        },
        {"target_num_replicas": 2},
        {"status": "UPDATING"},
    ],
)
def test_a_replica_not_yet_up_is_not_settled(v2):
    assert not settled(_app(**v2))


def test_an_app_not_running_or_absent_is_not_settled():
    assert not settled(None)
    assert not settled({**_app(), "status": "DEPLOYING"})
    assert not settled({"status": "RUNNING", "deployments": {}})
