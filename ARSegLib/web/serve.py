"""Start the review page: `arseg view` and tests come through `serve()`.

Headless rendering: VTK draws offscreen with EGL (Mesa's llvmpipe without a GPU; no X server needed).
Safe by default: the server binds the loopback address unless a host is given (then it says so, loudly),
serves only the catalog built from the command line, and lets only its own page in (guard.py: host and origin
checked, a random secret per server, bounded messages).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from ..models import DEFAULT_MODEL
from .catalog import VOLUME_SUFFIXES, CatalogError, VolumeCatalog

LOOPBACK = "127.0.0.1"
ORIGINS_ENV = "ARSEG_VIEW_ORIGINS"  # origins of an HTTPS proxy in front of the page (comma-separated)


@dataclass
class ViewOptions:
    """What `arseg view` was asked for."""

    volumes: List[str] = field(default_factory=list)
    data_dirs: List[str] = field(default_factory=list)
    # cases of a model of several inputs given input by input, {input name or title: path} each (`--input`)
    cases: List[Dict[str, str]] = field(default_factory=list)
    host: Optional[str] = None  # None: loopback only
    port: int = 8080  # 0: any free port (printed)
    model: str = DEFAULT_MODEL
    device: str = "auto"
    n_samples: int = 16
    open_first: bool = True  # open the first volume of the catalog when the page starts
    extra_origins: Tuple[str, ...] = ()  # besides the page's own origin (a proxy's); also from $ARSEG_VIEW_ORIGINS


def exposure_warning(host: str) -> str:
    return (f"\n{'!' * 78}\n!! arseg view is listening on {host}, not only on this machine's loopback address.\n"
            f"!! Anyone who can reach this address can open the page, see the listed scans and run the model.\n"
            f"!! The page has no login and no encryption: put it behind an authenticating HTTPS proxy, or\n"
            f"!! leave out --host (the default, {LOOPBACK}) and tunnel instead (ssh -L).\n{'!' * 78}\n")


def prepare_rendering():
    """Offscreen OpenGL through EGL unless the user chose otherwise (silences VTK's X11 fallback warning)."""
    os.environ.setdefault("VTK_DEFAULT_OPENGL_WINDOW", "vtkEGLRenderWindow")


def build_catalog(options: ViewOptions, card=None) -> VolumeCatalog:
    """What the page may open, for this model: volumes, or cases of its several inputs; nothing is an error."""
    task = getattr(card, "task", None)
    catalog = VolumeCatalog.from_arguments(options.volumes, options.data_dirs, task=task, cases=options.cases)
    if not len(catalog):
        if task is not None and len(task.inputs) > 1:
            names = ", ".join(f"{i.title} ({i.name})" for i in task.inputs)
            raise CatalogError(f"nothing to show: model {card.name!r} takes {names}: give --data-dir folders with a "
                               f"folder per case holding a volume file named after each input (e.g. "
                               f"{'.nii.gz, '.join(task.input_names)}.nii.gz), or each case's files, or a case as "
                               f"{' '.join(f'--input {n}=PATH' for n in task.input_names)}")
        raise CatalogError("nothing to show: give CT files or --data-dir folders that hold volume files "
                           f"({', '.join(VOLUME_SUFFIXES)})")
    return catalog


def build_app(options: ViewOptions, server=None, client=None):
    """The app and its session, not yet serving (tests build it without a browser too). A model whose card names
    several inputs is offered cases (catalog.py: a folder's files grouped by input, or options.cases)."""
    from ..models import read_card

    card = read_card(options.model)  # the card only (no torch): which inputs a case has
    catalog = build_catalog(options, card)
    prepare_rendering()
    from trame.app import get_server

    from .app import ARSegWebApp
    from .inference import make_client
    from .review import ReviewSettings

    client = client if client is not None else make_client(options.model, options.device)
    server = server if server is not None else get_server(f"arseg-view-{id(options)}", client_type="vue3")
    app = ARSegWebApp(server, catalog, client, card, ReviewSettings(n_samples=options.n_samples))
    if options.open_first and len(catalog):
        app.state.volume_key = next(iter(catalog)).key
        app._on_volume_key(app.state.volume_key)
    return app


def make_guard(options: ViewOptions):
    """The server's door (guard.py) for these options; a malformed allowed origin is one clear error, now."""
    from .guard import ServerGuard, extra_origins_from

    origins = tuple(options.extra_origins) + extra_origins_from(os.environ.get(ORIGINS_ENV))
    try:
        return ServerGuard(bind_host=options.host or LOOPBACK, extra_origins=origins)
    except ValueError as e:
        raise CatalogError(f"{ORIGINS_ENV}: {e}") from e


def serve(options: ViewOptions) -> int:
    """Build the app, start the inference client, serve until interrupted; the client is shut down on the way out."""
    from .guard import install

    t0 = time.perf_counter()
    guard = make_guard(options)
    app = build_app(options)
    install(app.server, guard)
    host = options.host or LOOPBACK
    if options.host is not None and options.host not in (LOOPBACK, "localhost", "::1"):
        print(exposure_warning(host), file=sys.stderr, flush=True)
    if app.session.catalog.truncated:
        print(f"arseg view: only the first {len(app.session.catalog)} volumes are listed", file=sys.stderr)
    load_run = app.session.client.start()

    def ready(**_):
        app.preload(load_run)  # from the loop, now that it runs: the worker is connected to at once
        port = app.server.port
        what = "case(s) of several inputs" if app.session.several_inputs else "volume(s)"
        print(f"arseg view: serving {len(app.session.catalog)} {what} at http://{host}:{port}/ "
              f"(ready in {time.perf_counter() - t0:.1f} s)", flush=True)

    app.server.controller.on_server_ready.add(ready)
    # trame parses sys.argv for options of its own (some serve folders); ours are parsed already: it sees none
    argv, sys.argv = sys.argv, sys.argv[:1]
    try:
        app.server.start(host=host, port=options.port, open_browser=False, show_connection_info=False, timeout=0)
    finally:
        sys.argv = argv
        app.session.client.shutdown()
    return 0
