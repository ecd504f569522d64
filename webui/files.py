"""Serving files from the runs folder, and only from it; optional HTTP basic auth for the whole app."""

from __future__ import annotations

import base64
import binascii
import secrets
from pathlib import Path

from fastapi import FastAPI, HTTPException
from fastapi.responses import FileResponse
from starlette.middleware.base import BaseHTTPMiddleware
from starlette.responses import Response

SERVED_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".safetensors"}  # samples, plots, exports
PRIVATE_DIRS = {"checkpoints"}  # trainer state (optimizer, RNG): never served, whatever the suffix
GRADIO_FILE_PREFIXES = ("/gradio_api/file=", "/file=")


def resolve_inside(root: Path, relative: str) -> Path | None:
    """``root/relative`` if it is an existing file inside ``root`` (after resolving ``..`` and symlinks)
    with a suffix we serve; otherwise None. Absolute paths, ``..`` escapes and links out are refused."""
    root = root.resolve()
    if not relative or "\x00" in relative or Path(relative).is_absolute():
        return None
    try:
        target = (root / relative).resolve()
    except (OSError, RuntimeError):  # symlink loops, names too long
        return None
    if not target.is_relative_to(root) or not target.is_file():
        return None
    if target.suffix.lower() not in SERVED_SUFFIXES:
        return None
    parts = target.relative_to(root).parts
    if any(p.startswith(".") for p in parts):  # lock files, temp folders, uploads in progress
        return None
    if any(p in PRIVATE_DIRS for p in parts[1:-1]):  # inside a run: <run>/<arm>/checkpoints/...
        return None
    return target


def refused_by_gradio_route(runs: Path, url_path: str) -> bool:
    """Whether a request for Gradio's own file route names a file inside ``runs`` that the rule above does not
    serve (Gradio serves any file under its allowed paths; the gallery's images come from its cache)."""
    from urllib.parse import unquote

    prefix = next((p for p in GRADIO_FILE_PREFIXES if url_path.startswith(p)), None)
    if prefix is None:
        return False
    asked = unquote(url_path[len(prefix):])
    try:
        target = Path(asked).resolve()
    except (OSError, RuntimeError, ValueError):
        return True
    root = runs.resolve()
    if not target.is_relative_to(root):
        return False  # not ours: Gradio's own checks decide (its cache, its temp files)
    return resolve_inside(root, target.relative_to(root).as_posix()) is None


class RunsFileGuard(BaseHTTPMiddleware):
    """Applies the runs folder's serving rule to Gradio's file route as well."""

    def __init__(self, app, runs: Path):
        super().__init__(app)
        self.runs = Path(runs)

    async def dispatch(self, request, call_next):
        if refused_by_gradio_route(self.runs, request.url.path):
            return Response("not served", status_code=404)
        return await call_next(request)


def add_file_route(app: FastAPI, runs: Path, prefix: str = "/runs-file") -> None:
    """GET {prefix}/<path inside runs> -> the file (adapters download as attachments)."""

    @app.get(prefix + "/{relative:path}")
    def runs_file(relative: str):
        target = resolve_inside(runs, relative)
        if target is None:
            raise HTTPException(status_code=404, detail="not a file inside the runs folder")
        if target.suffix == ".safetensors":
            name = download_name(target.relative_to(runs.resolve()).parts)
            return FileResponse(target, filename=name, media_type="application/octet-stream")
        return FileResponse(target)


def download_name(parts: tuple[str, ...]) -> str:
    """<run>-<arm>.safetensors, <run>-<arm>_comfyui.safetensors, <run>-<arm>-step200.safetensors (an export of
    an earlier step), with a sweep cell's run named <sweep>-<cell>."""
    tail = parts[-1].removeprefix("adapter")
    if len(parts) >= 5 and parts[-3] == "exports" and parts[-2].startswith("step-"):
        run, arm, tail = parts[:-4], parts[-4], f"-step{int(parts[-2][5:])}{tail}"
    else:
        run, arm = parts[:-2], parts[-2]
    return f"{'-'.join(run)}-{arm}{tail}"


def parse_auth(text: str | None) -> tuple[str, str] | None:
    """'user:pass' -> (user, pass); raises ValueError with the fix for a malformed value."""
    if text is None:
        return None
    user, sep, password = text.partition(":")
    if not sep or not user or not password:
        raise ValueError(f"--auth {text!r}: expected USER:PASS with both parts non-empty")
    return user, password


class BasicAuth(BaseHTTPMiddleware):
    """HTTP basic auth in front of every route (pages, API, files, uploads)."""

    def __init__(self, app, user: str, password: str):
        super().__init__(app)
        self.expected = f"{user}:{password}".encode()

    def _ok(self, header: str | None) -> bool:
        if not header or not header.lower().startswith("basic "):
            return False
        try:
            given = base64.b64decode(header[6:].strip(), validate=True)
        except (binascii.Error, ValueError):
            return False
        return secrets.compare_digest(given, self.expected)

    async def dispatch(self, request, call_next):
        if self._ok(request.headers.get("authorization")):
            return await call_next(request)
        return Response("authentication required", status_code=401,
                        headers={"WWW-Authenticate": 'Basic realm="fluxlora"'})
