"""A counting, optionally slow, HTTP proxy in front of moto's S3 server, on 127.0.0.1.

It forwards every request unchanged and records, per object path, the GET requests and the
bytes they returned, so a test can tell window reads from a whole-file download. `latency_s`
is added to each request: it stands for an object store's round trip.
"""

from __future__ import annotations

import http.client
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "proxy-connection", "te", "upgrade"}


class CountingProxy:
    """`http://127.0.0.1:{port}` forwarding to `upstream_port`; use as a context manager."""

    def __init__(self, upstream_port: int, latency_s: float = 0.0) -> None:
        self.upstream_port = upstream_port
        self.latency_s = latency_s
        self.gets: Counter[str] = Counter()  # object path -> GET requests
        self.bytes: Counter[str] = Counter()  # object path -> body bytes returned by GETs
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self._server.daemon_threads = True
        self.port = self._server.server_address[1]

    def __enter__(self) -> CountingProxy:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._server.shutdown()
        self._server.server_close()

    def reset(self) -> None:
        with self._lock:
            self.gets.clear()
            self.bytes.clear()

    def _record(self, method: str, path: str, n_bytes: int) -> None:
        if method != "GET":
            return
        with self._lock:
            self.gets[path] += 1
            self.bytes[path] += n_bytes

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: object) -> None:  # quiet
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else None
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
                if proxy.latency_s:
                    time.sleep(proxy.latency_s)
                upstream = http.client.HTTPConnection("127.0.0.1", proxy.upstream_port, timeout=60)
                try:
                    upstream.request(self.command, self.path, body=body, headers=headers)
                    response = upstream.getresponse()
                    data = response.read()
                finally:
                    upstream.close()
                proxy._record(self.command, self.path.split("?", 1)[0], len(data))
                self.send_response(response.status, response.reason)
                for key, value in response.getheaders():
                    if key.lower() not in HOP_HEADERS and key.lower() != "content-length":
                        self.send_header(key, value)
                # a HEAD's length is the object's, as the store said; a body's is what is sent
                head_length = response.getheader("Content-Length", "0")
                self.send_header("Content-Length", head_length if self.command == "HEAD" else str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _forward

        return Handler
