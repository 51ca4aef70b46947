"""``servelm serve --workers N``: one listening socket, N gateway processes, one model copy.

A gateway process is one event loop on one core. Several share a node like this:

- The supervisor (``serve``) runs the first start (migrations, the first key) once,
  then hands the port to uvicorn's own worker supervisor: uvicorn binds the socket in
  the parent and passes it to N spawned children, each of which builds its own app
  (``worker_app``) with its own loop, billing and connection pools. The kernel spreads
  accepted connections over them; uvicorn restarts a child that dies.
- Local llama.cpp models are NOT loaded N times. One engine process (``python -m
  servelm.processes.multiproc host``, started before the workers) owns the model pool
  (each loaded model in a process of its own below it: ``engines.llamacpp_process``)
  and serves them over loopback to the workers only: a bearer token made for this
  run, the engine seam's two operations (count a prompt, stream a completion) and
  nothing else. In each worker the model's engine is a ``HostedEngine``: the OpenAI upstream
  engine pointed at that process, plus the prompt count, which the engine process
  makes whenever a worker asks (``prompt_count`` decides when that is).
- Keys and credits stay in the workers, in the shared database: holds are
  conditional updates there, so N processes can no more overspend than N threads.
  Rate limits and key revocations go through Redis, which ``serve`` therefore
  requires for N > 1 (tests/billing/test_workers.py).

Models behind ``engine = "openai"`` need nothing of this: each worker relays to them.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, ClassVar

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp

from servelm.access.keys import WorkerKey
from servelm.api import conn_guard
from servelm.catalog.specs import Catalog, ModelSpec
from servelm.chat.serving import ChatService
from servelm.config import Settings
from servelm.engines import http1
from servelm.engines.base import Engine
from servelm.engines.llamacpp_process import die_with_parent
from servelm.engines.pool import ModelPool, cold_start_behind
from servelm.engines.upstream import OpenAIUpstreamEngine
from servelm.errors import EngineError, InvalidRequest, ModelUnavailable, Overloaded, ServelmError
from servelm.processes.lifecycle import Lifecycle
from servelm.telemetry import tracing

log = logging.getLogger(__name__)

# Supervisor → engine process and workers. Private plumbing, not settings.
_SETTINGS = "_SERVELM_MP_SETTINGS"  # the supervisor's Settings, as JSON
_HOST = "_SERVELM_MP_HOST"  # the engine process's /v1 URL
_TOKEN = "_SERVELM_MP_TOKEN"  # its bearer token
_HOSTED = "_SERVELM_MP_HOSTED"  # {"loaded": [slug...], "unavailable": {slug: reason}}
_FD = "_SERVELM_MP_FD"  # the engine process's listening socket
_SUPERVISOR = "_SERVELM_MP_SUPERVISOR"  # the supervisor's pid


def _local(catalog: Catalog) -> list[ModelSpec]:
    from servelm.engines.registry import is_local

    return [spec for spec in catalog if is_local(spec)]


# -- the supervisor -----------------------------------------------------------------


def serve(settings: Settings, workers: int) -> None:
    """Run ``workers`` gateway processes on ``settings.host:port`` until stopped."""
    import uvicorn

    from servelm.catalog.models_file import load_catalog

    env = {_SETTINGS: settings.model_dump_json(), _SUPERVISOR: str(os.getpid())}
    host: subprocess.Popen[bytes] | None = None
    if _local(load_catalog(settings.model_dir, settings.models_file)):
        token = secrets.token_urlsafe(32)
        host, url, hosted = _start_host(settings, token)
        env |= {_HOST: url, _TOKEN: token, _HOSTED: json.dumps(hosted)}
    # One /metrics over all workers (telemetry.metrics): the workers' counters in files
    # here, summed by whichever worker answers the scrape.
    metrics_dir, own_dir = _metrics_dir()
    env["PROMETHEUS_MULTIPROC_DIR"] = metrics_dir
    # Spawned children inherit the environment: that is how they get all of this.
    os.environ.update(env)
    try:
        uvicorn.run(
            "servelm.processes.multiproc:worker_app",
            factory=True,
            workers=workers,
            host=settings.host,
            port=settings.port,
            # By name: the workers are spawned, and each sets its limits (worker_app).
            http="servelm.processes.multiproc:WorkerProtocol",
            **conn_guard.uvicorn_options(settings),
        )
    finally:
        if own_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)
        if host is not None:
            host.terminate()
            try:
                host.wait(timeout=30)
            except subprocess.TimeoutExpired:
                host.kill()


def _metrics_dir() -> tuple[str, bool]:
    """The operator's ``PROMETHEUS_MULTIPROC_DIR``, emptied (a previous run's counters
    would be summed in), or a fresh one of this run's own (then True: removed at the end)."""
    given = os.environ.get("PROMETHEUS_MULTIPROC_DIR")
    if not given:
        return tempfile.mkdtemp(prefix="servelm-metrics-"), True
    os.makedirs(given, exist_ok=True)
    for name in os.listdir(given):
        if name.endswith(".db"):
            os.unlink(os.path.join(given, name))
    return given, False


