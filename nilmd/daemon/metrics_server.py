"""The /metrics HTTP server, with a cap on what clients can hold (issue 23, defect 8).

prometheus-client's start_http_server starts a thread per connection without a limit and waits
on a half-sent request forever: 2,000 of them gave the supervisor 422 threads and 38 MB it never
returned. Here at most MAX_CONNECTIONS are served at once (one more is closed at once, a scraper
retries on its next interval) and a connection that sends nothing for READ_TIMEOUT_S is closed.
Otherwise the same server: the registry as a WSGI app, silent handler, a daemon thread.
"""

from __future__ import annotations

import sys
import threading
from wsgiref.simple_server import make_server

from prometheus_client import make_wsgi_app
from prometheus_client.exposition import ThreadingWSGIServer, _get_best_family, _SilentHandler

MAX_CONNECTIONS = 16  # a scrape takes milliseconds: a few scrapers never come near it
READ_TIMEOUT_S = 5.0


class _Handler(_SilentHandler):
    timeout = READ_TIMEOUT_S  # socket timeout while reading the request: a half-sent one ends


class _Capped(ThreadingWSGIServer):
    slots: threading.BoundedSemaphore
    request_queue_size = 64  # a burst of scrapers waits in the backlog, not in SYN retries

    def handle_error(self, request, client_address):
        """A client that timed out or went away is its own business: no traceback in the journal."""
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)

    def process_request(self, request, client_address):
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)  # full: closed now, no thread
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


def start(port: int, addr: str, registry):
    """Serve `registry` on addr:port from a daemon thread; returns the server (OSError if it cannot bind)."""

    class Server(_Capped):  # a class per server: the address family is a class attribute
        pass

    Server.address_family, addr = _get_best_family(addr, port)
    Server.slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
    httpd = make_server(addr, port, make_wsgi_app(registry), Server, handler_class=_Handler)
    threading.Thread(target=httpd.serve_forever, name="metrics", daemon=True).start()
    return httpd
