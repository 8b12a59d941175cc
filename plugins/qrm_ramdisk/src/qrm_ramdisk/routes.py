"""``GET /plugins/ramdisk/<storage>/<volume>``: the archive, to the machines it is exported to.

Booting machines fetch their root filesystem here before they have any
credentials (like the kernel and initrd under ``/boot/...``), so access is by
the client's IP address: the storage driver records the IP of every machine
the volume is exported to (when the machine is assigned to the VE), and
anything else gets 403. Put qrm server where machines reach it directly (a
proxy would make every request come from the proxy's address).

The route says what it answers (the archive, 403, the names it takes) in
``responses=`` and the parameters' patterns, so the server's OpenAPI document
describes it; core adds the error body, 404 and 422, and answers errors and
methods the path does not have (405 with ``Allow``) in JSON.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Request
from fastapi.responses import FileResponse

from qrm_core.plugin_api import get_settings
from qrm_ramdisk.driver import NAME_RE, ROUTE_PREFIX, Volumes
from qrm_ramdisk.settings import load_settings

router = APIRouter(prefix=ROUTE_PREFIX, tags=["ramdisk"])


def _core_settings(request: Request) -> Any:
    return getattr(request.app.state, "settings", None) or get_settings()


#: A storage server's or a volume's name, as the driver takes it (``NAME_RE``).
Name = Annotated[str, Path(min_length=1, max_length=64, pattern=NAME_RE.pattern)]


@router.api_route(
    "/{storage}/{location}",
    methods=["GET", "HEAD"],
    response_class=FileResponse,
    responses={
        200: {
            "description": "the volume's root filesystem (a gzip-compressed tar archive)",
            "content": {"application/gzip": {"schema": {"type": "string", "format": "binary"}}},
        },
        403: {"description": "the volume is not exported to the client's address"},
    },
)
def archive(request: Request, storage: Name, location: Name) -> FileResponse:
    """The volume's root filesystem archive (``application/gzip``)."""
    if not NAME_RE.match(storage) or not NAME_RE.match(location):
        raise HTTPException(status_code=404, detail="no such volume")
    volumes = Volumes(load_settings().effective_root(_core_settings(request)), storage)
    path = volumes.archive(location)
    if not path.is_file():
        raise HTTPException(status_code=404, detail="no such volume")
    client = request.client.host if request.client is not None else ""
    if not volumes.allowed(location, client):
        raise HTTPException(
            status_code=403, detail=f"volume {storage}/{location} is not exported to {client or 'you'}"
        )
    return FileResponse(path, media_type="application/gzip", filename=f"{location}.tar.gz")