def _start_host(
    settings: Settings, token: str, timeout: float = 600
) -> tuple[subprocess.Popen[bytes], str, dict[str, Any]]:
    """Start the engine process on a loopback socket bound here (no port race) and
    wait until its models are loaded; returns it, its URL and what it loaded."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    port = sock.getsockname()[1]
    env = {**os.environ, _SETTINGS: settings.model_dump_json(), _TOKEN: token}
    env[_FD] = str(sock.fileno())
    proc = subprocess.Popen(
        [sys.executable, "-m", "servelm.processes.multiproc", "host"],
        env=env,
        pass_fds=(sock.fileno(),),
        preexec_fn=_die_with_parent,
    )
    sock.close()  # the engine process has its own copy
    url = f"http://127.0.0.1:{port}/v1"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the engine process exited with {proc.returncode}")
        try:
            hosted = _get_json(port, "/v1/hosted", token)
        except OSError:
            time.sleep(0.1)  # still loading the models: it listens once they are in
            continue
        log.info("engine process %d serves %s", proc.pid, ", ".join(hosted["loaded"]) or "none")
        return proc, url, hosted
    proc.kill()
    raise RuntimeError(f"the engine process was not ready in {timeout:.0f} s")


def _get_json(port: int, path: str, token: str) -> dict[str, Any]:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
    try:
        conn.request("GET", path, headers={"authorization": f"Bearer {token}"})
        resp = conn.getresponse()
        if resp.status != 200:
            raise ConnectionError(f"{path}: HTTP {resp.status}")
        data: dict[str, Any] = json.loads(resp.read())
        return data
    finally:
        conn.close()


def _die_with_parent() -> None:
    """A SIGTERM when the supervisor dies, even by SIGKILL: in the engine process
    (before exec), so no orphan keeps the model's memory, and in each worker."""
    die_with_parent(signal.SIGTERM)


# -- a worker -----------------------------------------------------------------------


class WorkerProtocol(conn_guard.GuardedHttpTools):
    """A worker's HTTP protocol: uvicorn imports it by name in each worker, whose
    ``worker_app`` sets its limits before the first connection."""

    per_ip: ClassVar[dict[str, int]] = {}


def worker_app() -> ASGIApp:
    """uvicorn's factory in each worker process: the usual app, local models reached
    through the engine process."""
    from servelm.api.app import create_app
    from servelm.engines.registry import build_engine, is_local
    from servelm.telemetry import logs

    settings = Settings.model_validate_json(os.environ[_SETTINGS])
    logs.setup(settings.log_level, settings.json_logs)
    tracing.setup(settings, "servelm-gateway")
    WorkerProtocol.limits = conn_guard.ConnLimits.from_settings(settings)
    # A supervisor that dies, even by SIGKILL, takes its workers along: each gets a
    # SIGTERM and drains, rather than serving on as an orphan that holds the port
    # (uvicorn starts every worker from the supervisor's main thread, the thread
    # whose end the kernel watches). If it died before this line, leave now.
    _die_with_parent()
    if os.getppid() != int(os.environ[_SUPERVISOR]):
        os.kill(os.getpid(), signal.SIGTERM)
    hosted = json.loads(os.environ.get(_HOSTED, '{"loaded": [], "unavailable": {}}'))

    def engines(spec: ModelSpec, s: Settings) -> Engine:
        if not is_local(spec):
            return build_engine(spec, s)
        if spec.slug in hosted["loaded"]:
            return HostedEngine(
                spec,
                os.environ[_HOST],
                os.environ[_TOKEN],
                queue_size=s.queue_size,
                count_prompts=s.prompt_count != "bound",
            )
        raise ModelUnavailable(
            hosted["unavailable"].get(spec.slug, "the engine process did not load it")
        )

    return create_app(settings, engine_factory=engines)


