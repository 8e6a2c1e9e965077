"""A TCP proxy in front of a test server whose connections can fail as networks make them fail: an
answer that never comes back (`drop_answers`, or `drop_next` for the next N connections that answer),
new connections closed at once (`refuse`), or a client whose side vanishes while the server's side
stays open and unread (`vanish_clients`: no FIN reaches the server, which still counts the stream),
until `release_vanished` closes those too; a host gone (`black_hole`: what either side sends is dropped, and
both sides stay open until `cut`); or every open connection closed on both sides at once (`cut`)."""

from __future__ import annotations

import contextlib
import socket
import threading


class CuttingProxy:
    def __init__(self, target_port: int) -> None:
        self.target = ("127.0.0.1", target_port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.drop_answers = False  # forward the requests, never the answers; close the client's side
        self.drop_next = 0  # as drop_answers, for the next N connections that answer only
        self.refuse = False  # close every new connection at once: nothing it sends reaches the server
        self.black_hole = False  # drop what either side sends; close nothing (a host that stopped answering)
        self.lock = threading.Lock()
        self.pairs: list[tuple[socket.socket, socket.socket]] = []  # (client's side, server's side)
        self.frozen: set[socket.socket] = set()  # server sides left open and unread
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self.listener.close()
        self.release_vanished()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.refuse:
                client.close()
                continue
            try:
                server = socket.create_connection(self.target)
            except OSError:  # the server behind is gone (the test is ending)
                client.close()
                continue
            with self.lock:
                self.pairs.append((client, server))
            threading.Thread(target=self._pipe, args=(client, server, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(server, client, True), daemon=True).start()

    def _pipe(self, source: socket.socket, sink: socket.socket, answers: bool) -> None:
        with contextlib.suppress(OSError):
            while data := source.recv(65536):
                if self.black_hole:
                    return  # dropped, and both sides left open: `cut` closes them
                if answers and (self.drop_answers or self._drop_one()):
                    break
                if source in self.frozen:
                    return  # left open and unread: the server never learns its client left
                sink.sendall(data)
        for side in (source, sink):
            if side not in self.frozen:
                with contextlib.suppress(OSError):
                    side.shutdown(socket.SHUT_RDWR)
                side.close()

    def _drop_one(self) -> bool:
        with self.lock:
            if self.drop_next <= 0:
                return False
            self.drop_next -= 1
            return True

    def vanish_clients(self) -> None:
        """Close the client's side of every open connection, and leave the server's side open, unread."""
        with self.lock:
            pairs, self.pairs = self.pairs, []
        for client, server in pairs:
            self.frozen.add(server)
            with contextlib.suppress(OSError):
                client.shutdown(socket.SHUT_RDWR)
            client.close()

    def cut(self) -> None:
        """Close both sides of every open connection before returning, so a client sees its connections
        end before anything it sends next (a kill at the server reaches the clients only when the pipe
        threads get to it, after which a client may already have sent on a connection it took for open)."""
        with self.lock:
            pairs, self.pairs = self.pairs, []
        for pair in pairs:
            for side in pair:
                with contextlib.suppress(OSError):
                    side.shutdown(socket.SHUT_RDWR)
                side.close()

    def release_vanished(self) -> None:
        """Close the server's sides left open: the server sees those clients gone."""
        with self.lock:
            frozen, self.frozen = self.frozen, set()
        for server in frozen:
            with contextlib.suppress(OSError):
                server.shutdown(socket.SHUT_RDWR)
            server.close()
