"""A small HTTP proxy on 127.0.0.1 in front of an S3 endpoint (moto's server), for tests and the
object-store benchmark: it adds a fixed latency to every request and can answer the next N
requests with `503 SlowDown` (S3's throttling reply) instead of forwarding them.

    proxy = LatencyProxy("http://127.0.0.1:PORT", latency_s=0.02).start()
    env = server.environ(endpoint=proxy.endpoint)      # clients talk to the proxy
    proxy.fail_next(3)                                  # the next 3 requests get 503 SlowDown
    proxy.counts                                        # requests seen, by method, and 503s sent
    proxy.stop()

Requests are forwarded as they come (path, query, headers, body; S3 signatures are not checked by
moto), over one keep-alive connection per proxy thread, and answered with the upstream's status,
headers and body. Nothing leaves the loopback interface.
"""

from __future__ import annotations

import http.client
import threading
import time
import urllib.parse
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SLOWDOWN_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message><RequestId>proxy</RequestId></Error>"
)
_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "upgrade", "trailer"}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, format: str, *args: object) -> None:  # quiet
        pass

    def _upstream(self) -> http.client.HTTPConnection:
        conn = getattr(self, "_conn", None)
        if conn is None:
            host, port = self.server.upstream
            conn = self._conn = http.client.HTTPConnection(host, port, timeout=60)
        return conn

    def _forward(self) -> None:
        proxy = self.server.proxy
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        proxy._count(self.command)
        if proxy.latency_s > 0:
            time.sleep(proxy.latency_s)
        if proxy._take_failure():
            self.send_response(503, "Slow Down")
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(SLOWDOWN_BODY)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(SLOWDOWN_BODY)
            return
        headers = {k: v for k, v in self.headers.items() if k.lower() not in _HOP}
        for attempt in range(2):  # a keep-alive connection the upstream closed: reconnect once
            conn = self._upstream()
            try:
                conn.request(self.command, self.path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
                break
            except (http.client.HTTPException, ConnectionError):
                conn.close()
                self._conn = None
                if attempt:
                    raise
        self.send_response(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() not in _HOP and k.lower() != "content-length":
                self.send_header(k, v)
        # a HEAD answer's length is the object's, not of its (empty) body
        length = resp.getheader("Content-Length") if self.command == "HEAD" else None
        self.send_header("Content-Length", length or str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_PUT = do_POST = do_HEAD = do_DELETE = _forward


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    upstream: tuple[str, int]
    proxy: LatencyProxy


class LatencyProxy:
    """The proxy (see the module docstring); `endpoint` is `http://127.0.0.1:PORT` once started."""

    def __init__(self, upstream: str, latency_s: float = 0.0) -> None:
        parts = urllib.parse.urlsplit(upstream)
        self.upstream = (parts.hostname or "127.0.0.1", parts.port or 80)
        self.latency_s = latency_s
        self.counts: Counter = Counter()
        self._fail = 0
        self._lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def endpoint(self) -> str:
        assert self._server is not None, "start() the proxy first"
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> LatencyProxy:
        server = _Server(("127.0.0.1", 0), _Handler)
        server.upstream, server.proxy = self.upstream, self
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, name="s3-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    def fail_next(self, n: int) -> None:
        """Answer the next `n` requests with 503 SlowDown."""
        with self._lock:
            self._fail = n

    def _take_failure(self) -> bool:
        with self._lock:
            if self._fail > 0:
                self._fail -= 1
                self.counts["503"] += 1
                return True
            return False

    def _count(self, method: str) -> None:
        with self._lock:
            self.counts[method] += 1

    def __enter__(self) -> LatencyProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
