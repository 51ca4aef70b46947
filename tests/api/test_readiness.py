"""``/readyz`` is what load balancers and Kubernetes route on: not ready (503) while
the database is unreachable or no configured model can serve, with ``/health``
keeping its detail for humans. Real gateway, real upstream servers, real PostgreSQL."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from servelm.catalog.specs import Catalog, ModelSpec
from tests.conftest import (
    LiveServer,
    drop_pg_database,
    make_settings,
    new_pg_database,
    start_server,
)
from tests.servers import ThreadServer, serve_in_thread
from tests.support import instant_upstream
from tests.support.scripted_engine import scripted_factory


def remote(slug: str, *urls: str) -> ModelSpec:
    # Probes every 0.1 s: an ejection shows within a few of them.
    return ModelSpec(slug=slug, engine="openai", replicas=urls, health_interval=0.1)  # type: ignore[arg-type]


def wait_for(check: Callable[[], Any], timeout: float = 30) -> Any:
    """Polls ``check`` until it returns something truthy (no fixed sleep)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        got = check()
        if got:
            return got
        time.sleep(0.05)
    raise AssertionError(f"not within {timeout} s: {check.__doc__ or check}")


def readyz(srv: LiveServer) -> httpx.Response:
    return httpx.get(f"{srv.base_url}/readyz", timeout=10)


@pytest.fixture
def upstreams() -> Iterator[list[ThreadServer]]:
    servers = [serve_in_thread(instant_upstream.make_app()) for _ in range(2)]
    yield servers
    for s in servers:
        s.stop()


def test_not_ready_once_every_replica_of_every_remote_model_is_ejected(
    tmp_path: Path, upstreams: list[ThreadServer]
) -> None:
    a, b = upstreams
    catalog = Catalog([remote("one", f"{a.base_url}/v1"), remote("two", f"{b.base_url}/v1")])
    srv = start_server(make_settings(tmp_path, tmp_path / "models"), catalog)
    try:
        assert readyz(srv).status_code == 200
        a.stop()
        # One model still has a replica in rotation: the gateway can serve it.
        wait_for(lambda: _states(srv)["one"] == ["ejected"])
        assert readyz(srv).status_code == 200
        b.stop()
        wait_for(lambda: readyz(srv).status_code == 503)
        body = readyz(srv).json()
        assert body["problems"] == ["no model can serve: every replica is ejected"]
        # /health keeps answering, with each replica's state, for whoever looks.
        assert _states(srv) == {"one": ["ejected"], "two": ["ejected"]}
    finally:
        srv.stop()


def test_a_loaded_local_engine_keeps_the_gateway_ready(tmp_path: Path) -> None:
    """The remote model's only replica was never up; the local one serves."""
    dead = f"http://127.0.0.1:{_closed_port()}/v1"
    local = ModelSpec(slug="local", engine="openai", base_url="http://scripted.invalid/v1")
    catalog = Catalog([local, remote("far", dead)])

    def factory(spec: ModelSpec, settings: Any) -> Any:
        from servelm.engines.registry import build_engine

        return (
            scripted_factory(spec, settings)
            if spec.slug == "local"
            else build_engine(spec, settings)
        )

    srv = start_server(
        make_settings(tmp_path, tmp_path / "models"), catalog, engine_factory=factory
    )
    try:
        assert _states(srv)["far"] == ["ejected"]
        assert readyz(srv).status_code == 200
    finally:
        srv.stop()


@pytest.mark.postgres
def test_not_ready_while_the_database_is_unreachable(
    tmp_path: Path, upstreams: list[ThreadServer]
) -> None:
    url = new_pg_database()
    settings = make_settings(tmp_path, tmp_path / "models", database_url=url)
    srv = start_server(settings, Catalog([remote("one", f"{upstreams[0].base_url}/v1")]))
    try:
        assert readyz(srv).status_code == 200
        # The database goes away under the running gateway (its connections cut).
        drop_pg_database(url)
        response = wait_for(lambda: (r := readyz(srv)).status_code == 503 and r)
        (problem,) = response.json()["problems"]
        assert problem.startswith("database: "), problem
        # Liveness is the loop alone: restarting the process would not bring the
        # database back.
        assert httpx.get(f"{srv.base_url}/healthz", timeout=10).status_code == 200
        assert httpx.get(f"{srv.base_url}/health", timeout=10).status_code == 200
    finally:
        srv.stop()


def _states(srv: LiveServer) -> dict[str, list[str]]:
    models = httpx.get(f"{srv.base_url}/health", timeout=10).json()["models"]
    return {slug: [r["state"] for r in m.get("replicas", [])] for slug, m in models.items()}


def _closed_port() -> int:
    from tests.conftest import free_port

    return free_port()  # nothing listens there
