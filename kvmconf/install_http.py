"""The provision server's HTTP: preseeds and cloud-init seeds for installers, and their "install done" marks.

It serves ``<http_url>/preseed/...`` and ``<http_url>/cloud-init/...`` from config_dir/build, and takes
``<http_url>/installed/<vm>`` (fetched by the installer's late_command) as the VM's install mark
(kvmconf.tftp_tree.set_installed). Every request is one line of config_dir/http.log.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

from generators.site_values import parse_http_url
from kvmconf.errors import KvmconfError
from kvmconf.provision_state import build_dir_in
from kvmconf.tftp_tree import set_installed

HTTP_LOG = "http.log"
SERVED = ("preseed", "cloud-init")  # build/ directories served over HTTP at <http_url>/<dir>/...


class Handler(BaseHTTPRequestHandler):
    server: ProvisionHTTPServer

    def do_GET(self) -> None:
        path = unquote(urlsplit(self.path).path)
        parts = [p for p in path.split("/") if p]
        prefix = self.server.prefix_parts
        if parts[:len(prefix)] != prefix:
            self._answer(404, b"not found\n")
            return
        parts = parts[len(prefix):]
        if len(parts) == 2 and parts[0] == "installed":
            done = set_installed(self.server.config_dir, self.server.tftp_root, parts[1], True)
            self._answer(200 if done else 404, b"installed\n" if done else b"no such VM\n")
            return
        if len(parts) >= 2 and parts[0] in SERVED and not any(p.startswith(".") for p in parts):
            file = build_dir_in(self.server.config_dir) / Path(*parts)
            if file.is_file():
                self._answer(200, file.read_bytes())
                return
        self._answer(404, b"not found\n")

    def _answer(self, status: int, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
        # A request line that does not parse (garbage, a bad HTTP version, too long) is answered 400 or 414 before
        # self.path is set, and without a command: "-" for them, or the answer never went out.
        path = getattr(self, "path", "-")
        line = f"{time.strftime('%Y-%m-%dT%H:%M:%S')} {self.client_address[0]} {self.command or '-'} {path} {code}\n"
        with self.server.lock, (self.server.config_dir / HTTP_LOG).open("a") as f:
            f.write(line)

    def log_message(self, format: str, *args: object) -> None:
        pass  # errors are in http.log through log_request


class ProvisionHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], config_dir: Path, tftp_root: Path, prefix: str = "") -> None:
        super().__init__(address, Handler)
        self.config_dir = config_dir
        self.tftp_root = tftp_root
        self.prefix_parts = [p for p in unquote(prefix).split("/") if p]  # http_url's path: every URL starts so
        self.lock = threading.Lock()


@dataclass(frozen=True)
class HttpBase:
    """Where the HTTP server listens, and the path it serves under: [provision] http_url."""

    host: str
    port: int
    prefix: str  # "" or "/a/path": the generated URLs are <http_url>/preseed/..., so that is served

    def serve_args(self) -> list[str]:
        return [f"--bind={self.host}:{self.port}", *([f"--prefix={self.prefix}"] if self.prefix else [])]


def http_base(http_url: str) -> HttpBase:
    """http_url as the provision server serves it; anything else is refused before anything is deployed.

    site.toml's own check (generators.site_values.parse_http_url, the same rule) refuses such a URL first, at its line.
    """
    parsed = parse_http_url(http_url)
    if parsed is None:
        raise KvmconfError(f"[provision] http_url {http_url!r}: the provision server serves plain HTTP, so it must"
                           " be http://host[:port][/path] (no https: a TLS proxy in front is not set up by kvmconf)")
    return HttpBase(*parsed)
