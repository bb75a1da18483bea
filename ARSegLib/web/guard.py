"""The review page's door: who may open the websocket, with which secret, and how much a message may claim.

trame/wslink out of the box accept a websocket from any web page (no `Origin` check), under any `Host` name
(DNS rebinding), authenticate it with wslink's public default secret ("wslink-secret"), and let an authenticated
client announce chunked messages of up to 4 GB, allocated when the first 16-byte chunk arrives. A page on any
other site open in the user's browser could so read the nodules and the report, change them, stop the server
or exhaust its memory. Here, for one server:

- every HTTP request (the page, its files, the websocket handshake) must name an allowed host (`Host`), and a
  request that says where it comes from (`Origin`) must come from the page's own origin; the handshake must
  say it. Anything else gets 403 before a websocket exists. Allowed: IP literals (a rebinding attack needs a
  name), `localhost`, the `--host` value (and this machine's names when it listens on all interfaces), and the
  origins an operator names for a proxy (ServerGuard.extra_origins);
- the secret is random per server and reaches only the page this server serves: it is written into the page's
  HTML (which another origin cannot read), put into the URL's `secret` parameter where trame's client reads
  it (the client removes it from the address bar at once); a wrong secret closes the connection;
- a chunked message may claim at most what the page ever sends, with a few in flight at a time; a connection
  that claims more is closed (wslink's own limit after authentication is 4 GB).

Hooked in through trame's documented extension points where there are some (on_server_bind: routes and an aiohttp
middleware before the server starts; add_protocol_to_configure: a wslink LinkProtocol whose validateToken replaces
the default comparison) and, for the message limits, a subclass of wslink's aiohttp websocket handler given to
the handler wslink made (wslink builds it itself; there is no factory to pass a class to).
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import secrets
import socket
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import FrozenSet, Optional, Tuple
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

WILDCARD_HOSTS = ("0.0.0.0", "::", "")
LOOPBACK_NAMES = ("localhost",)
# the chunk header of wslink's messages: message id, offset of this chunk, total size (little-endian uint32 each)
CHUNK_HEADER = struct.Struct("<III")
SECRET_PREFIX = "arseg-"  # trame's client turns URL values that look like numbers into numbers: never this one
WS_ROUTE = "/ws"
PAGE_ROUTES = ("/", "/index.html")
CLOSE_POLICY = 1008  # websocket close codes: policy violation, message too big
CLOSE_TOO_BIG = 1009


class MessageRefused(ValueError):
    """A websocket message (or chunk) beyond the limits: the connection that sent it is closed."""


@dataclass(frozen=True)
class MessageLimits:
    """What one connection may make the server hold. The page sends state changes and clicks, each well under
    64 KB, one message at a time (trame's client sends all chunks of one message before the next)."""

    max_message_bytes: int = 1 << 20  # the size one message may claim (after authentication; 512 B before)
    max_pending_messages: int = 4  # messages whose chunks have started to arrive and not finished
    max_pending_bytes: int = 2 << 20  # what those may claim together


def _is_ip_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name.strip("[]"))
        return True
    except ValueError:
        return False


def split_host(value: str) -> Tuple[str, Optional[int]]:
    """'name:port' or '[v6]:port' (a Host header) -> (lower-case name without brackets, port or None); ('', None)
    for anything that is not a host."""
    try:
        parts = urlsplit(f"//{value}")
        return (parts.hostname or "").lower(), parts.port
    except ValueError:
        return "", None


