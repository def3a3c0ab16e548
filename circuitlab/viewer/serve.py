"""Serving one page on localhost only (``circuitlab view RUN --serve PORT``)."""

from __future__ import annotations

import http.server
from pathlib import Path

__all__ = ["page_server", "serve", "HOST"]

HOST = "127.0.0.1"  # never a public interface: the page is a local file shown to its owner


def page_server(page, port: int) -> http.server.ThreadingHTTPServer:
    """An HTTP server on 127.0.0.1:``port`` (0: any free port) answering every GET with ``page``."""
    body = Path(page).read_bytes()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the http.server hook name
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):  # a quiet server: the CLI prints the address once
            pass

    return http.server.ThreadingHTTPServer((HOST, port), Handler)


def serve(page, port: int) -> None:
    """Serve ``page`` on http://127.0.0.1:``port``/ until interrupted (Ctrl-C)."""
    server = page_server(page, port)
    print(f"serving {page} on http://{HOST}:{server.server_address[1]}/ (Ctrl-C stops)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
