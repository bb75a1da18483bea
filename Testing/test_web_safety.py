"""The review page lets in only its own page, bounds what a message may claim, checks the state it reads, and
keeps its preloaded worker (issue 26, items 1, 2, 7, 8).

Without a server: the guard's host/origin rules, the bounded reassembly of wslink's chunked messages, the state
checks. With `arseg view` running as a process: raw websocket clients (aiohttp) with a foreign Origin, a foreign
Host (DNS rebinding), no Origin, the public default secret, and 512 MB chunk headers, against the server's RSS;
in headless Chromium a real page served from another origin (127.0.0.2) that tries to connect, next to the real
page that still works; bad state values set from the page's own console; the worker alive past its connect
deadline (shortened to seconds through ARSEG_WORKER_CONNECT_TIMEOUT_S) and serving the first click.
"""

from __future__ import annotations

import asyncio
import http.server
import json
import re
import struct
import threading
import time
from pathlib import Path

import pytest
from test_web import _browser_missing, _volume_and_nodule

CONNECT_DEADLINE_S = 6.0  # the worker's connect deadline in the served page's tests (the default is 120 s)
MiB = 1 << 20


# ============================================================================================ no server

def test_guard_allows_only_the_pages_own_host_and_origin():
    pytest.importorskip("wslink", reason="the web extra (trame) is not installed")
    from ARSegLib.web.guard import ServerGuard

    g = ServerGuard(bind_host="127.0.0.1")
    assert g.refusal("127.0.0.1:8080", "http://127.0.0.1:8080", websocket=True) is None
    assert g.refusal("localhost:9000", "http://localhost:9000", websocket=True) is None  # an ssh -L tunnel
    assert g.refusal("127.0.0.1:8080", None, websocket=False) is None  # plain page loads carry no Origin
    for host, origin in (("127.0.0.1:8080", "http://127.0.0.2:48888"),  # another origin, same machine
                         ("127.0.0.1:8080", "http://localhost:8081"),  # another port
                         ("127.0.0.1:8080", "null"),  # a sandboxed frame or file:// page
                         ("127.0.0.1:8080", None),  # a handshake must say where it comes from
                         ("evil.example:8080", "http://evil.example:8080"),  # DNS rebinding
                         ("", None), (None, None)):
        assert g.refusal(host, origin, websocket=True), (host, origin)
    assert g.refusal("evil.example:8080", None, websocket=False)  # the page (its secret) neither
    exposed = ServerGuard(bind_host="ct-review.lan", extra_origins=("https://Review.Example.org",))
    assert exposed.refusal("ct-review.lan:8080", "http://ct-review.lan:8080", websocket=True) is None
    assert exposed.refusal("127.0.0.1:8080", "https://review.example.org", websocket=True) is None  # the proxy
    assert exposed.refusal("other.lan:8080", "http://other.lan:8080", websocket=True)
    with pytest.raises(ValueError, match="scheme://host"):
        ServerGuard(extra_origins=("review.example.org/path",))
    a, b = ServerGuard(), ServerGuard()
    assert a.secret != b.secret and a.secret.startswith("arseg-") and len(a.secret) > 40
    assert a.secret_matches(a.secret) and not a.secret_matches("wslink-secret") and not a.secret_matches(None)
    html = a.page_html("<html><head><title>t</title></head></html>")
    assert html.index(a.secret) < html.index("<title>")  # before trame's client module reads the URL


def _chunk(message_id: int, offset: int, total: int, content: bytes = b"") -> bytes:
    return struct.pack("<III", message_id, offset, total) + content


