"""An HTTP proxy in front of the test S3 server that injects faults (500s, stalls, delays) by rule: the
object-store reliability tests (storage, training input) share it."""

from __future__ import annotations

import http.client
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

# a rule sees (method, path with query, how many requests matched it before) and answers one of:
# "forward", "500", "stall" (no answer until the client gives up), or a float (delay, then forward)
Rule = Callable[[str, str, int], "str | float"]


class Proxy:
    """HTTP proxy on 127.0.0.1 in front of the S3 server, applying ``rule`` to every request."""

    def __init__(self, upstream: str, rule: Rule):
        host, port = upstream.removeprefix("http://").split(":")
        self.upstream, self.rule = (host, int(port)), rule
        self.log: list[tuple[str, str, str]] = []
        self.lock, self.stop = threading.Lock(), threading.Event()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _handle(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                with proxy.lock:
                    seen = sum(1 for m, p, _ in proxy.log if (m, p) == (self.command, self.path))
                    action = proxy.rule(self.command, self.path, seen)
                    proxy.log.append((self.command, self.path, str(action)))
                if action == "stall":
                    proxy.stop.wait(5.0)  # longer than the client's read timeout; ends with the proxy
                    self.close_connection = True
                    return
                if action == "500":
                    err = b"<Error><Code>InternalError</Code><Message>injected fault</Message></Error>"
                    self.send_response(500)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(err)))
                    self.end_headers()
                    self.wfile.write(err)
                    return
                if isinstance(action, float):
                    proxy.stop.wait(action)
                headers = {k: v for k, v in self.headers.items() if k.lower() != "expect"}
                conn = http.client.HTTPConnection(*proxy.upstream, timeout=30)
                try:
                    conn.request(self.command, self.path, body=body, headers=headers)
                    resp = conn.getresponse()
                    data = resp.read()
                    self.send_response(resp.status, resp.reason)
                    for k, v in resp.getheaders():
                        if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                            self.send_header(k, v)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    conn.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def count(self, method: str, contains: str = "", action: str | None = None) -> int:
        return sum(1 for m, p, a in self.log if m == method and contains in p and action in (None, a))

    @contextmanager
    def running(self, max_lifetime: float = 90.0) -> Iterator[Proxy]:
        deadline = time.monotonic() + max_lifetime

        def serve():
            self.server.timeout = 0.1
            while not self.stop.is_set() and time.monotonic() < deadline:
                self.server.handle_request()

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        try:
            yield self
        finally:
            self.stop.set()
            t.join(timeout=5)
            self.server.server_close()
