"""Real S3 servers on loopback for tests: moto's ``ThreadedMotoServer`` and a fault proxy.

- ``moto_s3_server()`` starts moto's S3 HTTP server on a free 127.0.0.1 port (any
  credentials work unless ``MotoS3.iam_auth()`` switches moto's signature checks on).
  moto keeps its data in this process, so a stopped and restarted server (same port)
  still holds the buckets: that is what the "server stopped mid-upload" test relies on.
- ``FaultProxy`` is a TCP proxy in front of a server that misbehaves on the next N
  connections (answers 503 SlowDown, resets the connection, hangs, or cuts a response
  short) and forwards faithfully afterwards. No client code is mocked: the store talks
  HTTP through a real socket and sees real failures.

Plain functions and classes; the lead's conftest may expose them as fixtures.
"""

from __future__ import annotations

import contextlib
import json
import socket
import struct
import threading
import time
import uuid
from typing import Iterator

import urllib3

DEFAULT_ACCOUNT_ID = "123456789012"  # moto's account for unauthenticated requests


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MotoS3:
    """moto's S3 server on loopback; ``stop()``/``start()`` keep the port and the data."""

    def __init__(self, port: int | None = None):
        self.port = port or free_port()
        self._server = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> "MotoS3":
        from moto.server import ThreadedMotoServer

        for _ in range(50):  # the port may linger briefly after a stop
            try:
                self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
                self._server.start()
                return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"could not start moto on port {self.port}")

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None

    def _post(self, path: str, body: bytes) -> dict:
        http = urllib3.PoolManager(retries=False, timeout=5)
        resp = http.request("POST", f"http://{self.endpoint}{path}", body=body)
        return json.loads(resp.data or b"{}")

    @contextlib.contextmanager
    def iam_auth(self) -> Iterator[tuple[str, str]]:
        """Turn on moto's request-signature checks; yields (access_key, secret_key) of a
        user allowed ``s3:*``. Process-wide in moto, so it is switched off again on exit."""
        from moto.iam.models import iam_backends

        iam = iam_backends[DEFAULT_ACCOUNT_ID]["global"]
        user = f"store-test-{uuid.uuid4().hex[:8]}"
        iam.create_user("us-east-1", user)
        key = iam.create_access_key(user)
        policy = iam.create_policy(
            description="store tests",
            path="/",
            policy_document=json.dumps(
                {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
            ),
            policy_name=f"s3-all-{user}",
            tags=[],
        )
        iam.attach_user_policy(policy.arn, user)
        previous = self._post("/moto-api/reset-auth", b"0")["PREVIOUS_INITIAL_NO_AUTH_ACTION_COUNT"]
        try:
            yield key.access_key_id, key.secret_access_key
        finally:
            self._post("/moto-api/reset-auth", previous.encode())


@contextlib.contextmanager
def moto_s3_server() -> Iterator[MotoS3]:
    server = MotoS3().start()
    try:
        yield server
    finally:
        server.stop()


def settings_s3_store(server: MotoS3, home, monkeypatch, bucket: str):
    """The store a user's settings open against ``server``: MOEFLOW_* variables set (home, endpoint,
    credentials, bucket) with ``monkeypatch``, the bucket created."""
    from moeflow.platform.settings import get_settings
    from moeflow.platform.store import open_store

    monkeypatch.setenv("MOEFLOW_HOME", str(home))
    for key, value in {"S3_ENDPOINT": server.endpoint, "S3_ACCESS_KEY": "k", "S3_SECRET_KEY": "s",
                       "S3_REGION": "us-east-1", "S3_BUCKET": bucket}.items():
        monkeypatch.setenv(f"MOEFLOW_{key}", value)
    return open_store(get_settings(), create_bucket=True)


_SLOWDOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)


class FaultProxy:
    """TCP proxy to ``target`` ("host:port") with scripted faults on new connections.

    Fault modes, each consuming one connection:
      "503"      read the request head, answer 503 SlowDown (XML), close
      "reset"    read a little, then close with RST (connection reset by peer)
      "hang"     read, never answer, close after ``hang_s`` (a read timeout for the client)
      "truncate" forward, but cut the server's answer after ``truncate_bytes`` bytes
    """

    def __init__(self, target: str, hang_s: float = 5.0, truncate_bytes: int = 1 << 20):
        host, port = target.rsplit(":", 1)
        self.target = (host, int(port))
        self.hang_s = hang_s
        self.truncate_bytes = truncate_bytes
        self.faults: list[str] = []
        self.connections = 0
        self.faults_served: list[str] = []
        self._lock = threading.Lock()
        self._socks: set[socket.socket] = set()
        self._stop = threading.Event()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(0.1)
        self.endpoint = f"127.0.0.1:{self._listener.getsockname()[1]}"
        self._thread = threading.Thread(target=self._accept_loop, daemon=True)
        self._thread.start()

    def fail_next(self, count: int, mode: str = "503") -> None:
        assert mode in ("503", "reset", "hang", "truncate"), mode
        with self._lock:
            self.faults.extend([mode] * count)

    def close(self) -> None:
        self._stop.set()
        self._listener.close()
        with self._lock:
            socks = list(self._socks)
        for sock in socks:
            with contextlib.suppress(OSError):
                sock.close()
        self._thread.join(timeout=2)

    def __enter__(self) -> "FaultProxy":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals
    def _track(self, sock: socket.socket) -> socket.socket:
        with self._lock:
            self._socks.add(sock)
        return sock

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._listener.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            with self._lock:
                self.connections += 1
                mode = self.faults.pop(0) if self.faults else None
                if mode:
                    self.faults_served.append(mode)
            threading.Thread(target=self._handle, args=(self._track(client), mode), daemon=True).start()

    def _handle(self, client: socket.socket, mode: str | None) -> None:
        try:
            if mode in ("503", "reset", "hang"):
                self._misbehave(client, mode)
            else:
                self._forward(client, truncate=mode == "truncate")
        except OSError:
            pass
        finally:
            with contextlib.suppress(OSError):
                client.close()
            with self._lock:
                self._socks.discard(client)

    def _misbehave(self, client: socket.socket, mode: str) -> None:
        client.settimeout(5)
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = client.recv(65536)
            if not chunk:
                return
            head += chunk
        if mode == "503":
            client.sendall(
                b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/xml\r\n"
                + f"Content-Length: {len(_SLOWDOWN)}\r\nConnection: close\r\n\r\n".encode()
                + _SLOWDOWN
            )
            client.shutdown(socket.SHUT_WR)
        elif mode == "reset":
            client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        else:  # hang
            self._stop.wait(self.hang_s)

    def _forward(self, client: socket.socket, truncate: bool) -> None:
        upstream = self._track(socket.create_connection(self.target, timeout=5))
        limit = self.truncate_bytes if truncate else None

        def pump(src: socket.socket, dst: socket.socket, limit: int | None) -> None:
            sent = 0
            try:
                while True:
                    data = src.recv(65536)
                    if not data:
                        break
                    if limit is not None and sent + len(data) >= limit:
                        dst.sendall(data[: limit - sent])
                        break
                    dst.sendall(data)
                    sent += len(data)
            except OSError:
                pass
            for sock in (src, dst):
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)

        up = threading.Thread(target=pump, args=(client, upstream, None), daemon=True)
        up.start()
        pump(upstream, client, limit)
        up.join(timeout=5)
        with contextlib.suppress(OSError):
            upstream.close()
        with self._lock:
            self._socks.discard(upstream)
