"""Creating and upgrading a qrm installation (``qrm init``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from qrm_core import db
from qrm_core.models import InitPublic
from qrm_core.services import service_context, site, users

if TYPE_CHECKING:
    from qrm_core.config import Settings
    from qrm_core.plugins import PluginSystem


def safe_url(url: str) -> str:
    """The database URL without its password, for display."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001
        return "<invalid URL>"


def init(
    settings: Settings,
    *,
    admin_password: str | None = None,
    actor: str | None = None,
    plugins: PluginSystem | None = None,
    boot_image: bool | None = None,
    progress: Any = None,
) -> InitPublic:
    """Create or upgrade the schema, make sure the admin user exists, and (when
    ``boot_image``, default: ``settings.init_boot_image``) that idle machines
    have a default boot image to boot."""
    if admin_password is not None:  # refused before anything is created
        users.check_password_policy(admin_password, users.DEFAULT_ADMIN)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    engine = db.get_engine(settings)
    before, after = db.upgrade(engine)
    with service_context(settings, actor=actor, plugins=plugins) as ctx:
        if before != after:
            ctx.record(
                "database",
                "schema",
                f"database schema {'created' if before is None else 'upgraded from ' + before} at {after}",
            )
            ctx.commit()
        admin, created = users.ensure_admin(ctx, admin_password)
        # Created here so that boot lookups (read-only) never have to.
        site.get_enrollment_token(ctx)
        default = users.default_password_unchanged(ctx)
        boot_line = ""
        if settings.init_boot_image if boot_image is None else boot_image:
            from qrm_core.services.boot_build import ensure_default_boot_image

            boot_line = ensure_default_boot_image(ctx, progress)
    return InitPublic(
        database=safe_url(settings.effective_database_url),
        revision_before=before,
        revision=after,
        admin=admin.name,
        admin_created=created,
        default_password=default,
        boot_image=boot_line,
    )