def test_bounded_unchunker_refuses_what_the_page_never_sends():
    msgpack = pytest.importorskip("msgpack", reason="the web extra (trame) is not installed")
    from ARSegLib.web.guard import BoundedUnChunker, MessageLimits, MessageRefused

    limits = MessageLimits(max_message_bytes=4096, max_pending_messages=2, max_pending_bytes=6000)
    u = BoundedUnChunker(limits)
    small = msgpack.packb({"id": "x", "method": "m"})
    assert u.process_chunk(_chunk(1, 0, len(small), small)) == {"id": "x", "method": "m"}  # before the hello
    with pytest.raises(MessageRefused, match="claims"):
        u.process_chunk(_chunk(2, 0, 1000))  # 512 B until the client has authenticated (wslink's own limit)
    u.set_max_message_size(4 * 1024 ** 3)  # what wslink grants an authenticated client
    assert u.max_message_size == 4096
    with pytest.raises(MessageRefused, match="claims 536870912"):
        u.process_chunk(_chunk(3, 0, 512 * MiB, b"abcd"))
    with pytest.raises(MessageRefused, match="past its message"):
        u.process_chunk(_chunk(4, 4000, 4096, b"x" * 200))
    with pytest.raises(MessageRefused, match="no header"):
        u.process_chunk(b"short")
    big = msgpack.packb({"data": "y" * 3000})
    assert u.process_chunk(_chunk(5, 0, len(big), big[:1000])) is None  # one in flight
    assert u.process_chunk(_chunk(6, 0, 2000, b"z")) is None  # two in flight
    with pytest.raises(MessageRefused, match="in flight"):
        u.process_chunk(_chunk(7, 0, 10, b"z"))  # a third: more than two
    assert u.process_chunk(_chunk(5, 1000, len(big), big[1000:])) == {"data": "y" * 3000}
    with pytest.raises(MessageRefused, match="would claim"):
        u.process_chunk(_chunk(8, 0, 4096, b"z"))  # 2000 + 4096 held together: more than 6000


def test_page_state_checks():
    pytest.importorskip("trame_slicer", reason="the web extra (trame-slicer) is not installed")
    from ARSegLib.web import page_state as ps
    from ARSegLib.web.app import parse_ras
    from ARSegLib.web.review import ReviewError

    assert ps.as_fraction("o", 0.25) == 0.25 and ps.as_fraction("o", 1) == 1.0
    for bad in ([1], "0.5", True, float("nan"), 1.5, -0.1, None):
        with pytest.raises(ReviewError, match="number from 0 to 1"):
            ps.as_fraction("o", bad)
    assert ps.as_index("s", 3, 1, 8) == 3 and ps.as_index("s", 3.0, 1, 8) == 3
    for bad in ("3", [3], 3.5, 0, 9, False, None, float("inf")):
        with pytest.raises(ReviewError, match="whole number from 1 to 8"):
            ps.as_index("s", bad, 1, 8)
    assert ps.as_bool("b", True) is True
    for bad in ("yes", 1, [True], None):
        with pytest.raises(ReviewError, match="on or off"):
            ps.as_bool("b", bad)
    assert ps.as_choice("w", "Lung", ("Auto", "Lung")) == "Lung"
    for bad in (["Lung"], "lung", None):
        with pytest.raises(ReviewError, match="one of Auto, Lung"):
            ps.as_choice("w", bad, ("Auto", "Lung"))
    with pytest.raises(ReviewError, match="no such nodule"):
        ps.as_nodule_id(["n1"])
    with pytest.raises(ReviewError, match=r"three numbers.*\.\.\.$"):
        parse_ras("1," * 10000)  # not echoed back whole
    with pytest.raises(ReviewError, match="three numbers"):
        parse_ras([1, 2, 3])


# ============================================================================================ a running server

@pytest.fixture(scope="module")
def served(tmp_path_factory):
    missing = _browser_missing()
    if "trame_slicer" in missing or "EGL" in missing:
        pytest.skip(f"no web page here: {missing}")
    from ARSegLib.web.browser import Page

    p = Page(tmp_path_factory.mktemp("web-safety"), *_volume_and_nodule(),
             env={"ARSEG_WORKER_CONNECT_TIMEOUT_S": str(CONNECT_DEADLINE_S)})
    try:
        p.start_server()
        p.started_at = time.monotonic()
        yield p
    finally:
        p.close()


