"""Running the service: uvicorn, one process, on a socket bound here (so ``port=0`` picks a free port).

* :func:`serve` — blocks until SIGINT/SIGTERM; graceful shutdown closes the feedback log.
* :func:`background_server` — a context manager running a real uvicorn server in a thread on a free loopback
  port, for tests and notebooks; yields the base URL.
* ``python -m funnelrec.serving.server --backend SPEC [key=value ...]`` — the command line: ``SPEC`` names a
  factory returning a backend, as ``package.module:function`` or ``path/to/file.py:function``; ``--backend-arg
  name=value`` (repeatable, values parsed as YAML scalars) are passed to it; ``key=value`` overrides set
  :class:`~funnelrec.serving.app.ServiceConfig` fields (``port=0 log_dir=/tmp/fb``); ``--port-file PATH``
  receives the bound port once the socket is bound. The model-bundle entry (``funnelrec serve --bundle``)
  builds its backend and calls :func:`serve` the same way.

All of it is ours.

Example:
    >>> import httpx, tempfile
    >>> from funnelrec.serving.app import ServiceConfig, create_app
    >>> from funnelrec.serving.schemas import RecommendResponse
    >>> class Echo:
    ...     def recommend(self, r):
    ...         return RecommendResponse(user_id=r.user_id, request_id=r.request_id, items=[])
    ...     def observe(self, events): pass
    ...     def describe(self): return {"name": "echo"}
    >>> app = create_app(Echo(), ServiceConfig(log_dir=tempfile.mkdtemp()))
    >>> with background_server(app) as url:
    ...     httpx.post(f"{url}/recommend", json={"user_id": 3, "request_id": "r1"}).json()["request_id"]
    'r1'
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import importlib
import importlib.util
import logging
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

from funnelrec.errors import ConfigError, FunnelrecError

__all__ = ["serve", "background_server", "bind_socket", "load_factory", "main"]


def bind_socket(host: str, port: int) -> socket.socket:
    """A TCP socket bound to ``(host, port)`` (port 0 = a free one), ready for uvicorn."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # proto IPPROTO_TCP: asyncio sets TCP_NODELAY on accepted connections only for such sockets; without it
    # Nagle + delayed ACKs add ~40 ms to every response written in two parts (headers, then body)
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as err:
        sock.close()
        raise ConfigError(f"serve: cannot bind {host}:{port} ({err.strerror})") from None
    sock.set_inheritable(True)
    return sock


def _uvicorn_server(app, log_level: str):
    import uvicorn

    cfg = uvicorn.Config(app, log_level=log_level, lifespan="on", access_log=False,
                         timeout_graceful_shutdown=5)
    return uvicorn.Server(cfg)


def serve(backend, config=None, *, port_file: str | Path | None = None) -> None:
    """Serve ``backend`` over HTTP with uvicorn (single process) until interrupted.

    Args:
        backend: a :class:`~funnelrec.serving.backend.ServingBackend`.
        config: :class:`~funnelrec.serving.app.ServiceConfig` (default: loopback, port 8000).
        port_file: if given, the bound port is written there (useful with ``port=0``).
    """
    from funnelrec.serving.app import ServiceConfig, create_app

    config = ServiceConfig() if config is None else config
    app = create_app(backend, config)
    sock = bind_socket(config.host, config.port)
    port = sock.getsockname()[1]
    if port_file is not None:
        tmp = Path(f"{port_file}.tmp")
        tmp.write_text(str(port))
        tmp.replace(port_file)
    print(f"funnelrec serving on http://{config.host}:{port} (feedback log {config.log_dir})", flush=True)
    server = _uvicorn_server(app, config.log_level)
    server.run(sockets=[sock])
    if not server.started:
        raise SystemExit("funnelrec serving: start-up failed (see the log above)")


@contextlib.contextmanager
def background_server(app, host: str = "127.0.0.1", *, log_level: str = "warning",
                      startup_timeout_s: float = 60.0) -> Iterator[str]:
    """Run ``app`` with a real uvicorn server in a daemon thread on a free port; yields ``http://host:port``.

    The server has finished its start-up (log replay) when the block starts and is shut down gracefully after
    it.
    """
    sock = bind_socket(host, 0)
    port = sock.getsockname()[1]
    server = _uvicorn_server(app, log_level)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True, name="uvicorn")
    thread.start()
    deadline = time.monotonic() + startup_timeout_s
    while not server.started:
        if not thread.is_alive():
            sock.close()
            raise RuntimeError("the server stopped during start-up (see the log above)")
        if time.monotonic() > deadline:
            server.should_exit = True
            raise TimeoutError(f"the server did not start within {startup_timeout_s} s")
        time.sleep(0.01)
    try:
        yield f"http://{host}:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def load_factory(spec: str) -> Callable[..., Any]:
    """The callable named by ``module.path:name`` or ``path/to/file.py:name``.

    Example:
        >>> load_factory("funnelrec.serving.history:LiveTimelines").__name__
        'LiveTimelines'
    """
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise ConfigError(f"serve: --backend must look like module:function or file.py:function, "
                          f"got {spec!r}")
    if target.endswith(".py"):
        path = Path(target)
        if not path.is_file():
            raise ConfigError(f"serve: --backend file {path} does not exist")
        mod_name = f"_funnelrec_backend_{path.stem}"
        spec_ = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(spec_)
        sys.modules[mod_name] = module
        spec_.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as err:
            raise ConfigError(f"serve: cannot import {target!r} ({err})") from None
    fn = getattr(module, name, None)
    if not callable(fn):
        raise ConfigError(f"serve: {target} has no callable {name!r}")
    return fn


def main(argv: Sequence[str] | None = None) -> None:
    """The command line: ``--backend SPEC [--backend-arg K=V ...] [--port-file P] [K=V ...]``."""
    import yaml

    from funnelrec.config import load_config
    from funnelrec.serving.app import ServiceConfig

    parser = argparse.ArgumentParser(prog="python -m funnelrec.serving.server",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--backend", required=True,
                        help="factory of the backend: module:function or file.py:function")
    parser.add_argument("--backend-arg", action="append", default=[], metavar="NAME=VALUE",
                        help="keyword argument for the factory (repeatable; YAML scalar)")
    parser.add_argument("--port-file", default=None, help="write the bound port to this file")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="ServiceConfig fields, e.g. port=0")
    args = parser.parse_args(argv)
    kwargs = {}
    for item in args.backend_arg:
        name, sep, value = item.partition("=")
        if not sep or not name:
            parser.error(f"--backend-arg must be NAME=VALUE, got {item!r}")
        kwargs[name] = yaml.safe_load(value)
    try:
        config = dataclasses.replace(load_config(ServiceConfig, None, args.overrides))  # re-validates
        logging.basicConfig(level=config.log_level.upper() if config.log_level != "trace" else "DEBUG")
        backend = load_factory(args.backend)(**kwargs)
    except FunnelrecError as err:
        parser.exit(2, f"error: {err}\n")
    serve(backend, config, port_file=args.port_file)


if __name__ == "__main__":
    main()
