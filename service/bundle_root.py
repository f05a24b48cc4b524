"""The bundle root: every bundle a replica loads after start-up (a swap, a shadow candidate, an announced bundle at
start-up) must resolve inside one directory, ``Settings.swap_root()`` (MISSREC_BUNDLE_ROOT, else the directory
that holds MISSREC_BUNDLE), symlinks followed. No root (no bundle configured) admits nothing."""

from __future__ import annotations

from pathlib import Path

from service.errors import InvalidInput


def inside_root(root: Path | None, path: Path) -> bool:
    """True when the resolved ``path`` lies inside ``root`` (False without a root)."""
    return root is not None and path.is_relative_to(root)


def resolve_bundle(root: Path | None, given: str) -> Path:
    """The bundle directory ``given`` names (relative: to ``root``), resolved with symlinks, if it lies inside
    ``root``; otherwise :class:`~service.errors.InvalidInput` (422), before anything is read from it."""
    if root is None:
        raise InvalidInput("no bundle root: set MISSREC_BUNDLE or MISSREC_BUNDLE_ROOT", code="bundle_outside_root")
    if not given.strip() or "\x00" in given:
        raise InvalidInput("bundle must be a directory path", code="invalid_bundle_path")
    try:
        path = (root / given).resolve()  # an absolute ``given`` replaces root
        inside, is_dir = inside_root(root, path), path.is_dir()
    except (OSError, RuntimeError) as exc:  # a name too long, a symlink loop
        raise InvalidInput(f"bundle {given!r}: {exc}", code="invalid_bundle_path") from None
    if not inside:
        raise InvalidInput(
            f"bundle {given!r} resolves to {path}, outside the bundle root {root} (MISSREC_BUNDLE_ROOT)",
            {"bundle": given, "bundle_root": str(root)},
            code="bundle_outside_root",
        )
    if not is_dir:
        raise InvalidInput(f"bundle {given!r}: no directory {path}", {"bundle": given}, code="bundle_not_found")
    return path
