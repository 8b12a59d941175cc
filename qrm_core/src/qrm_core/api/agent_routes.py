"""The node-agent endpoints (``/agent/v1``) and the boot files served over HTTP."""

from __future__ import annotations

import json
import re
import time
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from qrm_core.api.deps import bearer, get_ctx
from qrm_core.api.openapi import ENROLLMENT_SECURITY, MACHINE_SECURITY
from qrm_core.errors import AuthError, NotFound
from qrm_core.models import MAX_ID
from qrm_core.services import ServiceContext, agent, boot, service_context, site

router = APIRouter()
Ctx = Annotated[ServiceContext, Depends(get_ctx)]

#: The header with which a live agent that registers again proves it is the
#: machine (its current per-resource token); see docs/agent-protocol.md.
PROOF_HEADER = "X-Qrm-Agent-Token"

_IMAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


class RegisterRequest(BaseModel):
    model_config = ConfigDict(strict=True)  # JSON types as the document says them

    mac: str = Field(max_length=32)
    ip: str | None = Field(default=None, max_length=64)
    cpus: int = Field(ge=0, le=4096)
    memory_mb: int = Field(ge=0, le=64 * 1024 * 1024)
    hostname: str | None = Field(default=None, max_length=64)
    hypervisors: list[str] = Field(default_factory=list, max_length=16)
    boot_generation: int = Field(default=0, ge=0, le=MAX_ID)
    mode: Literal["idle", "ve"] = "idle"
    ve: str | None = Field(default=None, max_length=64)
    # Where the agent registers from: "initrd" (before a VE's root is mounted) or "ve".
    stage: Literal["initrd", "ve"] | None = None


class RegisterResponse(BaseModel):
    resource_id: int
    token: str
    heartbeat_interval: float
    state: str
    boot_generation: int
    # Non-empty: do not mount the VE's root yet (its image is being reverted); ask again.
    hold: str = ""


class HeartbeatRequest(BaseModel):
    model_config = ConfigDict(strict=True)  # JSON types as the document says them

    resource_id: int = Field(ge=1, le=MAX_ID)
    state: Literal["idle", "active", "failed", "filling"]
    reason: str | None = Field(default=None, max_length=200)
    load: float | None = Field(default=None, ge=0, le=1e6)
    boot_generation: int = Field(default=0, ge=0, le=MAX_ID)
    # Filling the VE's image from the machine's local disk (docs/agent-protocol.md).
    fill_bytes: int | None = Field(default=None, ge=0, le=2**62)
    fill_total: int | None = Field(default=None, ge=0, le=2**62)
    fill_device: str | None = Field(default=None, max_length=128)
    fill_result: Literal["done", "failed"] | None = None


class HeartbeatResponse(BaseModel):
    command: Literal["none", "reboot", "halt"]
    heartbeat_interval: float
    boot_generation: int


def _count(request: Request, endpoint: str, outcome: str) -> None:
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.agent_requests.labels(endpoint=endpoint, outcome=outcome).inc()


def _enrollment(ctx: ServiceContext, request: Request) -> None:
    cache = request.app.state.enrollment
    token = bearer(request)
    if token is None or not cache.check(ctx, token):
        raise AuthError("wrong or missing enrollment token")


# The two endpoints every machine calls all the time open their service
# context themselves instead of through the ``Ctx`` dependency: a dependency
# with ``yield`` runs its start and its end in the thread pool, two more
# thread hand-overs per request (about 0.4 ms of CPU, measured in bench/server).


def _json(model: BaseModel) -> Response:
    """The answer as a finished response: FastAPI would otherwise validate and
    serialize the returned model again, in one more thread-pool hand-over."""
    return Response(model.model_dump_json(), media_type="application/json")


#: Seconds between the heartbeats of a machine that has just registered idle while VEs
#: wait for resources (the agent's shortest interval), for :data:`SOON_FOR` seconds.
SOON_INTERVAL = 1.0
SOON_FOR = 10.0


def _placing(request: Request) -> Any:
    """The engine of this server when its last pass left VEs waiting for resources."""
    runner = getattr(request.app.state, "engine", None)
    return runner if runner is not None and getattr(runner, "waiting_for_resources", False) else None


def _soon(request: Request) -> dict[int, float]:
    """Machines registered idle while VEs waited: resource id -> when (monotonic)."""
    state = request.app.state
    if not hasattr(state, "heartbeat_soon"):
        state.heartbeat_soon = {}
    soon: dict[int, float] = state.heartbeat_soon
    return soon


def _arrived_idle(request: Request, resource_id: int, interval: float) -> float:
    """A machine registered idle: if VEs wait for resources, run the engine now (it may
    be theirs) and have the machine heartbeat every second for a while, so that it hears
    where to boot within a second instead of an interval. The interval to answer."""
    runner = _placing(request)
    if runner is None:
        return interval
    runner.wake()
    soon = _soon(request)
    now = time.monotonic()
    if len(soon) > 1000:  # a burst of arrivals: forget the old ones
        for rid in [r for r, at in soon.items() if now - at > SOON_FOR]:
            del soon[rid]
    soon[resource_id] = now
    return min(interval, SOON_INTERVAL)