def _has_images(body: dict[str, Any]) -> bool:
    return any(
        isinstance(m.get("content"), list)
        and any(p.get("type") == "image_url" for p in m["content"] if isinstance(p, dict))
        for m in body.get("messages", ())
    )


class HostedEngine(OpenAIUpstreamEngine):
    """A local model that the engine process runs: relayed like an upstream, with the
    prompt counted there exactly as the in-process engine counts it."""

    def __init__(
        self, spec: ModelSpec, url: str, token: str, *, queue_size: int, count_prompts: bool = True
    ) -> None:
        # The engine process admits and queues (its slots); each worker only relays.
        # The engine process answers through the same front end as a servelm worker:
        # the prompt's count with the first chunk wherever it counted it before
        # generating, else the late count (``count_prompt_after``) settles it.
        relay = spec.model_copy(
            update={
                "engine": "openai",
                "base_url": url,
                "api_key": token,
                "slots": None,
                "upstream_kind": "servelm",
            }
        )
        super().__init__(relay, queue_size=queue_size)
        # Always a stream from the engine process: it is cancellable, and a local
        # model's tokens come far slower than a relay wakes up for them.
        self._plain_calls = False
        self._images_exact = True
        self._count_prompts = count_prompts

    async def count_prompt_tokens(self, body: dict[str, Any]) -> int | None:
        if not self._count_prompts:
            return None  # prompt_count = "bound": as the in-process engine
        return await self._count(body)

    async def count_prompt_after(self, body: dict[str, Any]) -> int | None:
        tokens = await self._count(body)
        return tokens if self.prompt_count_exact(body) else None

    async def _count(self, body: dict[str, Any]) -> int:
        payload = json.dumps({**body, "model": self.spec.slug}).encode()
        try:
            resp = await self.replicas.all[0].pool.request(
                "POST", "/count", payload, headers=tracing.hop_headers()
            )
            async with resp:
                raw = await resp.read()
                if resp.status_code != 200:
                    raise await self._status_error_from(resp.status_code, raw)
        except http1.HTTPError as exc:
            raise EngineError(f"the engine process did not count the prompt: {exc}") from exc
        data = json.loads(raw)
        if isinstance(data.get("cold_start_ms"), int):
            cold_start_behind(data["cold_start_ms"])
        self._images_exact = bool(data["images_exact"])
        return int(data["tokens"])

    def prompt_count_exact(self, body: dict[str, Any]) -> bool:
        return self._images_exact or not _has_images(body)

    def counts_late(self, body: dict[str, Any]) -> bool:
        return self._count_prompts

    async def _status_error(self, resp: http1.Response) -> ServelmError:
        return await self._status_error_from(resp.status_code, await resp.read())

    async def _status_error_from(self, status: int, raw: bytes) -> ServelmError:
        try:
            err = json.loads(raw)["error"]
        except (ValueError, KeyError, TypeError):
            return EngineError(f"the engine process answered HTTP {status}")
        # The engine process speaks our own errors: keep their kind (503 stays a 503).
        if status == 503:
            return Overloaded(str(err.get("message")), retry_after=1)
        if 400 <= status < 500:
            return _as_error(err, status)
        return EngineError(str(err.get("message")))


def _as_error(err: dict[str, Any], status: int) -> ServelmError:
    from servelm.engines.base import map_engine_error

    if err.get("code") == "context_length_exceeded":
        from servelm.errors import ContextWindowExceeded

        return ContextWindowExceeded(str(err.get("message")), param=err.get("param"))
    return map_engine_error({"message": err.get("message"), "code": status})


# -- the engine process ---------------------------------------------------------------