@dataclass
class ServerGuard:
    """One server's policy: allowed host names and origins, its secret, the message limits."""

    bind_host: str = "127.0.0.1"
    extra_origins: Tuple[str, ...] = ()  # e.g. ("https://review.example.org",) for an HTTPS proxy in front
    secret: str = field(default_factory=lambda: SECRET_PREFIX + secrets.token_urlsafe(32))
    limits: MessageLimits = field(default_factory=MessageLimits)

    def __post_init__(self):
        origins = []
        for origin in self.extra_origins:
            parts = urlsplit(origin.strip())
            if parts.scheme not in ("http", "https") or not parts.hostname or parts.path not in ("", "/"):
                raise ValueError(f"an allowed origin is scheme://host[:port], e.g. https://review.example.org; "
                                 f"got {origin!r}")
            origins.append(f"{parts.scheme}://{parts.netloc.lower()}")
        self.extra_origins = tuple(origins)

    @property
    def host_names(self) -> FrozenSet[str]:
        """Names (besides IP literals) a request's Host may carry."""
        names = set(LOOPBACK_NAMES)
        bind = (self.bind_host or "").strip("[]").lower()
        if bind in WILDCARD_HOSTS:  # all interfaces: the machine's own names too
            names.update(n.lower() for n in (socket.gethostname(), socket.getfqdn()) if n)
        elif bind:
            names.add(bind)
        names.update(urlsplit(o).hostname for o in self.extra_origins)
        return frozenset(names)

    def host_allowed(self, host_header: Optional[str]) -> bool:
        name, _ = split_host(host_header or "")
        return bool(name) and (_is_ip_literal(name) or name in self.host_names)

    def origin_allowed(self, origin: Optional[str], host_header: Optional[str]) -> bool:
        """The page's own origin (the scheme and exactly the host:port the request was sent to), or a named one."""
        if not origin or not host_header:
            return False
        origin = origin.strip().lower()
        if origin in self.extra_origins:
            return True
        return origin in (f"http://{host_header.strip().lower()}", f"https://{host_header.strip().lower()}")

    def refusal(self, host_header: Optional[str], origin: Optional[str], websocket: bool) -> Optional[str]:
        """Why a request is refused (None: it is not). A websocket handshake must carry an Origin: browsers always
        send one, and a client that is not a browser has nothing to hide it for."""
        if not self.host_allowed(host_header):
            return f"host {host_header!r} is not this server's"
        if origin is not None or websocket:
            if not self.origin_allowed(origin, host_header):
                return f"origin {origin!r} is not this page's"
        return None

    def secret_matches(self, token) -> bool:
        return isinstance(token, str) and hmac.compare_digest(token.encode(), self.secret.encode())

    # ------------------------------------------------------------------------------------------ the page

    def page_html(self, index_html: str) -> str:
        """trame's index.html with the secret placed in the URL before trame's client module reads it (module
        scripts run after this inline one); the client takes it from there and strips it from the address."""
        script = ("<script>(function(){var u=new URL(window.location.href);"
                  f"u.searchParams.set('secret','{self.secret}');"
                  "window.history.replaceState(window.history.state,'',u.toString());})();</script>")
        head = index_html.find("<head>")
        if head < 0:
            raise RuntimeError("trame's index.html has no <head>: cannot hand the page its secret")
        at = head + len("<head>")
        return index_html[:at] + script + index_html[at:]


# ---------------------------------------------------------------------------------------------- messages

def _unchunker_base():
    from wslink.chunking import UnChunker

    return UnChunker


class BoundedUnChunker(_unchunker_base()):
    """wslink's UnChunker, with the limits of MessageLimits checked before anything is allocated."""

    def __init__(self, limits: MessageLimits):
        super().__init__()
        self.limits = limits
        self.max_message_size = min(self.max_message_size, limits.max_message_bytes)

    def set_max_message_size(self, size):
        # wslink raises it to 4 GB once a client has authenticated; the page never needs more than the cap
        super().set_max_message_size(min(int(size), self.limits.max_message_bytes))

    def process_chunk(self, chunk: bytes):
        if len(chunk) < CHUNK_HEADER.size:
            raise MessageRefused(f"a websocket chunk of {len(chunk)} bytes has no header")
        message_id, offset, total = CHUNK_HEADER.unpack_from(chunk)
        content = len(chunk) - CHUNK_HEADER.size
        if total > self.max_message_size:
            raise MessageRefused(f"a websocket message claims {total} bytes (at most {self.max_message_size})")
        if offset + content > total:
            raise MessageRefused(f"a websocket chunk reaches past its message's end ({offset} + {content} > {total})")
        pending = self.pending_messages
        if message_id not in pending:
            if len(pending) >= self.limits.max_pending_messages:
                raise MessageRefused(f"more than {self.limits.max_pending_messages} websocket messages in flight")
            held = sum(len(p["content"]) for p in pending.values())
            if held + total > self.limits.max_pending_bytes:
                raise MessageRefused(f"websocket messages in flight would claim {held + total} bytes "
                                     f"(at most {self.limits.max_pending_bytes})")
        return super().process_chunk(chunk)


