"""/docs (Swagger UI) and /redoc against a real daemon: plain HTTP checks of the pages and their
assets, the access rule (open even when API keys are set), and a real headless Chromium that
must render the endpoints with every request staying on 127.0.0.1."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

from conftest import Daemon, spawn_daemon, wait_for_gone, write_config
from mlxrouter.docs_pages import ASSETS, docs_routes, find_asset_dir
from mlxrouter.errors import RouterError
from mlxrouter.gateway import on_router_error

API_KEY = "sk-docs-test"
ENDPOINTS = {("post", "/v1/chat/completions"), ("post", "/v1/completions"),
             ("get", "/v1/models")}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    """One daemon for the module, with an API key set (the docs must not need it) and no
    models (the pages describe the API, not the models)."""
    root = tmp_path_factory.mktemp("docs")
    (root / "models").mkdir()
    d = spawn_daemon(root, write_config(root, models={}, server={"api_keys": [API_KEY]}))
    yield d
    assert d.stop() == 0
    assert not wait_for_gone(d)


class _Links(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.urls += [v for k, v in attrs if k in ("src", "href") and v]


def page_links(html: str) -> list[str]:
    parser = _Links()
    parser.feed(html)
    return parser.urls


def assert_openai_error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    err = resp.json()["error"]
    assert isinstance(err["message"], str) and err["message"]
    assert err["type"] and err["code"]
    return err


# ---- plain HTTP


@pytest.mark.parametrize("page", ["/docs", "/redoc"])
def test_page_is_html_whose_links_all_stay_on_this_server(daemon: Daemon, page: str) -> None:
    resp = daemon.http.get(page)
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "text/html; charset=utf-8"
    csp = resp.headers["content-security-policy"]
    assert "default-src 'none'" in csp and "script-src 'self'" in csp
    assert "http://" not in resp.text and "https://" not in resp.text
    links = page_links(resp.text)
    assert len(links) >= 3  # favicon, at least one bundle, our start-up script
    for url in links:
        assert not re.match(r"^([a-z]+:|//)", url), url  # relative: same server
        assert daemon.http.get(httpx.URL(daemon.base_url + page).join(url)).status_code == 200


def test_assets_have_their_types_the_package_bytes_and_cache_headers(daemon: Daemon) -> None:
    links = page_links(daemon.http.get("/docs").text) + page_links(
        daemon.http.get("/redoc").text)
    types = {"js": "text/javascript; charset=utf-8", "css": "text/css; charset=utf-8",
             "png": "image/png"}
    package_dir = find_asset_dir()
    assert package_dir is not None
    for link in sorted(set(links)):
        resp = daemon.http.get("/" + link)
        name = link.split("?")[0].rsplit("/", 1)[1]
        assert resp.status_code == 200, link
        assert resp.headers["content-type"] == types[name.rsplit(".", 1)[1]]
        assert resp.headers["x-content-type-options"] == "nosniff"
        assert "immutable" in resp.headers["cache-control"]  # the link carries the version
        if (package_dir / name).is_file():
            assert resp.content == (package_dir / name).read_bytes()
        else:  # our start-up scripts point the UI at this server's document
            assert b"openapi.json" in resp.content
        again = daemon.http.get("/" + link, headers={"if-none-match": resp.headers["etag"]})
        assert again.status_code == 304 and again.content == b""
    bare = daemon.http.get("/docs/assets/swagger-ui.css")  # no version: must revalidate
    assert bare.status_code == 200 and "no-cache" in bare.headers["cache-control"]
    css = bare.text
    assert "@import" not in css and not re.search(r"url\(\s*['\"]?(https?:)?//", css)


def test_unknown_asset_is_404_in_openai_shape(daemon: Daemon) -> None:
    for name in ("nope.js", "swagger-ui-bundle.js.map", "__init__.py", "core.py"):
        err = assert_openai_error(daemon.http.get(f"/docs/assets/{name}"), 404)
        assert err["type"] == "invalid_request_error"


def raw_get(port: int, target: str) -> tuple[int, bytes]:
    """A request line sent as written: httpx would normalize the dot segments away."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
                     .encode())
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


@pytest.mark.parametrize("target", [
    "/docs/assets/../../../../../../etc/passwd",
    "/docs/assets/..%2f..%2f..%2f..%2f..%2f..%2fetc%2fpasswd",
    "/docs/assets/%2e%2e%2f__init__.py",
    "/docs/assets/..%2fcore.py",
    "/docs/assets/%2fetc%2fpasswd",
    "/docs/assets/swagger-ui.css%00.py",
])
def test_no_path_traversal_out_of_the_allow_list(daemon: Daemon, target: str) -> None:
    status, body = raw_get(daemon.port, target)
    assert status == 404, body
    assert json.loads(body)["error"]["code"] in ("not_found", "invalid_request")
    assert b"root:" not in body and b"import" not in body


def test_docs_need_no_api_key_but_the_api_still_does(daemon: Daemon) -> None:
    for path in ("/docs", "/redoc", "/docs/assets/redoc-init.js", "/openapi.json"):
        assert daemon.http.get(path).status_code == 200, path
    # a trailing slash reaches the router (a redirect), not the key check
    slash = daemon.http.get("/docs/")
    assert slash.status_code in (307, 308) and slash.headers["location"].endswith("/docs")
    assert_openai_error(daemon.http.get("/v1/models"), 401)
    authed = daemon.http.get("/v1/models", headers={"authorization": f"Bearer {API_KEY}"})
    assert authed.status_code == 200