def host_app(catalog: Catalog, settings: Settings, token: str) -> Starlette:
    """The engine seam over loopback, for this run's workers only (the token): count a
    prompt (``/v1/count``), and chat through the same front end as every process
    (``servelm.processes.worker.engine_front``), its caller owning no account: keys and credits
    are the workers'."""
    from servelm.api.services import front, install_front
    from servelm.processes.worker import engine_front

    key = WorkerKey(token)
    lifecycle = Lifecycle(request_timeout=settings.request_timeout)
    # Its engines count whenever asked: whether to ask (``prompt_count``) is the
    # workers' decision, and a worker in "bound" mode still asks after a stream cut
    # short (``count_prompt_after``). This process owns the model pool: local models
    # load at their first request from any worker, within that request's deadline
    # here, and unload when idle (``engines.pool``).
    counting = settings.model_copy(update={"prompt_count": "exact"})
    models = ModelPool(_local(catalog), counting, deadline=lifecycle.current_deadline)
    unavailable = models.unavailable
    # The workers ask for the prompt count before they hold credits (``/v1/count``):
    # "auto" spares a second count here wherever the bound decides nothing.
    chat = ChatService(catalog, models, authenticator=key, prompt_count="auto")
    # A worker sends the body it prepared, with its images fetched and inlined as data
    # URIs: room for those on top of the client's own limit.
    limits = settings.media_limits()
    inlined = limits.max_images * limits.max_image_bytes * 4 // 3

    def check(request: Request) -> None:
        key.check(None, request.headers.get("authorization"))

    async def hosted(request: Request) -> Response:
        check(request)
        # What the workers may relay: every model this process can serve, loaded
        # now or at its first request.
        served = sorted(spec.slug for spec in catalog if models.servable(spec.slug))
        return JSONResponse({"loaded": served, "unavailable": unavailable})

    async def count(request: Request) -> Response:
        check(request)
        try:
            body = json.loads(await request.body())
        except ValueError as exc:
            raise InvalidRequest("The body is not JSON.") from exc
        spec = catalog.get(str(body.get("model")))
        if spec is None or not models.servable(spec.slug):
            raise ModelUnavailable(f"the engine process has no model '{body.get('model')}'")
        lease = await models.acquire(spec)  # counting needs the model loaded too
        try:
            tokens = await lease.engine.count_prompt_tokens(body)
        finally:
            lease.release()
        images_exact = getattr(lease.engine, "image_tokens", None) is not None
        # A load paid here, before the chat call, is the worker's client's to hear of.
        return JSONResponse(
            {"tokens": tokens, "images_exact": images_exact, "cold_start_ms": lease.cold_start_ms}
        )

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await models.start()
        install_front(app, front(app).serving(chat))
        lifecycle.ready = True
        try:
            yield
        finally:
            await lifecycle.close()
            await models.close()

    front_settings = settings.model_copy(
        update={"max_body_bytes": settings.max_body_bytes + inlined}
    )
    return engine_front(
        front_settings,
        [
            Route("/v1/hosted", hosted, methods=["GET"]),
            Route("/v1/count", count, methods=["POST"]),
        ],
        lifespan,
        lifecycle,
    )


def host_main() -> None:
    import uvicorn

    from servelm.catalog.models_file import load_catalog
    from servelm.telemetry import logs

    settings = Settings.model_validate_json(os.environ[_SETTINGS])
    logs.setup(settings.log_level, settings.json_logs)
    tracing.setup(settings, "servelm-engine")
    WorkerProtocol.limits = conn_guard.ConnLimits.from_settings(settings)
    catalog = Catalog(_local(load_catalog(settings.model_dir, settings.models_file)))
    app = host_app(catalog, settings, os.environ[_TOKEN])
    sock = socket.socket(fileno=int(os.environ[_FD]))
    config = uvicorn.Config(app, log_config=None, access_log=False, timeout_graceful_shutdown=5)
    server = uvicorn.Server(config)
    # The socket is already listening: workers' connections queue until the models
    # are loaded and the lifespan has finished, and then they are served.
    asyncio.run(server.serve(sockets=[sock]))


if __name__ == "__main__" and sys.argv[1:] == ["host"]:
    host_main()