def _guarded_handler_class():
    from wslink.backends.aiohttp import AioHttpWsHandler

    class GuardedWsHandler(AioHttpWsHandler):
        """wslink's aiohttp websocket handler with bounded message reassembly, and a failed hello (a wrong secret)
        closing the connection instead of leaving it open and unauthenticated."""

        guard: ServerGuard = None  # set on the instance by install()

        async def onConnect(self, request, client_id):
            await super().onConnect(request, client_id)
            self.unchunkers[client_id] = BoundedUnChunker(self.guard.limits)

        async def onMessage(self, is_binary, msg, client_id):
            try:
                await super().onMessage(is_binary, msg, client_id)
            except MessageRefused as e:
                log.warning("arseg view: closing a websocket: %s", e)
                self.unchunkers.get(client_id, BoundedUnChunker(self.guard.limits)).release_pending_messages()
                await self._close(client_id, CLOSE_TOO_BIG, "message too big")

        async def handleSystemMessage(self, rpcid, methodName, args, client_id):
            handled = await super().handleSystemMessage(rpcid, methodName, args, client_id)
            if handled and methodName == "wslink.hello" and not self.isClientAuthenticated(client_id):
                await self._close(client_id, CLOSE_POLICY, "authentication failed")
            return handled

        async def _close(self, client_id, code, message):
            # no longer authenticated first: state broadcasts skip it instead of writing to a closing socket
            self.authentified_client_ids.discard(client_id)
            ws = self.connections.get(client_id)
            if ws is not None and not ws.closed:
                await ws.close(code=code, message=message.encode())

    return GuardedWsHandler


def _secret_check_class():
    from wslink.websocket import LinkProtocol

    class SecretCheck(LinkProtocol):
        """wslink asks every link protocol that has validateToken; where one has, the default comparison with the
        server's (public, default) secret is not made."""

        def __init__(self, guard: ServerGuard):
            super().__init__()
            self._guard = guard

        async def validateToken(self, token, client_id):
            return self._guard.secret_matches(token)

    return SecretCheck


def _middleware(guard: ServerGuard):
    from aiohttp import web

    @web.middleware
    async def check_host_and_origin(request, handler):
        websocket = request.path == WS_ROUTE
        why = guard.refusal(request.headers.get("Host"), request.headers.get("Origin"), websocket)
        if why is not None:
            log.warning("arseg view: refused %s %s: %s", request.method, request.path, why)
            raise web.HTTPForbidden(text=f"arseg view: {why}\n")
        return await handler(request)

    return check_host_and_origin


def install(server, guard: ServerGuard, www: Optional[Path] = None) -> None:
    """Put the guard on a trame server that has not started yet."""
    from aiohttp import web

    handler_class = _guarded_handler_class()
    secret_check = _secret_check_class()(guard)

    def page_handler(index: Path):
        async def serve_page(_request):
            html = guard.page_html(index.read_text(encoding="utf-8"))
            return web.Response(text=html, content_type="text/html", headers={
                "Cache-Control": "no-store", "X-Frame-Options": "DENY",
                "Content-Security-Policy": "frame-ancestors 'none'", "Referrer-Policy": "no-referrer"})
        return serve_page

    def on_bind(web_server):
        handlers = list(getattr(web_server, "_ws_handlers", None) or [])
        app = getattr(web_server, "app", None)
        if not handlers or app is None or not all(type(h).__name__ == "AioHttpWsHandler" for h in handlers):
            # fail closed: a wslink whose server is built differently would otherwise run without the guard
            raise RuntimeError("arseg view: this wslink's aiohttp server is not the one the page's guard knows "
                               f"({type(web_server).__name__}); refusing to serve without it")
        for h in handlers:
            h.__class__ = handler_class
            h.guard = guard
        app.middlewares.append(_middleware(guard))
        folder = Path(www if www is not None else server._www)
        index = folder / "index.html"
        app.router.add_routes([web.get(route, page_handler(index)) for route in PAGE_ROUTES])

    def on_configure(protocol):
        protocol.registerLinkProtocol(secret_check)

    server.controller.on_server_bind.add(on_bind)
    server.add_protocol_to_configure(on_configure)
    # one frame may hold one whole message of the page (the header and some slack on top)
    server.options["ws_max_msg_size"] = guard.limits.max_message_bytes


def extra_origins_from(text: Optional[str]) -> Tuple[str, ...]:
    """ARSEG_VIEW_ORIGINS: comma-separated origins (scheme://host[:port]) of proxies in front of the page."""
    return tuple(o.strip() for o in (text or "").split(",") if o.strip())
