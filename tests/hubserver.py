"""A fake Hugging Face Hub on 127.0.0.1: the few endpoints huggingface_hub's
`snapshot_download` uses, so the real download path runs offline (point HF_ENDPOINT at it).

- GET  /api/models/{org}/{name}[/revision/{rev}]   repo info: sha + siblings
- GET  /api/models/{org}/{name}/tree/{rev}         the file list (recursive)
- HEAD /{org}/{name}/resolve/{rev}/{file}          X-Repo-Commit, ETag, Content-Length
- GET  /{org}/{name}/resolve/{rev}/{file}          the bytes (`Range: bytes=N-`: 206)
Unknown repos answer 404 with `X-Error-Code: RepoNotFound`, like the Hub. `cut_once[file] = n`
makes the first full GET of that file send n bytes of it and drop the connection (a network
failure mid-file); `unavailable` holds files that are listed but answer 404 for now; a request
for a repo in `hang` is accepted and never answered (until `release_hung()` closes them all).
Every request is recorded in `requests` as (method, path, Range header).
"""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[str, dict[str, bytes]] = {}
        self.cut_once: dict[str, int] = {}
        # Files the tree lists but resolve cannot serve yet (404), until removed from the set.
        self.unavailable: set[str] = set()
        self.requests: list[tuple[str, str, str | None]] = []
        # Repos whose every request is read and then left without an answer.
        self.hang: set[str] = set()
        self._released = threading.Event()
        self.hung: list[str] = []  # paths of the requests left hanging
        self._lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self) -> None:
                hub._handle(self, head=True)

            def do_GET(self) -> None:
                hub._handle(self, head=False)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._released.set()
        self.server.shutdown()
        self.server.server_close()

    def add_repo(self, repo_id: str, files: dict[str, bytes]) -> str:
        self.repos[repo_id] = dict(files)
        return self.sha(repo_id)

    def add_dir(self, repo_id: str, directory: Path, extra: dict[str, bytes] | None = None
                ) -> str:
        files = {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}
        return self.add_repo(repo_id, {**files, **(extra or {})})

    def sha(self, repo_id: str) -> str:
        """The commit: a new one whenever the repo's files change, as on the real Hub (clients
        cache a commit's file list)."""
        digest = hashlib.sha1(repo_id.encode())
        for name, data in sorted(self.repos.get(repo_id, {}).items()):
            digest.update(name.encode() + b"\0" + hashlib.sha1(data).digest())
        return digest.hexdigest()

    def release_hung(self) -> None:
        """Stop hanging: requests still hanging get their connection closed, no answer."""
        self.hang.clear()
        self._released.set()

    def _hangs(self, path: str) -> bool:
        return any(f"/{repo}/" in f"{path}/" for repo in self.hang)

    def downloads(self, name: str) -> list[str | None]:
        """Range headers of the GETs of one file, in order (None: a full GET)."""
        return [r for m, p, r in self.requests if m == "GET" and p.endswith(f"/{name}")
                and "/resolve/" in p]

    # ---- request handling

    def _handle(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        path = unquote(urlsplit(h.path).path)
        with self._lock:
            self.requests.append(("HEAD" if head else "GET", path, h.headers.get("Range")))
        if self._hangs(path):
            with self._lock:
                self.hung.append(path)
            self._released.wait()  # a server that accepted the request and went quiet
            h.close_connection = True
            return
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 4:
            return self._api(h, f"{parts[2]}/{parts[3]}", parts[4:])
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._file(h, f"{parts[0]}/{parts[1]}", "/".join(parts[4:]), head)
        self._json(h, 404, {"error": "not found"})

    def _not_found(self, h: BaseHTTPRequestHandler, repo_id: str) -> None:
        self._json(h, 404, {"error": f"Repository Not Found for {repo_id}"},
                   {"X-Error-Code": "RepoNotFound",
                    "X-Error-Message": "Repository not found"})

    def _api(self, h: BaseHTTPRequestHandler, repo_id: str, rest: list[str]) -> None:
        files = self.repos.get(repo_id)
        if files is None:
            return self._not_found(h, repo_id)
        sha = self.sha(repo_id)
        if rest[:1] == ["tree"]:
            return self._json(h, 200, [
                {"type": "file", "path": name, "size": len(data),
                 "oid": hashlib.sha1(data).hexdigest()} for name, data in sorted(files.items())])
        self._json(h, 200, {"id": repo_id, "modelId": repo_id, "sha": sha, "private": False,
                            "siblings": [{"rfilename": n} for n in sorted(files)]})

    def _file(self, h: BaseHTTPRequestHandler, repo_id: str, name: str, head: bool) -> None:
        files = self.repos.get(repo_id)
        if files is None:
            return self._not_found(h, repo_id)
        data = files.get(name)
        if data is None or name in self.unavailable:
            return self._json(h, 404, {"error": "entry not found"},
                              {"X-Error-Code": "EntryNotFound",
                               "X-Repo-Commit": self.sha(repo_id)})
        start, status = 0, 200
        rng = h.headers.get("Range")
        if rng and rng.startswith("bytes=") and not head:
            start, status = int(rng[6:].split("-")[0]), 206
        body = data[start:]
        h.send_response(status)
        h.send_header("X-Repo-Commit", self.sha(repo_id))
        h.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
        h.send_header("Content-Length", str(len(body)))
        h.send_header("Accept-Ranges", "bytes")
        if status == 206:
            h.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        h.end_headers()
        if head:
            return
        with self._lock:
            cut = self.cut_once.pop(name, None) if status == 200 else None
        if cut is not None:
            h.wfile.write(body[:cut])
            h.wfile.flush()
            h.close_connection = True
            h.connection.shutdown(2)  # the peer sees the body end early
            return
        h.wfile.write(body)

    @staticmethod
    def _json(h: BaseHTTPRequestHandler, status: int, body: object,
              headers: dict[str, str] | None = None) -> None:
        raw = json.dumps(body).encode()
        h.send_response(status)
        h.send_header("Content-Type", "application/json")
        h.send_header("Content-Length", str(len(raw)))
        for k, v in (headers or {}).items():
            h.send_header(k, v)
        h.end_headers()
        if h.command != "HEAD":
            h.wfile.write(raw)
