"""For the client tests: a loopback HTTP server that answers each request with the next of a script of raw
answers (status, headers, body), as a proxy, a catch-all route or another app at the client's URL would:
a redirect with no body, a 200 `{"ok": true}`, a gzip header on a body that is not gzip."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from contextlib import contextmanager

Answer = tuple[int, dict[str, str], bytes]


def event_stream(*events: tuple[int, str, str]) -> Answer:
    """A 200 text/event-stream of (id, event, data JSON) events."""
    body = b"".join(f"id: {i}\nevent: {name}\ndata: {data}\n\n".encode() for i, name, data in events)
    return 200, {"Content-Type": "text/event-stream"}, body


JSON_OK: Answer = (200, {"Content-Type": "application/json"}, b'{"ok": true}')
JSON_LIST: Answer = (200, {"Content-Type": "application/json"}, b"[1, 2]")
EMPTY_301: Answer = (301, {"Location": "https://127.0.0.1:1/elsewhere"}, b"")
BAD_GZIP_200: Answer = (200, {"Content-Type": "application/json", "Content-Encoding": "gzip"}, b"not gzip at all")
BAD_GZIP_503: Answer = (503, {"Content-Type": "text/html", "Content-Encoding": "gzip"}, b"<html>down</html>")
BAD_GZIP_STREAM: Answer = (200, {"Content-Type": "text/event-stream", "Content-Encoding": "gzip"},
                           b"id: 1\nevent: queued\ndata: {}\n\n")
DONE_R1: Answer = event_stream((7, "done", '{"request_id": "r1", "tokens": 3}'))


class Script:
    """The answers still to give (the last one again once they run out), the requests seen (method, path,
    headers) and the server's base URL."""

    def __init__(self, answers: list[Answer]) -> None:
        self.answers = answers
        self.seen: list[tuple[str, str, dict[str, str]]] = []
        self.url = ""

    def next(self) -> Answer:
        return self.answers[min(len(self.seen) - 1, len(self.answers) - 1)]


@contextmanager
def scripted(*answers: Answer) -> Iterator[Script]:
    """A server answering with `answers` in turn, on a free 127.0.0.1 port, shut down after."""
    script = Script(list(answers))

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def _answer(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length") or 0))
            script.seen.append((self.command, self.path, dict(self.headers)))
            status, headers, body = script.next()
            self.send_response(status)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(body)))
            if headers.get("Content-Type") == "text/event-stream":
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_DELETE = _answer

        def log_message(self, *_: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    script.url = f"http://127.0.0.1:{server.server_address[1]}"
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield script
    finally:
        server.shutdown()
        server.server_close()
