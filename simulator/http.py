"""Serve the app's HTTP-triggered functions on 127.0.0.1, routes taken from their decorators.

The read API then works locally without Functions Core Tools. Like ``func start``, it does not
check function keys (auth level FUNCTION is enforced by the host in Azure only).
"""

from __future__ import annotations

import logging
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qsl, unquote, urlsplit

import azure.functions as func

from simulator.functions import indexed

logger = logging.getLogger(__name__)


class _Handler(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        for route in indexed().routes:
            match = route.pattern.match(url.path)
            if not match or method not in route.methods:
                continue
            request = func.HttpRequest(
                method, f"http://{self.headers.get('Host', '127.0.0.1')}{self.path}",
                headers=dict(self.headers.items()), params=dict(parse_qsl(url.query)),
                route_params={k: unquote(v) for k, v in match.groupdict().items()}, body=body)
            try:
                response = route.handler(request)
            except Exception:
                logger.exception("function %s failed", route.name)
                self._reply(500, b'{"error": "function failed; see the log"}',
                            "application/json")
                return
            self._reply(response.status_code, response.get_body(),
                        response.mimetype or "application/json")
            return
        self._reply(404, b'{"error": "no function has this route"}', "application/json")

    def _reply(self, status: int, body: bytes, mimetype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", mimetype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        logger.debug("http: %s", format % args)


def serve(port: int = 0) -> tuple[ThreadingHTTPServer, str]:
    """Start serving in a daemon thread; return the server and its base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", port), _Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"
