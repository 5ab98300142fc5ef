"""The `stoker` command: run the supervisor, and talk to it.

Exit codes: 0 success, 1 unexpected error, 2 cannot reach the supervisor, 3 model error
(unknown model, load failed, worker crashed), 4 timeout.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable, NoReturn, Optional

import typer
from loguru import logger

from stoker.protocol.client import Client, End, Info, Token
from stoker.protocol.errors import ModelError, StokerError, Timeout, Unreachable
from stoker.supervisor.config import Config, ConfigError, resolve_config

EXIT_OK, EXIT_ERROR, EXIT_UNREACHABLE, EXIT_MODEL, EXIT_TIMEOUT = 0, 1, 2, 3, 4

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    help="stoker: a process supervisor for local LLM inference.",
)

ConfigOpt = typer.Option(None, "--config", "-c", help="TOML configuration file.")
EndpointOpt = typer.Option(None, "--endpoint", "-e", help="ZeroMQ endpoint (ipc:// or tcp://).")
JsonOpt = typer.Option(False, "--json", help="Print JSON for scripts.")


def _config(config: Optional[Path], endpoint: Optional[str], **overrides: Any) -> Config:
    try:
        return resolve_config(config, overrides={"endpoint": endpoint, **overrides})
    except ConfigError as exc:
        typer.echo(f"stoker: configuration error: {exc}", err=True)
        raise typer.Exit(EXIT_ERROR) from None


def _exit_code(exc: StokerError) -> int:
    if isinstance(exc, Unreachable):
        return EXIT_UNREACHABLE
    if isinstance(exc, Timeout):
        return EXIT_TIMEOUT
    if isinstance(exc, ModelError):
        return EXIT_MODEL
    return EXIT_ERROR


def _fail(exc: StokerError) -> NoReturn:
    typer.echo(f"stoker: {exc.message}", err=True)
    raise typer.Exit(_exit_code(exc))


@app.command()
def serve(
    config: Optional[Path] = ConfigOpt,
    endpoint: Optional[str] = EndpointOpt,
    idle_timeout: Optional[float] = typer.Option(None, help="Seconds an idle model stays loaded."),
    log_level: str = typer.Option("INFO", help="DEBUG, INFO, WARNING or ERROR."),
) -> None:
    """Run the supervisor in the foreground until SIGTERM, SIGINT or `stoker stop`."""
    from stoker.supervisor.frontend import AlreadyRunning
    from stoker.supervisor.server import Supervisor

    cfg = _config(config, endpoint, idle_timeout=idle_timeout)
    logger.remove()
    logger.add(sys.stderr, level=log_level.upper(), format="{time:YYYY-MM-DD HH:mm:ss.SSS} {level:<7} {message}")
    try:
        code = Supervisor(cfg).serve()
    except AlreadyRunning as exc:
        typer.echo(f"stoker: {exc}", err=True)
        raise typer.Exit(EXIT_UNREACHABLE) from None
    except PermissionError as exc:
        typer.echo(f"stoker: refusing to serve: {exc}", err=True)
        raise typer.Exit(EXIT_ERROR) from None
    raise typer.Exit(code)


@app.command()
def run(
    prompt: str = typer.Argument(..., help="The prompt to complete."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model name (default: the configured default)."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", "-n", min=1),
    temperature: Optional[float] = typer.Option(None, "--temperature", "-t", min=0.0),
    seed: Optional[int] = typer.Option(None, "--seed", min=0),
    timeout: float = typer.Option(600.0, help="Give up after this many seconds without a reply."),
    start: bool = typer.Option(True, "--start/--no-start", help="Start a supervisor if none answers."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Print progress and timings to stderr."),
    config: Optional[Path] = ConfigOpt,
    endpoint: Optional[str] = EndpointOpt,
) -> None:
    """Complete PROMPT, printing tokens as they arrive."""
    cfg = _config(config, endpoint)
    ep = cfg.supervisor.endpoint
    try:
        _ensure_supervisor(cfg, config, start)
        with Client(ep, timeout=timeout) as client:
            for ev in client.stream(prompt, model=model, max_tokens=max_tokens, temperature=temperature, seed=seed):
                if isinstance(ev, Token):
                    sys.stdout.write(ev.text)
                    sys.stdout.flush()
                elif isinstance(ev, Info) and verbose:
                    typer.echo(f"[{ev.state}]", err=True)
                elif isinstance(ev, End):
                    sys.stdout.write("\n")
                    if verbose:
                        typer.echo(f"[{ev.reason}] usage={dict(ev.usage)} timings={dict(ev.timings)}", err=True)
    except StokerError as exc:
        sys.stdout.write("\n") if sys.stdout.isatty() else None
        _fail(exc)


def _ensure_supervisor(cfg: Config, config_file: Optional[Path], start: bool) -> None:
    from stoker.supervisor.autostart import start_detached, wait_ready

    ep = cfg.supervisor.endpoint
    with Client(ep) as client:
        try:
            client.ping(timeout=1.5)
            return
        except Unreachable:
            if not start:
                raise
    proc, log_path = start_detached(str(config_file) if config_file else cfg.source or None, ep,
                                    Path(cfg.supervisor.state_dir))
    typer.echo(f"stoker: started a supervisor at {ep} (log: {log_path})", err=True)
    wait_ready(ep, proc, log_path)


def _connect(config: Optional[Path], endpoint: Optional[str]) -> Client:
    cfg = _config(config, endpoint)
    client = Client(cfg.supervisor.endpoint, timeout=30.0)
    try:
        client.ping()
    except StokerError as exc:
        client.close()
        _fail(exc)
    return client


def _ask(config: Optional[Path], endpoint: Optional[str], call: Callable[[Client], dict]) -> dict:
    """One request to a running supervisor; exits with the right code if it fails."""
    with _connect(config, endpoint) as client:
        try:
            return call(client)
        except StokerError as exc:
            _fail(exc)


@app.command()
def status(json_out: bool = JsonOpt, config: Optional[Path] = ConfigOpt, endpoint: Optional[str] = EndpointOpt) -> None:
    """Show the supervisor, its workers and its queues."""
    data = _ask(config, endpoint, Client.status)
    if json_out:
        typer.echo(json.dumps(data, indent=2))
        return
    sup = data["supervisor"]
    typer.echo(f"stoker {sup['version']}  pid {sup['pid']}  {sup['state']}  up {sup['uptime_s']:.0f} s  {sup['endpoint']}")
    mem = data.get("memory", {})
    for label, key in (("RAM", "ram"), ("VRAM", "vram")):
        b = mem.get(key, {})
        if b.get("budget") is None:
            typer.echo(f"{label:<4}  not budgeted" + ("  (no GPU)" if key == "vram" and not sup.get("gpu") else ""))
        else:
            typer.echo(f"{label:<4}  budget {_mib(b['budget'])}  used {_mib(b['used'])}  free {_mib(b['free'])}")
    if mem.get("waiting"):
        typer.echo(f"waiting for memory: {', '.join(mem['waiting'])}")
    rows = [[w["id"], str(w["pid"]), w["model"] + (" (pinned)" if w.get("pinned") else ""), w["state"],
             _mib(w["rss_bytes"]), _mib(w["vram_bytes"]),
             _mib(w.get("charged_ram_bytes", 0)) + ("" if w.get("measured") else " est."),
             f"{w['idle_s']:.0f}", str(w["served"])] for w in data["workers"]]
    typer.echo(_table(["WORKER", "PID", "MODEL", "STATE", "RSS", "VRAM", "COUNTED", "IDLE_S", "SERVED"], rows)
               if rows else "no workers")
    queues = data["queues"]
    typer.echo("queues: " + (", ".join(f"{name} {depth}" for name, depth in queues.items()) if queues else "empty"))


@app.command()
def models(json_out: bool = JsonOpt, config: Optional[Path] = ConfigOpt, endpoint: Optional[str] = EndpointOpt) -> None:
    """List the configured models."""
    data = _ask(config, endpoint, Client.models)
    if json_out:
        typer.echo(json.dumps(data, indent=2))
        return
    rows = [[("* " if r["name"] == data["default"] else "  ") + r["name"], r["backend"],
             "yes" if r["loaded"] else "no", _mib(r["size_bytes"]),
             _mib(r.get("ram_bytes", 0)) + ("" if r.get("memory_measured") else " est."), _mib(r.get("vram_bytes", 0)),
             str(r.get("replicas", 1)), r["path"] or "-"] for r in data["models"]]
    typer.echo(_table(["  NAME", "BACKEND", "LOADED", "SIZE", "RAM", "VRAM", "REPLICAS", "PATH"], rows)
               if rows else "no models configured")


@app.command()
def load(
    model: str = typer.Argument(..., help="The model to load (see `stoker models`)."),
    pin: bool = typer.Option(False, "--pin", help="Keep it loaded: never evict it or unload it when idle, "
                                                  "until `stoker unload`."),
    config: Optional[Path] = ConfigOpt,
    endpoint: Optional[str] = EndpointOpt,
) -> None:
    """Load a model now and wait until it is ready; also retries a model marked failed."""
    with _connect(config, endpoint) as client:
        client.timeout = None  # a large model can take minutes; the supervisor answers either way
        try:
            client.load(model, pin=pin)
        except StokerError as exc:
            _fail(exc)
    typer.echo(f"stoker: model '{model}' is loaded" + (" and pinned" if pin else ""))


@app.command()
def unload(
    model: str = typer.Argument(..., help="The model to unload."),
    config: Optional[Path] = ConfigOpt,
    endpoint: Optional[str] = EndpointOpt,
) -> None:
    """Stop a model's workers (busy ones after their request) and wait until they have exited."""
    _ask(config, endpoint, lambda client: client.unload(model))
    typer.echo(f"stoker: model '{model}' is unloaded")


@app.command()
def stop(config: Optional[Path] = ConfigOpt, endpoint: Optional[str] = EndpointOpt) -> None:
    """Shut the supervisor down gracefully and wait until it has exited."""
    with _connect(config, endpoint) as client:
        try:
            client.shutdown()
        except StokerError as exc:
            _fail(exc)
        ep = client.endpoint
    _wait_gone(ep)
    typer.echo(f"stoker: supervisor at {ep} stopped")


def _wait_gone(endpoint: str, timeout: float = 60.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    with Client(endpoint) as client:
        while time.monotonic() < deadline:
            try:
                client.ping(timeout=0.5)
            except Unreachable:
                return
            time.sleep(0.1)
    typer.echo(f"stoker: the supervisor at {endpoint} is still answering after {timeout:.0f} s", err=True)
    raise typer.Exit(EXIT_TIMEOUT)


def _mib(n: int) -> str:
    return f"{n / 2**20:.0f} MiB" if n else "-"


def _table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows])


def main() -> None:
    app()