def _hello(secret) -> bytes:
    import msgpack

    body = msgpack.packb({"wslink": "1.0", "id": "system:c0:0", "method": "wslink.hello",
                          "args": [{"secret": secret}], "kwargs": {}})
    return _chunk(7, 0, len(body), body)


def _decode(frame: bytes):
    import msgpack

    return msgpack.unpackb(frame[12:])


def _page_secret(html: str) -> str:
    """The secret the page's client will use: the one this server hands its page, else trame's default."""
    found = re.search(r"searchParams\.set\('secret','([^']+)'\)", html)
    return found.group(1) if found else "wslink-secret"


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def _connect(session, port, origin="own", host=None):
    headers = {}
    if origin:
        headers["Origin"] = f"http://127.0.0.1:{port}" if origin == "own" else origin
    if host:
        headers["Host"] = host
    return await session.ws_connect(f"ws://127.0.0.1:{port}/ws", headers=headers)


async def _close_code(ws, timeout_s: float = 5.0):
    """How the server closed this websocket ("still open" when it has not within timeout_s)."""
    import aiohttp

    if ws.closed:
        return ws.close_code
    try:
        msg = await ws.receive(timeout=timeout_s)
    except asyncio.TimeoutError:
        return "still open"
    return msg.data if msg.type == aiohttp.WSMsgType.CLOSE else msg.type


def test_raw_clients_with_a_foreign_origin_host_or_secret_are_refused(served):
    import aiohttp
    import msgpack

    port = served.port

    async def attempts():
        out = {}
        async with aiohttp.ClientSession() as s:
            for name, origin, host in (("foreign origin", "http://127.0.0.2:48888", None),
                                       ("other port", f"http://127.0.0.1:{port + 1}", None),
                                       ("no origin", None, None),
                                       ("rebinding", f"http://evil.example:{port}", f"evil.example:{port}")):
                try:
                    ws = await _connect(s, port, origin, host)
                    out[name] = "open"
                    await ws.close()
                except aiohttp.WSServerHandshakeError as e:
                    out[name] = e.status
            page = await s.get(f"http://127.0.0.1:{port}/index.html", headers={"Host": f"evil.example:{port}"})
            out["rebinding page"] = (page.status, await page.text())
            html = await (await s.get(f"http://127.0.0.1:{port}/")).text()
            for secret in ("wslink-secret", "arseg-" + "x" * 43):  # the public default; a guess
                ws = await _connect(s, port)
                await ws.send_bytes(_hello(secret))
                reply = _decode((await ws.receive(timeout=10)).data)
                after = await ws.receive(timeout=10)
                out[f"hello {secret[:8]}"] = (reply.get("error", {}).get("message"), after.type, ws.close_code)
            ws = await _connect(s, port)  # no hello at all: nothing is run
            body = msgpack.packb({"wslink": "1.0", "id": "rpc:c0:1", "method": "application.exit",
                                                "args": [], "kwargs": {}})
            await ws.send_bytes(_chunk(8, 0, len(body), body))
            out["exit unauthenticated"] = _decode((await ws.receive(timeout=10)).data)["error"]["message"]
            await ws.close()
            ws = await _connect(s, port)  # the right secret, from the page this server served: let in
            await ws.send_bytes(_hello(_page_secret(html)))
            out["own page"] = _decode((await ws.receive(timeout=10)).data)
            await ws.close()
        return out

    out = asyncio.run(attempts())
    for name in ("foreign origin", "other port", "no origin", "rebinding"):
        assert out[name] == 403, (name, out[name])
    status, text = out["rebinding page"]
    assert status == 403 and "secret" not in text
    for key in ("hello wslink-s", "hello arseg-xx"):
        message, after_type, code = out[key]
        assert message == "Authentication failed" and code == 1008, (key, out[key])
    assert "Unauthorized" in out["exit unauthenticated"]
    assert "clientID" in out["own page"]["result"], out["own page"]
    assert served.server.poll() is None


