"""The API's documentation pages: /docs (Swagger UI) and /redoc (ReDoc), served offline.

Daemon side; imports no mlx, and not fastapi either: the UI bundles are the static files that the
`fastapi-offline` package ships, found with `importlib.util.find_spec` (which does not run the
package). Nothing on these pages loads from outside this server: the bundles and our start-up
scripts are served under /docs/assets/ from a fixed allow-list (no user-chosen path ever reaches
the file system), the start-up code is a script file rather than inline (so the
Content-Security-Policy allows scripts from 'self' only), and ReDoc gets system font stacks
(its usual HTML page pulls web fonts from Google). Links are relative, so the pages also work
behind a reverse proxy that mounts the daemon under a path prefix.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import os
from pathlib import Path

import msgspec
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Route

from . import __version__
from .errors import NotFound

ASSET_PACKAGE = "fastapi_offline"  # import name; the distribution is `fastapi-offline`
ASSET_DIST = "fastapi-offline"
ASSET_ROUTE = "/docs/assets/{name}"

_JS = "text/javascript; charset=utf-8"
_CSS = "text/css; charset=utf-8"

# Both UIs style elements at run time (ReDoc injects <style> tags, Swagger UI sets style
# attributes) and use data: images; ReDoc's search runs in a worker made from a blob: URL.
# Anything remote is refused: the pages must work on a machine with no internet.
CONTENT_SECURITY_POLICY = "; ".join([
    "default-src 'none'",
    "script-src 'self'",
    "style-src 'self' 'unsafe-inline'",
    "img-src 'self' data:",
    "font-src 'self' data:",
    "connect-src 'self'",
    "worker-src 'self' blob:",
    "base-uri 'none'",
    "form-action 'none'",
    "frame-ancestors 'none'",
])

_SWAGGER_INIT = """\
window.ui = SwaggerUIBundle({
  url: new URL("openapi.json", document.baseURI).href,
  dom_id: "#swagger-ui",
  deepLinking: true,
  validatorUrl: null,
  presets: [SwaggerUIBundle.presets.apis],
  layout: "BaseLayout"
});
"""

_SANS = ("system-ui, -apple-system, 'Segoe UI', Roboto, 'Helvetica Neue', Arial, "
         "'Noto Sans', sans-serif")
_MONO = "ui-monospace, SFMono-Regular, Menlo, Consolas, 'Liberation Mono', monospace"
_REDOC_INIT = f"""\
Redoc.init(new URL("openapi.json", document.baseURI).href, {{
  theme: {{typography: {{fontFamily: "{_SANS}", headings: {{fontFamily: "{_SANS}"}},
                        code: {{fontFamily: "{_MONO}"}}}}}}
}}, document.getElementById("redoc"));
"""


class Asset(msgspec.Struct, frozen=True):
    """One allowed file under /docs/assets/: a file of ASSET_PACKAGE, or a script of ours."""

    media_type: str
    body: bytes | None = None


ASSETS: dict[str, Asset] = {
    "swagger-ui-bundle.js": Asset(_JS),
    "swagger-ui.css": Asset(_CSS),
    "redoc.standalone.js": Asset(_JS),
    "favicon.png": Asset("image/png"),
    "swagger-init.js": Asset(_JS, _SWAGGER_INIT.encode()),
    "redoc-init.js": Asset(_JS, _REDOC_INIT.encode()),
}

_PAGES: dict[str, tuple[str, tuple[str, ...], str, tuple[str, ...]]] = {
    # page: (title suffix, stylesheets, body, scripts)
    "swagger": ("Swagger UI", ("swagger-ui.css",), '<div id="swagger-ui"></div>',
                ("swagger-ui-bundle.js", "swagger-init.js")),
    "redoc": ("ReDoc", (), '<div id="redoc"></div>', ("redoc.standalone.js", "redoc-init.js")),
}


def find_asset_dir() -> Path | None:
    """The static folder of the installed ASSET_PACKAGE, without importing it (its __init__
    imports fastapi); None when it is not installed."""
    spec = importlib.util.find_spec(ASSET_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "static"


def _bundle_version() -> str:
    try:
        return importlib.metadata.version(ASSET_DIST)
    except importlib.metadata.PackageNotFoundError:
        return "none"


class DocsPages:
    """The two pages and their assets. `version` changes whenever any asset can change (our
    release or the package's), so asset links carrying it may be cached for good."""

    def __init__(self, asset_dir: Path | None) -> None:
        self.asset_dir = asset_dir
        self.version = f"{__version__}-{_bundle_version()}"

    def _file(self, name: str) -> Path | None:
        if self.asset_dir is None:
            return None
        path = self.asset_dir / name
        return path if path.is_file() else None

    def _missing(self, names: tuple[str, ...]) -> list[str]:
        return [n for n in names if ASSETS[n].body is None and self._file(n) is None]

    def render(self, page: str) -> str:
        title, styles, body, scripts = _PAGES[page]
        q = f"?v={self.version}"
        links = "".join(f'<link rel="stylesheet" href="docs/assets/{s}{q}">' for s in styles)
        tags = "".join(f'<script src="docs/assets/{s}{q}"></script>' for s in scripts)
        return ('<!doctype html><html lang="en"><head><meta charset="utf-8">'
                '<meta name="viewport" content="width=device-width, initial-scale=1">'
                f'<title>mlxrouter API - {title}</title>'
                f'<link rel="icon" type="image/png" href="docs/assets/favicon.png{q}">'
                f'{links}</head><body style="margin:0">{body}{tags}</body></html>')

    async def swagger(self, request: Request) -> Response:
        return self._page("swagger", request)

    async def redoc(self, request: Request) -> Response:
        return self._page("redoc", request)

    def _page(self, page: str, request: Request) -> Response:
        _, styles, _, scripts = _PAGES[page]
        missing = self._missing(styles + scripts)
        if missing:
            raise NotFound(f"{request.url.path} needs the {ASSET_DIST} package, which ships "
                           f"the UI's files ({', '.join(missing)} not found): "
                           f"pip install {ASSET_DIST}")
        return Response(self.render(page), media_type="text/html; charset=utf-8", headers={
            "content-security-policy": CONTENT_SECURITY_POLICY,
            "cache-control": "no-cache",
            "x-content-type-options": "nosniff",
            "referrer-policy": "no-referrer",
        })

    async def asset(self, request: Request) -> Response:
        name = request.path_params["name"]
        asset = ASSETS.get(name)
        path = self._file(name) if asset is not None and asset.body is None else None
        if asset is None or (asset.body is None and path is None):
            raise NotFound(f"no documentation asset named {name!r}")
        headers = {"cache-control": self._cache_control(request), "x-content-type-options":
                   "nosniff", "etag": self._etag(asset, path)}
        sent = request.headers.get("if-none-match", "")
        if headers["etag"] in (t.strip().removeprefix("W/") for t in sent.split(",")):
            return Response(status_code=304, headers=headers)
        if path is None:
            return Response(asset.body, media_type=asset.media_type, headers=headers)
        return FileResponse(path, media_type=asset.media_type, headers=headers)

    def _cache_control(self, request: Request) -> str:
        if request.query_params.get("v") == self.version:
            return "public, max-age=31536000, immutable"
        return "public, no-cache"  # unversioned link: revalidate with the ETag

    def _etag(self, asset: Asset, path: Path | None) -> str:
        if path is None:
            digest = hashlib.sha256(asset.body or b"").hexdigest()[:16]
        else:
            st = os.stat(path)
            digest = f"{st.st_size:x}-{st.st_mtime_ns:x}"
        return f'"{self.version}-{digest}"'


def docs_routes(asset_dir: Path | None = None) -> list[Route]:
    """Routes for /docs, /redoc and /docs/assets/{name}; `asset_dir` defaults to the installed
    package's folder. Without the package the pages answer 404 saying what to install."""
    pages = DocsPages(asset_dir if asset_dir is not None else find_asset_dir())
    return [
        Route("/docs", pages.swagger, methods=["GET"]),
        Route("/redoc", pages.redoc, methods=["GET"]),
        Route(ASSET_ROUTE, pages.asset, methods=["GET"]),
    ]
