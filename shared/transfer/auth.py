"""The authenticated KV channel: ZeroMQ CURVE with keys derived from the internal token.

Both ends derive two keypairs from the token (HMAC-SHA256 with a label per key, so the
token itself never crosses the wire): the decode worker's server pair and the prefill
workers' client pair. Decode's socket is a CURVE server that accepts one client key only
(checked by a ZAP handler), prefill's sockets are CURVE clients that know the server's
public key. A peer without the token can neither complete the handshake (no chunk of
its reaches the pool) nor read the KV in transit (CURVE encrypts every frame).

Cost, measured on loopback: ~0.7 GB/s against 3.5-5 GB/s in the clear (1 MiB frames).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from dataclasses import dataclass, field

import zmq
import zmq.auth.thread
from zmq.utils import z85

log = logging.getLogger(__name__)

ZAP_DOMAIN = "kvrelay-kv"


@dataclass(frozen=True)
class CurveKeys:
    """Z85-encoded CURVE keys (40 bytes each). repr=False: secrets are never logged."""

    server_public: bytes
    server_secret: bytes = field(repr=False)
    client_public: bytes
    client_secret: bytes = field(repr=False)


def _keypair(token: str, label: bytes) -> tuple[bytes, bytes]:
    secret = z85.encode(
        hmac.new(token.encode(), b"kvrelay kv channel " + label, hashlib.sha256).digest()
    )
    return zmq.curve_public(secret), secret


def curve_keys(token: str) -> CurveKeys:
    if not token:
        raise ValueError("the internal token is empty")
    if not zmq.has("curve"):
        raise RuntimeError("this libzmq has no CURVE support: the KV channel cannot be secured")
    server_public, server_secret = _keypair(token, b"server")
    client_public, client_secret = _keypair(token, b"client")
    return CurveKeys(server_public, server_secret, client_public, client_secret)


def secure_client(socket: zmq.Socket[bytes], keys: CurveKeys) -> None:
    """Before connect(): `socket` talks CURVE to a server holding keys.server_secret."""
    socket.curve_secretkey = keys.client_secret
    socket.curve_publickey = keys.client_public
    socket.curve_serverkey = keys.server_public


class _OneClientKey:
    """The ZAP credentials check: the client key derived from the token, no other."""

    def __init__(self, allowed: bytes) -> None:
        self._allowed = allowed
        self.refused = 0

    def callback(self, domain: str, key: bytes) -> bool:
        ok = hmac.compare_digest(key, self._allowed)
        if not ok:
            self.refused += 1
            if self.refused == 1 or self.refused % 100 == 0:
                log.warning("KV channel: refused %d peers without the internal token", self.refused)
        return ok


class CurveServer:
    """Makes sockets of `context` CURVE servers that admit only the token's client key.

    One per context (ZeroMQ allows one ZAP handler per context): give the receiver a
    context of its own.
    """

    def __init__(self, context: zmq.Context[zmq.Socket[bytes]], keys: CurveKeys) -> None:
        self.keys = keys
        self._credentials = _OneClientKey(keys.client_public)
        self._auth = zmq.auth.thread.ThreadAuthenticator(context, log=log)
        self._auth.start()
        self._auth.configure_curve_callback(ZAP_DOMAIN, credentials_provider=self._credentials)

    @property
    def refused(self) -> int:
        return self._credentials.refused

    def secure(self, socket: zmq.Socket[bytes]) -> None:
        """Before bind()."""
        socket.curve_secretkey = self.keys.server_secret
        socket.curve_publickey = self.keys.server_public
        socket.curve_server = True
        socket.zap_domain = ZAP_DOMAIN.encode()

    def close(self) -> None:
        self._auth.stop()