def test_oversized_chunk_headers_are_refused_without_allocating(served):
    import aiohttp

    port, pid = served.port, served.server.pid

    async def flood():
        measured = {"rss_before_mib": round(_rss_mib(pid), 1)}
        async with aiohttp.ClientSession() as s:
            html = await (await s.get(f"http://127.0.0.1:{port}/")).text()
            closes = []
            for _ in range(2):
                ws = await _connect(s, port)
                await ws.send_bytes(_hello(_page_secret(html)))
                assert "result" in _decode((await ws.receive(timeout=10)).data)
                for message_id in (101, 102):  # 16 bytes each, claiming 512 MB
                    if not ws.closed:
                        try:
                            await ws.send_bytes(_chunk(message_id, 0, 512 * MiB, b"abcd"))
                        except ConnectionError:
                            break
                    await asyncio.sleep(1.0)
                closes.append(await _close_code(ws))
                await ws.close()
            measured["rss_after_mib"] = round(_rss_mib(pid), 1)
            measured["closes"] = closes
            ws = await _connect(s, port)  # many small messages left unfinished: refused at the fifth
            await ws.send_bytes(_hello(_page_secret(html)))
            await ws.receive(timeout=10)
            for message_id in range(200, 210):
                if ws.closed:
                    break
                try:
                    await ws.send_bytes(_chunk(message_id, 0, 4096, b"x"))
                except ConnectionError:
                    break
                await asyncio.sleep(0.2)
            measured["pending_close"] = await _close_code(ws)
            await ws.close()
        return measured

    measured = asyncio.run(flood())
    print(f"server RSS around four 512 MB chunk headers: {measured}")
    assert measured["rss_after_mib"] - measured["rss_before_mib"] < 64, measured
    assert measured["closes"] == [1009, 1009], measured
    assert measured["pending_close"] == 1009, measured
    assert served.server.poll() is None
    assert "claims 536870912 bytes" in served.log.read_text()


ATTACK_PAGE = """<!doctype html><html><head><title>not the review page</title></head><body><pre id="out"></pre>
<script>
const out = {opened: false, closed: null, reply: null, page: null};
const hello = new Uint8Array(%(hello)s);
const ws = new WebSocket("ws://127.0.0.1:%(port)d/ws");
ws.binaryType = "arraybuffer";
ws.onopen = () => { out.opened = true; ws.send(hello); };
ws.onmessage = (e) => { out.reply = new TextDecoder().decode(new Uint8Array(e.data)); };
ws.onclose = (e) => { out.closed = e.code; };
fetch("http://127.0.0.1:%(port)d/index.html").then(r => r.text()).then(t => { out.page = t; },
                                                   e => { out.page = "refused: " + e; });
setTimeout(() => { document.getElementById("out").textContent = JSON.stringify(out); }, 4000);
</script></body></html>
"""


def _serve_folder(folder: Path, host: str):
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *a, **k):
            super().__init__(*a, directory=str(folder), **k)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer((host, 0), Quiet)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    return httpd


def test_a_page_from_another_origin_cannot_drive_the_review_page(served, tmp_path):
    """A real page on http://127.0.0.2:PORT in the same Chromium: its websocket to the review page is refused at
    the handshake (it would have sent the public default secret), and it cannot read the page (nor its secret).
    The review page itself, opened next, connects and draws."""
    from ARSegLib.web.browser import By

    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "attack.html").write_text(
        ATTACK_PAGE % {"hello": list(_hello("wslink-secret")), "port": served.port})
    httpd = _serve_folder(tmp_path / "site", "127.0.0.2")
    try:
        if served.driver is None:
            served.start_browser()
        served.driver.get(f"http://127.0.0.2:{httpd.server_address[1]}/attack.html")
        served.wait(lambda: served.driver.find_element(By.ID, "out").text, 30, "the attacking page's report")
        out = json.loads(served.driver.find_element(By.ID, "out").text)
    finally:
        httpd.shutdown()
    assert out["opened"] is False and out["reply"] is None, out  # refused before a websocket existed
    assert out["closed"] == 1006 and out["page"].startswith("refused"), out
    assert "refused GET /ws: origin 'http://127.0.0.2:" in served.log.read_text()
    served.open()  # the real page still gets in (its secret comes with it)
    assert "secret" not in served.driver.current_url  # and the address bar does not show it
    assert served.server.poll() is None


