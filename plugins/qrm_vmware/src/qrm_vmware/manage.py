"""What ``qrm vmware`` does: the plugin's rules, over core's services.

No vCenter call runs inside a database transaction: each function reads what
it needs and commits, talks to vCenter, then records the outcome in a new
transaction (as core's engine does with its drivers).
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

from qrm_core.plugin_api import InvalidInput, ServiceContext
from qrm_vmware import settings as vmware_settings
from qrm_vmware.connections import (
    Connection,
    ConnectionStore,
    check_ca_file,
    check_name,
    check_password,
    check_username,
    normalize_url,
    now_text,
    read_password_file,
)
from qrm_vmware.settings import VmwareSettings


def store(ctx: ServiceContext, settings: VmwareSettings | None = None) -> ConnectionStore:
    return ConnectionStore(ctx.settings, settings or vmware_settings.load())


def connect(
    ctx: ServiceContext,
    *,
    name: str,
    url: str,
    username: str,
    password: str | None = None,
    password_file: Path | None = None,
    insecure: bool = False,
    ca_file: str | None = None,
    replace_existing: bool = False,
) -> dict[str, Any]:
    """Log in to vCenter (or ESXi) once to prove the connection works, then store it."""
    name = check_name(name)
    url = normalize_url(url)
    username = check_username(username)
    if password is not None and password_file is not None:
        raise InvalidInput("give the password with -p or --password-file, not both")
    if password_file is not None:
        secret = read_password_file(password_file)
    elif password is not None:
        secret = check_password(password)
    else:
        raise InvalidInput("give the password with -p PASSWORD or --password-file FILE")
    if insecure and ca_file:
        raise InvalidInput("--insecure turns the certificate check off; --ca-file makes no sense with it")
    ca = check_ca_file(ca_file)
    settings = vmware_settings.load()
    connections = store(ctx, settings)
    if not replace_existing and connections.exists(ctx, name):
        connections.put(ctx, Connection(name, url, username, secret), replace_existing=False)  # raises
    ctx.commit()  # nothing is held open while vCenter answers
    connection = Connection(
        name=name, url=url, username=username, password=secret, insecure=insecure, ca_file=ca
    )
    from qrm_vmware import vsphere

    session = vsphere.Session(connection, settings).login()
    try:
        about = session.about
        connection = replace(
            connection,
            instance_uuid=str(about.instanceUuid or ""),
            api_type=str(about.apiType or ""),
            created_at=now_text(),
        )
        product = f"{about.fullName}"
    finally:
        session.logout()
    connections.put(ctx, connection, replace_existing=replace_existing)
    ctx.record(
        "vmware",
        name,
        f"vCenter connection {name} {'replaced' if replace_existing else 'added'}: {url} as {username} "
        f"({product}; certificate check {'OFF (--insecure)' if insecure else 'on'})",
    )
    ctx.commit()
    vsphere.POOL.forget(name)  # a replaced connection logs in afresh
    return connection.public()


def list_connections(ctx: ServiceContext) -> list[dict[str, Any]]:
    return [c.public() for c in store(ctx).list(ctx)]


def show_connection(ctx: ServiceContext, name: str) -> dict[str, Any]:
    return store(ctx).get(ctx, name, with_password=False).public()


def remove_connection(ctx: ServiceContext, name: str) -> dict[str, Any]:
    """Forget a connection. The hosts it imported stay as resources, turned off
    and marked as gone (nothing syncs them any more); 'qrm resource remove'
    forgets them."""
    from qrm_core.plugin_api import sync_managed_hosts

    name = check_name(name)
    connections = store(ctx)
    shown = connections.get(ctx, name, with_password=False).public()
    connections.remove(ctx, name)
    ctx.record("vmware", name, f"vCenter connection {name} removed")
    ctx.commit()
    report = sync_managed_hosts(ctx, f"vmware:{name}", [])  # its hosts: kept, off, marked
    shown["hosts_left"] = sorted(report.removed)
    try:
        from qrm_vmware import vsphere
    except ImportError:  # pyVmomi missing: no session to drop either
        return shown
    vsphere.POOL.forget(name)
    return shown
