"""Power controllers of machines that are not VMs (BMCs, PDUs): how a power
driver sees a resource, and ``qrm resource power on|off|reset|status``."""

from __future__ import annotations

from qrm_core.drivers.base import PowerTarget
from qrm_core.errors import InUse, InvalidInput, QrmError
from qrm_core.models import EventLevel, PowerStatePublic, Resource, ResourceState
from qrm_core.services import ServiceContext, public


def power_target(row: Resource) -> PowerTarget | None:
    """The resource's power controller, or None if it has none configured."""
    if not row.power_driver:
        return None
    assert row.id is not None
    return PowerTarget(
        resource_id=row.id,
        mac=row.mac,
        address=row.power_address,
        username=row.power_username,
        password=row.power_password,
        settings=dict(row.host_settings or {}),
    )


#: What ``qrm resource power`` can do.
POWER_ACTIONS = ("on", "off", "reset", "status")


def power(ctx: ServiceContext, ref: str | int, action: str) -> PowerStatePublic:
    """Turn a machine with a power controller on or off, reset it, or ask its state.

    Off is refused while the machine serves a virtual environment (stop the
    VE first; failover fences failed machines by itself); a machine turned off
    is ``off``. A reset raises its boot generation (the boot timeout applies
    until it registers again). The driver is called with no transaction open;
    every action but ``status`` records an event.
    """
    from qrm_core.services.resources import can_transition, find_resource_row, transition

    if action not in POWER_ACTIONS:
        raise InvalidInput(f"unknown power action {action!r}; use {', '.join(POWER_ACTIONS)}")
    row = find_resource_row(ctx, ref)
    label = public.resource_label(row)
    target = power_target(row)
    if target is None or not row.power_driver:
        raise InvalidInput(
            f"resource {label} has no power controller; set one with "
            f"'qrm resource set {label} --power-driver NAME --power-address ADDRESS'"
        )
    if action == "off" and row.ve_id is not None:
        raise InUse(f"resource {label} serves a virtual environment; stop it first")
    name = row.power_driver
    resource_id = row.id
    ctx.commit()  # no transaction open while the controller is asked
    driver = ctx.plugins.power_driver(name)
    if action == "reset" and "reset" not in driver.supported_operations(target):
        raise driver.unsupported("reset", target.label)
    driver.validate(target)
    try:
        if action == "on":
            driver.power_on(target)
        elif action == "off":
            driver.power_off(target, force=True)
        elif action == "reset":
            driver.reset(target)
        state = driver.power_state(target)
    except QrmError as exc:
        if action != "status":
            ctx.record(
                "resource",
                label,
                f"power {action} of {label} through {name} failed: {exc.message}",
                level=EventLevel.ERROR,
            )
            ctx.commit()
        raise
    if action != "status":
        row = find_resource_row(ctx, resource_id or 0)
        if action == "off" and row.state != ResourceState.OFF.value and can_transition(row.state, "off"):
            transition(ctx, row, ResourceState.OFF, f"powered off through {name}")
        if action == "reset" and row.last_seen is not None:
            row.boot_generation += 1
            ctx.session.add(row)
        ctx.record("resource", label, f"power {action} of {label} through {name}: it is {state}")
        ctx.commit()
    return PowerStatePublic(resource=label, driver=name, action=action, state=state)