def test_preloaded_worker_outlives_its_connect_deadline_and_serves_the_first_click(served):
    """The worker started with the server waits for its client; past its connect deadline (shortened here) it is
    still alive, because the server talks to it from the start, and the page's first click runs in it."""
    from ARSegLib.web.browser import consensus_pixels

    workers = served.worker_pids()
    assert len(workers) == 1, workers
    wait = served.started_at + CONNECT_DEADLINE_S + 4.0 - time.monotonic()
    if wait > 0:
        time.sleep(wait)
    assert served.worker_pids() == workers, "the preloaded worker gave up waiting for its client"
    served.wait(lambda: "model loaded in the worker" in served.log.read_text(), 180, "the model to load")
    _ensure_result(served)
    assert served.worker_pids() == workers  # the same, warm process ran it: no cold start
    assert consensus_pixels(served.settled_axial()) > 300


def _set_state(page, key, value):
    page.driver.execute_script("window.trame.state.set(arguments[0], arguments[1])", key, value)


def _get_state(page, key):
    return page.driver.execute_script("return window.trame.state.get(arguments[0])", key)


def _ensure_result(page):
    """The page open with a finished click (the worker test's, or one made here when that test did not get so far)."""
    if page.driver is None:
        page.start_browser()
    if "127.0.0.1" not in page.driver.current_url:
        page.open()
    if page.text("arseg-run-state") != "done":
        page.goto_nodule()
        page.click_axial_centre()
        assert page.wait_run() == "done", page.text("arseg-run-message")


def test_bad_state_values_are_refused_and_later_clicks_work(served):
    from ARSegLib.web.browser import By, consensus_pixels

    _ensure_result(served)
    log_start = len(served.log.read_text())
    good = {"disagreement_opacity": 0.5, "scale": 8, "show_disagreement": False, "window_preset": "Auto",
            "sample_shown": 0, "include_samples": False, "prompt_mode": "click", "sample_pick": 0}
    assert {k: _get_state(served, k) for k in good} == good
    for key, bad, words in (("disagreement_opacity", [1], "opacity"), ("scale", "3", "scale"),
                            ("scale", 99, "scale"), ("show_disagreement", "yes", "heat map"),
                            ("window_preset", ["Lung"], "window"), ("sample_shown", "2", "sample"),
                            ("include_samples", {"a": 1}, "samples"), ("volume_key", ["v0"], "no such volume"),
                            ("prompt_mode", "delete", "what a click does"), ("sample_pick", 99, "sample picked")):
        _set_state(served, key, bad)
        served.wait(lambda words=words: served.driver.find_elements(By.ID, "arseg-error")
                    and words in served.text("arseg-error"), 15, f"the refusal of {key}={bad!r}")
        served.wait(lambda key=key: _get_state(served, key) == good.get(key, "v0"), 15, f"{key} set back")
        served.driver.execute_script("window.trame.state.set('error_message', '')")
    plain = served.settled_axial()
    served.click_axial_centre()  # a later click: finishes, with its heat map and 3D, as before
    served.wait(lambda: served.text("arseg-run-state") == "running", 30, "the next run to start")
    assert served.wait_run() == "done", served.text("arseg-run-message")
    assert not served.driver.find_elements(By.ID, "arseg-error")
    served.by_id("arseg-disagreement").click()  # the toggle still works
    heat = served.settled_axial(plain)
    assert ((abs(heat - plain).sum(-1) > 30).sum()) > 100, "the disagreement toggle no longer changes the picture"
    assert consensus_pixels(plain) > 300
    assert "Traceback" not in served.log.read_text()[log_start:]  # no callback failed on the way
