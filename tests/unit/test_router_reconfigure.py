"""Router.reconfigure in version_apps mode (F7): an update that waits for its versions must
never win over a newer one from Serve. The real method on a stand-in for the replica (no Ray):
version lookups are slow fakes, as describe() calls to a starting application are."""

from __future__ import annotations

import asyncio

from deployments.router import Router

RouterClass = Router.func_or_class  # the class under @serve.deployment


class FakeSync:
    def __init__(self, router: FakeRouter) -> None:
        self.router = router

    def ensure_running(self) -> None:
        pass

    async def resolve_versions(self, versions: set[str]) -> None:
        for version in sorted(versions - set(self.router.handles)):
            await asyncio.sleep(0.2)  # describe() of a version's application
            if version not in self.router.deployed:
                raise ValueError(f"version {version!r} is not deployed")
            self.router.handles[version] = object()


class FakeDispatcher:
    def reconfigure(self, breaker) -> None:
        pass


class FakeRouter:
    """What Router.reconfigure touches on a replica, nothing else."""

    reconfigure = RouterClass.reconfigure
    retry_pending = RouterClass.retry_pending
    _apply_declared = RouterClass._apply_declared

    def __init__(self) -> None:
        self.version_apps = True
        self._reconfigures = 0
        self._pending = None
        self.rejected = None
        self.table = None
        self.declared = None
        self.override = None
        self.handles: dict[str, object] = {}
        self.deployed = {"v1"}  # v3's application is still starting
        self.sync = FakeSync(self)
        self.dispatcher = FakeDispatcher()
        self.cache = FakeDispatcher()


A = {"stable": "v1", "weights": {"v1": 50, "v3": 50}}  # deploy 1
B = {"stable": "v1", "weights": {"v1": 95, "v3": 5}}  # deploy 2, the operator's correction


def test_the_newest_update_wins_over_an_older_one_the_health_poll_retries():
    async def scenario() -> FakeRouter:
        router = FakeRouter()
        await router.reconfigure(A)  # v3 not up yet: A waits
        assert router._pending is not None and router.table is None
        router.deployed.add("v3")
        serve_delivers_b = asyncio.create_task(router.reconfigure(B))
        await asyncio.sleep(0.1)  # the health poll fires while B waits on v3's describe()
        await asyncio.gather(serve_delivers_b, router.retry_pending())
        await router.retry_pending()  # and once more later: nothing is left to retry
        return router

    router = asyncio.run(scenario())
    assert dict(router.table.weights) == {"v1": 95.0, "v3": 5.0}  # was {v1: 50, v3: 50}
    assert router._pending is None and router.rejected is None


def test_a_waiting_update_is_applied_by_the_poll_once_its_versions_answer():
    async def scenario() -> FakeRouter:
        router = FakeRouter()
        await router.reconfigure(A)
        router.deployed.add("v3")
        await router.retry_pending()
        return router

    router = asyncio.run(scenario())
    assert dict(router.table.weights) == {"v1": 50.0, "v3": 50.0}
    assert router._pending is None


def test_the_controllers_traffic_a_router_cannot_apply_shows_in_status_until_it_can():
    """F20: a refused rollout traffic used to be only a log line (and retried every 10 s by the
    long-poll). Now `refused_override` holds it for /status and the health poll retries it."""
    from deployments.router_sync import RouterSync

    async def scenario() -> FakeRouter:
        router = FakeRouter()
        router.deployed.add("v3")
        await router.reconfigure({"stable": "v1", "weights": {"v1": 100}})
        router.refused_override = None
        sync = RouterSync.__new__(RouterSync)
        sync.router = router
        override = {"generation": 7, "weights": {"v1": 90, "v9": 10}, "stable": "v1",
                    "shadow": "declared"}  # fmt: skip
        sync._apply_override(override)
        refused = dict(router.refused_override)
        assert dict(router.table.weights) == {"v1": 100.0}  # the table in force keeps serving
        router.handles["v9"] = object()  # v9's application answers now
        sync._apply_override(override)  # what the next health poll does
        return router, refused

    router, refused = asyncio.run(scenario())
    assert refused["generation"] == 7 and "v9" in refused["error"]
    assert router.refused_override is None and dict(router.table.weights)["v9"] == 10.0
