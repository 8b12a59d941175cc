"""Concurrent operators, agents and engines: every resource serves at most one VE.

Real threads against SQLite, PostgreSQL and MariaDB, each with its own session
(as concurrent API requests and server processes have).
"""

import threading
from collections import Counter

from sqlmodel import select

from qrm_core.engine.reconciler import Reconciler
from qrm_core.models import Resource, VirtualEnvironment
from qrm_core.services import agent, boot_images, service_context, storage
from qrm_core.services import virtual_environments as ves


def _run_all(*targets) -> list[BaseException]:
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(targets))

    def wrap(fn):
        def run():
            barrier.wait()
            try:
                fn()
            except BaseException as exc:  # collected and checked by the test
                errors.append(exc)

        return run

    threads = [threading.Thread(target=wrap(t)) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return errors


def _base(ctx) -> None:
    storage.add_storage(ctx, name="st", type="fake", address="10.0.0.2")
    storage.add_filesystem_image(ctx, name="root", storage="st", location="/r")
    boot_images.add_boot_image(ctx, name="idle", kernel_version="6.1")


def _register(settings, plugins, mac, ip):
    with service_context(settings, actor="agent", plugins=plugins) as ctx:
        return agent.register(ctx, mac=mac, ip=ip, cpus=2, memory_mb=1024)


def test_two_operators_start_the_same_ve(qrm_ctx, qrm_settings, qrm_plugins) -> None:
    _base(qrm_ctx)
    ves.create_ve(qrm_ctx, name="web", boot_image="idle", fs_image="root")
    for i in range(3):
        _register(qrm_settings, qrm_plugins, f"52:54:00:00:00:0{i + 1}", f"10.0.0.{i + 10}")

    def start():
        with service_context(qrm_settings, plugins=qrm_plugins) as ctx:
            ves.start_ve(ctx, "web")

    def reconcile():
        Reconciler(qrm_settings, qrm_plugins).tick()

    assert _run_all(start, start, start) == []
    assert _run_all(reconcile, reconcile) == []
    with service_context(qrm_settings, plugins=qrm_plugins) as ctx:
        members = ctx.session.exec(select(Resource).where(Resource.ve_id.is_not(None))).all()
        ve = ctx.session.exec(select(VirtualEnvironment)).one()
    assert len(members) == 1 and ve.desired_state == "running"


def test_two_ves_want_the_last_idle_resource(qrm_ctx, qrm_settings, qrm_plugins) -> None:
    _base(qrm_ctx)
    for name in ("a", "b", "c", "d"):  # one image each: a VE that writes its image has it alone
        storage.add_filesystem_image(qrm_ctx, name=f"root-{name}", storage="st", location=f"/r-{name}")
        ves.create_ve(qrm_ctx, name=name, boot_image="idle", fs_image=f"root-{name}")
    _register(qrm_settings, qrm_plugins, "52:54:00:00:00:01", "10.0.0.10")
    _register(qrm_settings, qrm_plugins, "52:54:00:00:00:02", "10.0.0.11")

    def starter(name):
        def start():
            with service_context(qrm_settings, plugins=qrm_plugins) as ctx:
                ves.start_ve(ctx, name)

        return start

    def reconcile():
        for _ in range(3):
            Reconciler(qrm_settings, qrm_plugins).tick()

    assert _run_all(*(starter(n) for n in "abcd")) == []
    # Four engines at once (as if the leader lock had failed): the guarded
    # updates still give each resource to one VE only.
    assert _run_all(reconcile, reconcile, reconcile, reconcile) == []
    with service_context(qrm_settings, plugins=qrm_plugins) as ctx:
        rows = ctx.session.exec(select(Resource)).all()
        per_ve = Counter(r.ve_id for r in rows if r.ve_id is not None)
        problems = [v.problem for v in ctx.session.exec(select(VirtualEnvironment)) if v.problem]
    assert all(r.ve_id is not None for r in rows)
    assert sorted(per_ve.values()) == [1, 1]
    assert len(problems) == 2 and all("no idle resource is left" in p for p in problems)


def test_one_machine_registering_twice_at_once(qrm_settings, qrm_plugins, qrm_ctx) -> None:
    results = []

    def reg():
        results.append(_register(qrm_settings, qrm_plugins, "52:54:00:00:00:99", "10.0.0.99"))

    # One registration wins; the others find its agent alive and are refused (issue 15).
    errors = _run_all(reg, reg, reg, reg)
    assert len(results) == 1 and len(errors) == 3
    assert all(isinstance(e, agent.RegistrationRefused) for e in errors)
    with service_context(qrm_settings, plugins=qrm_plugins) as ctx:
        assert len(ctx.session.exec(select(Resource)).all()) == 1