def _idle_interval(request: Request, resource_id: int, interval: float) -> float:
    """The interval for an idle machine's heartbeat: a second while it arrived lately
    and VEs still wait for resources, else the site's."""
    soon = getattr(request.app.state, "heartbeat_soon", None)
    if not soon or resource_id not in soon:
        return interval
    if time.monotonic() - soon[resource_id] > SOON_FOR or _placing(request) is None:
        del soon[resource_id]
        return interval
    return min(interval, SOON_INTERVAL)


def _agent_ctx(request: Request) -> AbstractContextManager[ServiceContext]:
    state = request.app.state
    return service_context(state.settings, actor="anonymous", plugins=state.plugins, check_schema=False)


@router.post(
    "/agent/v1/register",
    tags=["agent"],
    response_model=RegisterResponse,
    openapi_extra={"security": ENROLLMENT_SECURITY},
)
def register(request: Request, body: RegisterRequest) -> Response:
    try:
        with _agent_ctx(request) as ctx:
            _enrollment(ctx, request)
            ctx.actor = f"agent:{body.mac}"[:64]
            result = agent.register(
                ctx,
                mac=body.mac,
                ip=body.ip,
                cpus=body.cpus,
                memory_mb=body.memory_mb,
                hostname=body.hostname,
                hypervisors=body.hypervisors,
                boot_generation=body.boot_generation,
                mode=body.mode,
                ve=body.ve,
                source=request.client.host if request.client else None,
                proof=request.headers.get(PROOF_HEADER),
                stage=body.stage,
            )
    except Exception:
        _count(request, "register", "error")
        raise
    _count(request, "register", "ok")
    answer = RegisterResponse(**result.__dict__)
    if body.mode == "idle" and result.state == "idle":
        answer.heartbeat_interval = _arrived_idle(request, result.resource_id, answer.heartbeat_interval)
    return _json(answer)


@router.post(
    "/agent/v1/heartbeat",
    tags=["agent"],
    response_model=HeartbeatResponse,
    openapi_extra={"security": MACHINE_SECURITY},
)
def heartbeat(request: Request, body: HeartbeatRequest) -> Response:
    try:
        with _agent_ctx(request) as ctx:
            ctx.actor = f"agent:{body.resource_id}"
            answer = agent.heartbeat(
                ctx,
                resource_id=body.resource_id,
                token=bearer(request),
                state=body.state,
                load=body.load,
                boot_generation=body.boot_generation,
                reason=body.reason,
                fill_bytes=body.fill_bytes,
                fill_total=body.fill_total,
                fill_device=body.fill_device,
                fill_result=body.fill_result,
            )
    except Exception:
        _count(request, "heartbeat", "error")
        raise
    _count(request, "heartbeat", "ok")
    said = HeartbeatResponse(**answer.__dict__)
    if body.state == "idle" and said.command == "none":
        said.heartbeat_interval = _idle_interval(request, body.resource_id, said.heartbeat_interval)
    return _json(said)


class RootSecretsRequest(BaseModel):
    model_config = ConfigDict(strict=True)  # JSON types as the document says them

    resource_id: int = Field(ge=1, le=MAX_ID)
    boot_generation: int = Field(default=0, ge=0, le=MAX_ID)


@router.post(
    "/agent/v1/root-secrets",
    tags=["agent"],
    response_model=dict[str, str],
    openapi_extra={"security": MACHINE_SECURITY},
)
def root_secrets(request: Request, body: RootSecretsRequest) -> Response:
    """The credentials of the VE root this machine is booting (CHAP for an iSCSI root):
    for the machine's own token and current boot only; an empty object when the root
    needs none. Never logged."""
    with _agent_ctx(request) as ctx:
        ctx.actor = f"agent:{body.resource_id}"
        secrets = boot.root_secrets(
            ctx, resource_id=body.resource_id, token=bearer(request), boot_generation=body.boot_generation
        )
    return Response(json.dumps(secrets), media_type="application/json", headers={"Cache-Control": "no-store"})


@router.get("/agent/v1/boot/{mac}", tags=["agent"], openapi_extra={"security": ENROLLMENT_SECURITY})
def boot_config(request: Request, ctx: Ctx, mac: str) -> boot.BootConfig:
    """What this MAC boots now (for boot services near the machines); needs the enrollment token."""
    _enrollment(ctx, request)
    state = request.app.state
    return boot.boot_config(
        ctx, mac, server_url=state.server_url, enrollment_token=site.get_enrollment_token(ctx)
    )


@router.get("/boot/{image}/{file}", tags=["agent"])
def boot_file(request: Request, ctx: Ctx, image: str, file: Literal["vmlinuz", "initrd"]) -> FileResponse:
    """A boot image's kernel or initrd (what iPXE fetches; no credentials, like TFTP)."""
    if not _IMAGE_NAME.fullmatch(image):
        raise NotFound("no such boot file")
    kernel, initrd = boot.boot_image_files(ctx, image)
    path = kernel if file == "vmlinuz" else initrd
    if not path or not Path(path).is_file():
        raise NotFound(f"boot image {image!r} has no {file}")
    return FileResponse(path, media_type="application/octet-stream", filename=file)