def test_pages_name_the_package_to_install_when_its_files_are_missing(tmp_path: Path) -> None:
    app = Starlette(routes=docs_routes(tmp_path),
                    exception_handlers={RouterError: on_router_error})
    with TestClient(app) as client:
        for page in ("/docs", "/redoc"):
            err = assert_openai_error(client.get(page), 404)
            assert "pip install fastapi-offline" in err["message"]
        assert_openai_error(client.get("/docs/assets/swagger-ui-bundle.js"), 404)
        # our own start-up scripts do not depend on the package
        assert client.get("/docs/assets/swagger-init.js").status_code == 200
    assert set(ASSETS) >= {"swagger-ui-bundle.js", "swagger-ui.css", "redoc.standalone.js"}


# ---- a real browser


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        reason = ("chromium is not installed (scripts/bootstrap.sh installs it on Debian / "
                  "Ubuntu: apt-get install chromium)")
        if os.environ.get("CI"):
            pytest.fail(f"{reason}; on CI the browser check must run")
        pytest.skip(reason)
    return exe


class Rendered:
    def __init__(self, dom: str, page_requests: list[str], csp_blocked: list[str]) -> None:
        self.dom = dom
        self.page_requests = page_requests
        self.csp_blocked = csp_blocked


def render(daemon: Daemon, page: str, work: Path) -> Rendered:
    """Load `page` in headless Chromium with every host name but 127.0.0.1 unresolvable, and
    return the DOM after the scripts ran, the URLs the page requested (from Chromium's net
    log) and the CSP directives that blocked something (from its console log)."""
    netlog = work / "net.json"
    cmd = [chromium(), "--headless=new", "--no-sandbox", "--disable-gpu",
           "--disable-dev-shm-usage", "--no-first-run", "--disable-background-networking",
           "--disable-component-update", "--disable-sync", f"--user-data-dir={work / 'prof'}",
           "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
           f"--log-net-log={netlog}", "--enable-logging=stderr", "--log-level=0",
           "--virtual-time-budget=10000", "--dump-dom", f"{daemon.base_url}{page}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        dom, log = proc.communicate(timeout=100)
    finally:
        try:  # its renderer / GPU helpers too
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    assert proc.returncode == 0, log[-3000:]
    events = json.loads(netlog.read_text())
    names = {v: k for k, v in events["constants"]["logEventTypes"].items()}
    requests = [e["params"] for e in events["events"]
                if names.get(e["type"]) == "URL_REQUEST_START_JOB" and "url" in e.get(
                    "params", {})]
    # The page's own requests: its navigation, and everything it initiated (scripts, styles,
    # fetches, images, wherever they point). The browser's traffic (updates, sign-in,
    # autofill) has no initiator.
    ours = [r["url"] for r in requests
            if r.get("initiator") == daemon.base_url or r.get("request_type") == "main frame"]
    blocked = re.findall(r"violates the following Content Security Policy directive: "
                         r"\"([a-z-]+)", log)
    return Rendered(dom, ours, blocked)


def assert_stayed_local(daemon: Daemon, rendered: Rendered, page: str) -> None:
    assert f"{daemon.base_url}{page}" in rendered.page_requests
    assert f"{daemon.base_url}/openapi.json" in rendered.page_requests
    assert any("/docs/assets/" in u for u in rendered.page_requests)
    off_host = [u for u in rendered.page_requests if not u.startswith(daemon.base_url + "/")]
    assert not off_host, off_host
    # Nothing the UI needs was refused: ReDoc's sidebar always asks for Redocly's logo from
    # its CDN; the policy blocks that image and ReDoc hides it.
    assert set(rendered.csp_blocked) <= {"img-src"}, rendered.csp_blocked


@pytest.mark.timeout(180)
def test_swagger_ui_renders_every_endpoint_in_headless_chromium(daemon: Daemon,
                                                                tmp_path: Path) -> None:
    rendered = render(daemon, "/docs", tmp_path)
    ops = set(re.findall(r'opblock-summary-method">(\w+)</span>.*?data-path="([^"]+)"',
                         rendered.dom))
    shown = {(method.lower(), path) for method, path in ops}
    assert ENDPOINTS <= shown, shown
    documented = {(m, p) for p, item in daemon.http.get("/openapi.json").json()["paths"].items()
                  for m in item}
    assert shown == documented
    assert "Failed to load API definition" not in rendered.dom
    assert_stayed_local(daemon, rendered, "/docs")


@pytest.mark.timeout(180)
def test_redoc_renders_every_endpoint_in_headless_chromium(daemon: Daemon,
                                                          tmp_path: Path) -> None:
    rendered = render(daemon, "/redoc", tmp_path)
    shown = set(re.findall(r'http-verb (\w+)">\w+</span><span[^>]*>([^<]+)<', rendered.dom))
    assert ENDPOINTS <= shown, shown
    documented = {(m, p) for p, item in daemon.http.get("/openapi.json").json()["paths"].items()
                  for m in item}
    assert shown == documented
    assert "Something went wrong" not in rendered.dom
    assert_stayed_local(daemon, rendered, "/redoc")
