"""Running the gateway: `stoker gateway --listen HOST:PORT` (or `python -m stoker.gateway`), or
as a child of `stoker serve` when the configuration's [gateway] listen is set."""

from __future__ import annotations

import argparse
import sys

from stoker.protocol.endpoint import is_loopback


class GatewayError(ValueError):
    """The gateway cannot start as configured (a sentence for the person who configured it)."""


def split_listen(listen: str) -> tuple[str, int]:
    host, _, port = listen.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise GatewayError(f"listen must be HOST:PORT, like 127.0.0.1:8080, not {listen!r}")
    return host.strip("[]"), int(port)


def build(listen: str, endpoint: str, api_keys: tuple[str, ...] = (), api_keys_file: str = "",
          timeout: float = 30.0) -> tuple[object, str, int]:
    """The app, host and port. Keys are required unless it listens on loopback only."""
    from stoker.gateway.app import Gateway, create_app
    from stoker.gateway.auth import KeyError_, Keys

    host, port = split_listen(listen)
    try:
        keys = Keys(api_keys, api_keys_file)
    except KeyError_ as exc:
        raise GatewayError(str(exc)) from None
    if not keys.required and not is_loopback(f"tcp://{host}:{port}"):
        raise GatewayError(f"the gateway would listen on {listen}, which other machines can reach, with no API "
                           "key: set [gateway] api_keys or api_keys_file (callers then send 'Authorization: "
                           "Bearer KEY'), or listen on 127.0.0.1")
    return create_app(Gateway(endpoint, keys, timeout, listen_host=host)), host, port


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="stoker gateway", description="OpenAI- and Ollama-compatible HTTP gateway")
    ap.add_argument("--listen", default="")
    ap.add_argument("--config", default=None)
    ap.add_argument("--endpoint", default=None)
    ap.add_argument("--parent", type=int, default=0, help=argparse.SUPPRESS)  # stoker serve's pid: stop when it goes
    args = ap.parse_args(argv)
    from stoker.supervisor.config import ConfigError, resolve_config

    try:
        cfg = resolve_config(args.config, overrides={"endpoint": args.endpoint})
        listen = args.listen or cfg.gateway.listen or "127.0.0.1:8080"
        app, host, port = build(listen, cfg.supervisor.endpoint, cfg.gateway.api_keys, cfg.gateway.api_keys_file)
    except (ConfigError, GatewayError) as exc:
        print(f"stoker gateway: {exc}", file=sys.stderr)
        return 1
    import uvicorn

    if args.parent:
        _stop_when_orphaned(args.parent)
    print(f"stoker gateway: starting on http://{listen} for the supervisor at {cfg.supervisor.endpoint}",
          file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
    return 0


def _stop_when_orphaned(parent: int) -> None:
    """As `stoker serve`'s child, stop (as on SIGTERM) once the supervisor is gone, even killed
    outright: its next start needs the port, and a gateway with no supervisor serves nothing. It
    runs in its own session (a Ctrl-C is the supervisor's to pass on), so nothing else tells it."""
    import os
    import signal
    import threading
    import time

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        print("stoker gateway: the supervisor that started it is gone; stopping", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()
