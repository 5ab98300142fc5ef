"""The `stoker` command: run the supervisor, and talk to it.

Exit codes: 0 success, 1 unexpected error, 2 cannot reach the supervisor (or it went away and
stayed away), 3 model error (unknown model, load failed, worker crashed), 4 a request's deadline
passed, 5 `stoker batch` cannot write its output (a full disk).
"""

from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, NoReturn, Optional

import typer
from loguru import logger

from stoker.protocol.client import Client, End, Info, Token
from stoker.protocol.errors import ModelError, ShuttingDown, StokerError, Timeout, Unreachable
from stoker.protocol.results import Models, Status
from stoker.supervisor.config import Config, ConfigError, ModelConfig, resolve_config
from stoker.supervisor.logs import printable
from stoker.supervisor.metrics import MetricsUnavailable

EXIT_OK, EXIT_ERROR, EXIT_UNREACHABLE, EXIT_MODEL, EXIT_TIMEOUT, EXIT_OUTPUT = 0, 1, 2, 3, 4, 5

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    help="stoker: a process supervisor for local LLM inference.",
)

ConfigOpt = typer.Option(None, "--config", "-c", help="TOML configuration file.")
StartOpt = typer.Option(True, "--start/--no-start", help="Start a supervisor if none answers.")
# stoker batch and stoker embed
RetryFailedOpt = typer.Option(False, "--retry-failed", help="Run again the items OUTPUT has as errors.")
JobTimeoutOpt = typer.Option(30.0, "--timeout", help="Stop if the supervisor does not answer (a ping) for this long.")
EndpointOpt = typer.Option(None, "--endpoint", "-e", help="ZeroMQ endpoint (ipc:// or tcp://).")
JsonOpt = typer.Option(False, "--json", help="Print JSON for scripts.")
ServerKeyOpt = typer.Option(None, "--server-key", metavar="FILE", help="For a tcp:// supervisor secured with CurveZMQ: "
                            "its public key (a .key file); else STOKER_SERVER_KEY.")
ClientKeyOpt = typer.Option(None, "--client-key", metavar="FILE", help="This client's key pair (a .key_secret file "
                            "from `stoker keys`); else STOKER_CLIENT_KEY.")


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
    typer.echo(f"stoker: {printable(exc.message)}", err=True)
    raise typer.Exit(_exit_code(exc))


@app.command()
def serve(
    config: Optional[Path] = ConfigOpt,
    endpoint: Optional[str] = EndpointOpt,
    idle_timeout: Optional[float] = typer.Option(None, help="Seconds an idle model stays loaded."),
    log_level: Optional[str] = typer.Option(None, help="DEBUG, INFO, WARNING or ERROR (default INFO)."),
    metrics: Optional[str] = typer.Option(None, help="Serve Prometheus metrics at HOST:PORT."),
    quiet: bool = typer.Option(False, "--quiet", hidden=True, help="Log to the file only (auto-start)."),
) -> None:
    """Run the supervisor in the foreground until SIGTERM, SIGINT or `stoker stop`."""
    import os

    from stoker.supervisor import logs
    from stoker.supervisor.frontend import AlreadyRunning
    from stoker.supervisor.server import Supervisor

    cfg = _config(config, endpoint, idle_timeout=idle_timeout, log_level=log_level, metrics=metrics)
    try:
        log_file = logs.setup(cfg.supervisor.log_level.upper(), Path(cfg.supervisor.state_dir), os.environ,
                              stderr=not quiet)
    except OSError as exc:
        typer.echo(f"stoker: cannot write the log in {cfg.supervisor.state_dir}: {exc.strerror}", err=True)
        raise typer.Exit(EXIT_ERROR) from None
    logger.info("log file: {}", log_file)
    for note in cfg.notes:
        logger.warning("{}", note)
    try:
        code = Supervisor(cfg).serve()
    except AlreadyRunning as exc:
        typer.echo(f"stoker: {exc}", err=True)
        raise typer.Exit(EXIT_UNREACHABLE) from None
    except PermissionError as exc:
        typer.echo(f"stoker: refusing to serve: {exc}", err=True)
        raise typer.Exit(EXIT_ERROR) from None
    except MetricsUnavailable as exc:
        typer.echo(f"stoker: {exc}", err=True)
        raise typer.Exit(EXIT_ERROR) from None
    raise typer.Exit(code)


@app.command()
def run(
    prompt: str = typer.Argument(..., help="The prompt to complete."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model name (default: the configured default)."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", "-n", min=1),
    temperature: Optional[float] = typer.Option(None, "--temperature", "-t", min=0.0),
    seed: Optional[int] = typer.Option(None, "--seed", min=0),
    deadline: Optional[float] = typer.Option(None, "--deadline", min=0.001,
                                             help="Seconds the request may take in all; then it ends (exit 4)."),
    timeout: float = typer.Option(30.0, help="Give up if the supervisor does not answer (a ping) for this long."),
    start: bool = StartOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Print progress and timings to stderr."),
    server_key: Optional[Path] = ServerKeyOpt,
    client_key: Optional[Path] = ClientKeyOpt,
    config: Optional[Path] = ConfigOpt,
    endpoint: Optional[str] = EndpointOpt,
) -> None:
    """Complete PROMPT, printing tokens as they arrive."""
    cfg = _config(config, endpoint)
    ep = cfg.supervisor.endpoint
    try:
        _ensure_supervisor(cfg, config, start, server_key, client_key)
        with Client(ep, timeout=timeout, server_key=server_key, client_key=client_key) as client:
            for ev in client.stream(prompt, model=model, max_tokens=max_tokens, temperature=temperature, seed=seed,
                                    deadline=deadline):
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


def _read_schema(path: Path) -> dict[str, Any]:
    """The JSON schema in `path`, checked as one before any item runs."""
    import jsonschema

    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        typer.echo(f"stoker: cannot read {path}: {exc.strerror}", err=True)
        raise typer.Exit(EXIT_ERROR) from None
    except ValueError as exc:
        typer.echo(f"stoker: {path} is not JSON: {exc}", err=True)
        raise typer.Exit(EXIT_ERROR) from None
    if not isinstance(schema, dict):
        typer.echo(f"stoker: {path} must hold a JSON schema (an object), not {type(schema).__name__}", err=True)
        raise typer.Exit(EXIT_ERROR)
    try:
        jsonschema.validators.validator_for(schema).check_schema(schema)
    except jsonschema.SchemaError as exc:
        typer.echo(f"stoker: {path} is not a valid JSON schema: {exc.message}", err=True)
        raise typer.Exit(EXIT_ERROR) from None
    return schema


@app.command()
def batch(
    input_path: str = typer.Argument(..., metavar="INPUT.jsonl", help="One JSON object per line; - reads stdin."),
    output: Path = typer.Option(..., "--output", "-o", help="Results, one JSON line per item (appended)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="Model for items that name none."),
    concurrency: int = typer.Option(8, "--concurrency", "-j", min=1, help="Requests in flight at once."),
    schema: Optional[Path] = typer.Option(None, "--schema", help="A JSON schema file: every item's text is JSON "
                                          "that fits it (an item's own response_format or grammar wins)."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", min=1, help="For items that set none."),
    temperature: Optional[float] = typer.Option(None, "--temperature", min=0.0, help="For items that set none."),
    seed: Optional[int] = typer.Option(None, "--seed", min=-1, help="For items that set none."),
    stop: Optional[list[str]] = typer.Option(None, "--stop", help="A stop string, for items that set none "
                                             "(repeat for more)."),
    retry_failed: bool = RetryFailedOpt,
    seed_by_id: bool = typer.Option(False, "--seed-by-id", help="Items without a seed (and no --seed) get one from their id "
                                    "(a run again gives the same texts; --ray does this)."),
    ray_address: Optional[str] = typer.Option(None, "--ray", metavar="[ADDRESS]",
                                              help="Run on a Ray cluster (the ray extra): ADDRESS, or RAY_ADDRESS, or "
                                                   "a Ray of its own for this run."),
    parts: bool = typer.Option(False, "--parts", help="With --ray: OUTPUT is a folder every node reaches, and each "
                               "task writes its own part file there (for results too large for one driver)."),
    timeout: float = JobTimeoutOpt,
    start: bool = StartOpt,
    server_key: Optional[Path] = ServerKeyOpt,
    client_key: Optional[Path] = ClientKeyOpt,
    config: Optional[Path] = ConfigOpt,
    endpoint: Optional[str] = EndpointOpt,
) -> None:
    """Run every prompt of INPUT.jsonl; resumable: ids already in OUTPUT are skipped.

    Input lines: {"id": ..., "prompt": ... | "messages": [...], "model"?, sampling keys...}.
    Output lines: {"id", "text", "usage", "timings"} or {"id", "error": {"code", "message"}};
    with a schema (--schema, or an item's response_format) also "json": the parsed text, or an
    "invalid_output" error beside the text when it does not parse or fit.
    Exit 0 when every item succeeded, 3 when some failed (their errors are in OUTPUT).
    """
    from stoker.supervisor import batch as b

    cfg = _config(config, endpoint)
    defaults: dict[str, Any] = {key: value for key, value in (
        ("model", model), ("max_tokens", max_tokens), ("temperature", temperature), ("seed", seed),
        ("stop", list(stop) if stop else None)) if value is not None}
    if schema is not None:
        defaults["response_format"] = {"type": "json_schema", "schema": _read_schema(schema)}

    def parse(source: Any) -> tuple[list[Any], list[str]]:
        items, problems = b.parse_items(source)
        # An item's own seed, else --seed, else one from its id: each gives the same text on a rerun.
        by_id = (seed_by_id or ray_address is not None) and (seed is None or seed < 0)  # (-1: random)
        return (b.with_id_seeds(items) if by_id else items), problems

    if ray_address is not None:
        try:
            from stoker.cluster import driver
        except ImportError:
            typer.echo("stoker: --ray needs the ray extra: pip install 'stoker[ray]'", err=True)
            raise typer.Exit(EXIT_ERROR) from None
        say = (lambda text: typer.echo(f"stoker: ray: {text}", err=True))
        address = None if ray_address == "auto" else ray_address
        folder = str(output.resolve()) if parts else None
        _journal_run(input_path, output, retry_failed, cfg, config, start, server_key, client_key, timeout, parse,
                     lambda todo, client, out, progress, on_change: driver.run_on_ray(
                         todo, out, cfg, defaults, progress, on_change, address, say, parts=folder), local=False,
                     read=driver.read_parts if parts else None, opener=driver.PartsFolder if parts else None)
    if parts:
        typer.echo("stoker: --parts goes with --ray", err=True)
        raise typer.Exit(EXIT_ERROR)
    _journal_run(input_path, output, retry_failed, cfg, config, start, server_key, client_key, timeout, parse,
                 lambda todo, client, out, progress, on_change: b.run_items(todo, client, out, concurrency, defaults,
                                                                            progress, on_change))


def _journal_run(input_path: str, output: Path, retry_failed: bool, cfg: Config, config: Optional[Path],
                 start: bool, server_key: Optional[Path], client_key: Optional[Path], timeout: float,
                 parse: Callable[[Any], tuple[list[Any], list[str]]], run: Callable[..., Any],
                 label: str = "batch", after: Optional[Callable[[list[Any]], None]] = None,
                 local: bool = True, read: Optional[Callable[[str], Any]] = None,
                 opener: Optional[Callable[[str], Any]] = None) -> NoReturn:
    """What `stoker batch` and `stoker embed` share: read INPUT, skip what OUTPUT has done, run the
    rest with `run(todo, client, output, progress, on_change)` behind a progress bar, sum up,
    and exit with the code the outcome calls for. `after(items)` runs once every item is done."""
    import asyncio

    from stoker.protocol.async_client import AsyncClient
    from stoker.supervisor import batch as b

    try:
        with b.open_input(input_path, sys.stdin) as source:
            items, problems = parse(source)
    except OSError as exc:
        typer.echo(f"stoker: cannot read {input_path}: {exc.strerror}", err=True)
        raise typer.Exit(EXIT_ERROR) from None
    for problem in problems:
        typer.echo(f"stoker: {input_path}: {problem}", err=True)
    if not items and problems:
        typer.echo(f"stoker: {input_path} has no valid items", err=True)
        raise typer.Exit(EXIT_ERROR)
    try:
        previous, notes = (read or b.read_output)(str(output))
    except OSError as exc:
        typer.echo(f"stoker: cannot read {output}: {exc.strerror}", err=True)
        raise typer.Exit(EXIT_ERROR) from None
    for note in notes:
        typer.echo(f"stoker: {note}", err=True)
    todo = [i for i in items if i.id not in previous or (retry_failed and not previous[i.id])]
    progress = b.Progress(total=len(items), skipped=len(items) - len(todo))

    async def go(on_change: Callable[[], None]) -> None:
        async with AsyncClient(cfg.supervisor.endpoint, timeout=timeout, server_key=server_key,
                               client_key=client_key) as client:
            await run(todo, client, out, progress, on_change)

    fatal: Optional[StokerError] = None
    output_failed = ""
    interrupted = False
    cluster_failed = ""
    if todo:
        try:
            if local:  # (a Ray run's supervisors are on the cluster's nodes)
                _ensure_supervisor(cfg, config, start, server_key, client_key)
        except StokerError as exc:
            _fail(exc)
        try:
            out = (opener or b.Output)(str(output))
        except OSError as exc:
            typer.echo(f"stoker: cannot write {output}: {exc.strerror}", err=True)
            raise typer.Exit(EXIT_ERROR) from None
        except b.OutputBusy as exc:
            typer.echo(f"stoker: {exc}", err=True)
            raise typer.Exit(EXIT_ERROR) from None
        try:
            with _batch_display(progress, label) as refresh:
                if local:
                    asyncio.run(go(refresh))
                else:
                    run(todo, None, out, progress, refresh)
        except b.Fatal as exc:
            fatal = exc.error
        except RuntimeError as exc:  # a cluster that cannot run the job (ClusterError, or Ray's own)
            if local:
                raise
            cluster_failed = str(exc)
        except b.OutputFailed as exc:
            output_failed = str(exc)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            try:
                out.close()
            except b.OutputFailed as exc:
                output_failed = output_failed or str(exc)
    final, _ = (read or b.read_output)(str(output))
    failed = sum(1 for i in items if final.get(i.id) is False)
    missing = sum(1 for i in items if i.id not in final)
    elapsed = time.monotonic() - progress.started
    typer.echo(f"stoker: {len(items)} items: {progress.skipped} already in {output}, {progress.done} done now, "
               f"{failed} failed in all; {progress.tokens} tokens in {elapsed:.1f} s "
               f"({progress.tokens_per_s:.0f} tok/s)" + (f"; {missing} not run yet" if missing else ""), err=True)
    if interrupted:
        typer.echo("stoker: interrupted; run the same command again to continue", err=True)
        raise typer.Exit(130)
    if cluster_failed:
        typer.echo(f"stoker: stopped: {cluster_failed}; run the same command again to continue", err=True)
        raise typer.Exit(EXIT_UNREACHABLE)
    if output_failed:
        typer.echo(f"stoker: stopped: {output_failed}; {output} ends with whole lines: make room (or fix the cause) "
                   "and run the same command again to continue", err=True)
        raise typer.Exit(EXIT_OUTPUT)
    if fatal is not None:
        typer.echo(f"stoker: stopped: {fatal.message}; run the same command again to continue", err=True)
        raise typer.Exit(EXIT_UNREACHABLE if isinstance(fatal, ShuttingDown) else _exit_code(fatal))
    if after is not None and not missing:
        after(items)
    raise typer.Exit(EXIT_MODEL if failed else EXIT_OK)


@app.command()
def embed(
    input_path: str = typer.Argument(..., metavar="INPUT.jsonl", help='One {"id": ..., "text": ...} per line; - reads '
                                     "stdin."),
    output: Path = typer.Option(..., "--output", "-o", help="Results, one JSON line per item (appended)."),
    model: Optional[str] = typer.Option(None, "--model", "-m", help="A model with embedding = true (default: the "
                                        "default model)."),
    batch_size: int = typer.Option(32, "--batch-size", "-b", min=1, max=256, help="Texts per embed request."),
    concurrency: int = typer.Option(2, "--concurrency", "-j", min=1, help="Requests in flight at once."),
    out_format: str = typer.Option("jsonl", "--format", help="jsonl; or npy: also, once every item is done, "
                                   "OUTPUT's vectors as a float32 matrix (OUTPUT with .npy) and its rows' ids "
                                   "(.ids.json)."),
    normalize: bool = typer.Option(True, "--normalize/--no-normalize", help="Unit-length vectors."),
    ray_address: Optional[str] = typer.Option(None, "--ray", metavar="[ADDRESS]",
                                              help="Run on a Ray cluster, as stoker batch --ray."),
    truncate: bool = typer.Option(False, "--truncate", help="Cut texts longer than the model takes instead of "
                                  "failing them."),
    retry_failed: bool = RetryFailedOpt,
    timeout: float = JobTimeoutOpt,
    start: bool = StartOpt,
    server_key: Optional[Path] = ServerKeyOpt,
    client_key: Optional[Path] = ClientKeyOpt,
    config: Optional[Path] = ConfigOpt,
    endpoint: Optional[str] = EndpointOpt,
) -> None:
    """Embed every text of INPUT.jsonl; resumable: ids already in OUTPUT are skipped.

    Output lines: {"id", "embedding": [...]} or {"id", "error": {"code", "message"}}.
    Exit 0 when every item succeeded, 3 when some failed (their errors are in OUTPUT).
    """
    from stoker.supervisor import embed_job as e

    if out_format not in ("jsonl", "npy"):
        typer.echo(f"stoker: --format must be jsonl or npy, not {out_format!r}", err=True)
        raise typer.Exit(EXIT_ERROR)
    cfg = _config(config, endpoint)
    keys: dict[str, Any] = {"model": model, "normalize": normalize, "truncate": truncate}

    def write_matrix(items: list[Any]) -> None:
        path, rows = e.write_npy(output, items)
        typer.echo(f"stoker: wrote {rows} vectors to {path} (ids in {e.npy_paths(output)[1]})", err=True)

    if ray_address is not None:
        try:
            from stoker.cluster import driver
        except ImportError:
            typer.echo("stoker: --ray needs the ray extra: pip install 'stoker[ray]'", err=True)
            raise typer.Exit(EXIT_ERROR) from None
        address = None if ray_address == "auto" else ray_address
        _journal_run(input_path, output, retry_failed, cfg, config, start, server_key, client_key, timeout,
                     e.parse_texts, lambda todo, client, out, progress, on_change: driver.run_on_ray(
                         todo, out, cfg, keys, progress, on_change, address,
                         lambda text: typer.echo(f"stoker: ray: {text}", err=True), embed=True, chunk_size=batch_size),
                     label="embed", after=write_matrix if out_format == "npy" else None, local=False)
    _journal_run(input_path, output, retry_failed, cfg, config, start, server_key, client_key, timeout, e.parse_texts,
                 lambda todo, client, out, progress, on_change: e.run_texts(todo, client, out, batch_size, concurrency,
                                                                            keys, progress, on_change),
                 label="embed", after=write_matrix if out_format == "npy" else None)


@app.command(context_settings={"allow_extra_args": False})
def gateway(
    listen: Optional[str] = typer.Option(None, "--listen", help="HOST:PORT (default: the configuration's "
                                         "gateway listen, else 127.0.0.1:8080)."),
    config: Optional[Path] = ConfigOpt,
    endpoint: Optional[str] = EndpointOpt,
) -> None:
    """Serve the OpenAI and Ollama HTTP APIs and the status page, as a client of the supervisor
    (needs the http extra: pip install 'stoker\\[http]')."""
    try:
        from stoker.gateway.server import main as gateway_main
    except ImportError:
        typer.echo("stoker: the gateway needs the http extra: pip install 'stoker[http]'", err=True)
        raise typer.Exit(EXIT_ERROR) from None
    argv = (["--listen", listen] if listen else []) + (["--config", str(config)] if config else [])
    argv += ["--endpoint", endpoint] if endpoint else []
    raise typer.Exit(gateway_main(argv))


@contextmanager
def _batch_display(progress: Any, label: str = "batch") -> Iterator[Callable[[], None]]:
    """A live progress bar on a terminal; nothing when stdout is not one."""
    if not sys.stdout.isatty():
        yield lambda: None
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    bar = Progress(TextColumn(label), BarColumn(), MofNCompleteColumn(),
                   TextColumn("failed {task.fields[failed]}"), TextColumn("{task.fields[tps]:.0f} tok/s"),
                   TimeRemainingColumn(), transient=False)
    task = bar.add_task(label, total=progress.total, completed=progress.skipped, failed=0, tps=0.0)

    def refresh() -> None:
        bar.update(task, completed=progress.skipped + progress.done + progress.failed, failed=progress.failed,
                   tps=progress.tokens_per_s)

    with bar:
        yield refresh


@app.command()
def bench(
    model: Optional[str] = typer.Option(None, "--model", "-m", help="A llama model (default: the default model)."),
    tokens: Optional[int] = typer.Option(None, "--tokens", "-n", min=2, help="Tokens per generation (128)."),
    clients: Optional[int] = typer.Option(None, "--clients", "-C", min=1, help="Clients for capacity (4)."),
    runs: Optional[int] = typer.Option(None, "--runs", min=1, help="Runs per measurement; medians (7)."),
    quick: bool = typer.Option(False, "--quick", help="A short run that checks it works (numbers not meaningful)."),
    concurrency: Optional[str] = typer.Option(
        None, "--concurrency", metavar="N,N,...",
        help="Instead: that many clients at once (e.g. 1,4,8) through a worker running --parallel requests "
             "at once, against parallel = 1 and one in-process stream; plus 8 requests sharing a prefix."),
    parallel: int = typer.Option(8, "--parallel", min=1, max=64, help="Slots of the batched worker (8)."),
    llama_server: Optional[Path] = typer.Option(
        None, "--llama-server", help="With --concurrency: a llama-server binary to run beside, same file and slots."),
    http: bool = typer.Option(False, "--http", help="Instead: the HTTP gateway against the ZeroMQ client on one "
                              "supervisor (first token, tokens/s, short requests/s); needs the http extra."),
    json_out: bool = JsonOpt,
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Measure what the supervisor costs: the model through stoker vs in-process, and its capacity."""
    from dataclasses import replace as dc_replace

    from stoker.supervisor import bench as b

    cfg = _config(config, None)
    name = model or cfg.supervisor.default_model
    if name not in cfg.models:
        typer.echo(f"stoker: model '{name}' not found; `stoker models` lists what is configured", err=True)
        raise typer.Exit(EXIT_MODEL)
    if http:
        from stoker.supervisor import bench_http as bh

        say = (lambda text: None) if json_out else (lambda text: typer.echo(f"bench: {text}", err=True))
        try:
            res = bh.run(cfg.models[name], tokens or (16 if quick else 128), runs or (1 if quick else 5),
                         2 if quick else 5, say)
        except (ValueError, RuntimeError, ImportError) as exc:
            typer.echo(f"stoker: {exc}", err=True)
            raise typer.Exit(EXIT_ERROR) from None
        typer.echo(json.dumps(res, indent=2) if json_out else bh.table(res))
        return
    if concurrency is not None:
        _bench_concurrency(cfg.models[name], concurrency, tokens or (16 if quick else 64),
                           runs or (1 if quick else 3), parallel, json_out, llama_server)
        return
    settings = b.QUICK if quick else b.BenchSettings()
    settings = dc_replace(settings, **{k: v for k, v in (("tokens", tokens), ("clients", clients), ("runs", runs))
                                       if v is not None})
    say = (lambda text: None) if json_out else (lambda text: typer.echo(f"bench: {text}", err=True))
    try:
        results = b.run(cfg.models[name], settings, say)
    except (ValueError, RuntimeError) as exc:
        typer.echo(f"stoker: {exc}", err=True)
        raise typer.Exit(EXIT_ERROR) from None
    if json_out:
        typer.echo(json.dumps({"model": results.model, "machine": results.machine, "settings": results.settings,
                               "values": results.values,
                               "targets": [{"target": t, "measured": m, "met": ok} for t, m, ok in results.targets()]},
                              indent=2))
    else:
        typer.echo(b.table(results))


def _bench_concurrency(model: ModelConfig, levels_text: str, tokens: int, runs: int, parallel: int,
                       json_out: bool, llama_server: Optional[Path] = None) -> None:
    from stoker.supervisor import bench_concurrency as bc

    try:
        levels = [int(x) for x in levels_text.split(",") if x.strip()]
        if not levels or min(levels) < 1:
            raise ValueError
    except ValueError:
        typer.echo(f"stoker: --concurrency takes client counts like 1,4,8, not {levels_text!r}", err=True)
        raise typer.Exit(EXIT_ERROR) from None
    say = (lambda text: None) if json_out else (lambda text: typer.echo(f"bench: {text}", err=True))
    try:
        res = bc.run(model, levels, tokens, runs, parallel, say, str(llama_server) if llama_server else None)
    except (ValueError, RuntimeError) as exc:
        typer.echo(f"stoker: {exc}", err=True)
        raise typer.Exit(EXIT_ERROR) from None
    typer.echo(json.dumps(res, indent=2) if json_out else bc.table(res))


def _ensure_supervisor(cfg: Config, config_file: Optional[Path], start: bool, server_key: Optional[Path] = None,
                       client_key: Optional[Path] = None) -> None:
    from stoker.supervisor.autostart import start_detached, wait_ready

    ep = cfg.supervisor.endpoint
    with Client(ep, server_key=server_key, client_key=client_key) as client:
        try:
            client.ping(timeout=1.5)
            return
        except Unreachable:
            if not start:
                raise
    proc, log_path = start_detached(str(config_file) if config_file else cfg.source or None, ep,
                                    Path(cfg.supervisor.state_dir))
    typer.echo(f"stoker: started a supervisor at {ep} (log: {Path(cfg.supervisor.state_dir) / 'stoker.log'})",
               err=True)
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
    st = Status.from_data(data)
    sup = st.supervisor
    typer.echo(f"stoker {sup.version}  pid {sup.pid}  {sup.state}  up {sup.uptime_s:.0f} s  {sup.endpoint}")
    for label, use in (("RAM", st.memory.ram if st.memory else None), ("VRAM", st.memory.vram if st.memory else None)):
        if use is None or use.budget is None:
            typer.echo(f"{label:<4}  not budgeted" + ("  (no GPU)" if label == "VRAM" and not sup.gpu else ""))
        else:
            typer.echo(f"{label:<4}  budget {_mib(use.budget)}  used {_mib(use.used)}  free {_mib(use.free or 0)}")
    if st.memory and st.memory.waiting:
        typer.echo(f"waiting for memory: {', '.join(st.memory.waiting)}")
    rows = [[w.id, str(w.pid), w.model + (" (pinned)" if w.pinned else ""), w.state, f"{w.running}/{w.slots}",
             _mib(w.rss_bytes), _mib(w.vram_bytes), _mib(w.charged_ram_bytes) + ("" if w.measured else " est."),
             f"{w.idle_s:.0f}", str(w.served)] for w in st.workers]
    typer.echo(_table(["WORKER", "PID", "MODEL", "STATE", "SLOTS", "RSS", "VRAM", "COUNTED", "IDLE_S", "SERVED"], rows)
               if rows else "no workers")
    typer.echo("queues: " + (", ".join(f"{name} {depth}" for name, depth in st.queues.items()) if st.queues else "empty"))


@app.command()
def models(json_out: bool = JsonOpt, config: Optional[Path] = ConfigOpt, endpoint: Optional[str] = EndpointOpt) -> None:
    """List the configured models."""
    data = _ask(config, endpoint, Client.models)
    if json_out:
        typer.echo(json.dumps(data, indent=2))
        return
    listed = Models.from_data(data)
    rows = [[("* " if r.name == listed.default else "  ") + r.name, r.backend, "yes" if r.loaded else "no",
             _mib(r.size_bytes), _mib(r.ram_bytes) + ("" if r.memory_measured else " est."), _mib(r.vram_bytes),
             str(r.replicas), r.path or "-"] for r in listed.models]
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
def keys(
    name: str = typer.Argument("client", help="What to call the pair: NAME.key and NAME.key_secret."),
    folder: Optional[Path] = typer.Option(None, "--dir", help="Where to write them (default ~/.config/stoker/keys)."),
) -> None:
    """Make a CurveZMQ key pair, for a supervisor on a tcp:// endpoint or for one of its clients.

    NAME.key is the public key: give it away (a client's goes in the supervisor's
    curve_authorized_keys folder; the supervisor's to its clients). NAME.key_secret holds the
    pair: keep it (the supervisor's curve_server_key; a client's --client-key)."""
    import os

    from stoker.protocol.curve_keys import create_key_pair

    if not name or "/" in name or name.startswith("."):
        typer.echo(f"stoker: {name!r} is not a usable name for key files", err=True)
        raise typer.Exit(EXIT_ERROR)
    config_home = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    try:
        public, secret = create_key_pair(folder or config_home / "stoker" / "keys", name)
    except (FileExistsError, OSError) as exc:
        typer.echo(f"stoker: {exc}", err=True)
        raise typer.Exit(EXIT_ERROR) from None
    typer.echo(f"public key (give it away): {public}\nkey pair (keep it; mode 0600): {secret}")


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


@app.command("config")
def show_config(json_out: bool = JsonOpt, config: Optional[Path] = ConfigOpt,
                endpoint: Optional[str] = EndpointOpt) -> None:
    """Print the resolved configuration and where each value comes from."""
    from dataclasses import asdict

    from stoker.supervisor.config import to_toml

    cfg = _config(config, endpoint)
    if json_out:
        typer.echo(json.dumps({"file": cfg.source or None, "supervisor": asdict(cfg.supervisor),
                               "sources": dict(cfg.sources),
                               "models": {n: asdict(mc) for n, mc in cfg.models.items()}}, indent=2))
        return
    typer.echo(to_toml(cfg), nl=False)


@app.command()
def logs(
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing lines as they are written."),
    lines: int = typer.Option(50, "--lines", "-n", min=0, help="How many of the last lines to print first."),
    worker: Optional[str] = typer.Option(None, "--worker", "-w", metavar="MODEL",
                                         help="The output of that model's worker processes instead."),
    config: Optional[Path] = ConfigOpt,
) -> None:
    """Show the supervisor's log file (in the state folder), or a model's workers' output."""
    from stoker.supervisor.logs import LOG_FILE
    from stoker.supervisor.worker_process import log_path_of

    state = Path(_config(config, None).supervisor.state_dir)
    path = log_path_of(state / "workers", worker) if worker else state / LOG_FILE
    if not path.exists() and not follow:
        typer.echo(f"stoker: no log yet at {path}", err=True)
        raise typer.Exit(EXIT_ERROR)
    _tail(path, lines, follow)


def _tail(path: Path, lines: int, follow: bool) -> None:
    """The last `lines` lines, then (following) what is appended, across rotations."""
    from collections import deque

    handle = None
    inode = None
    try:
        while True:
            if handle is None and path.exists():
                handle = path.open("r", encoding="utf-8", errors="replace")
                inode = path.stat().st_ino
                if lines is not None:
                    for line in deque(handle, maxlen=lines) if lines else ():
                        sys.stdout.write(printable(line, keep_lines=True))
                    handle.seek(0, 2)
                    lines = None  # only the first file: after a rotation, print it all
            if handle is not None:
                chunk = handle.read()
                if chunk:
                    # A worker's log holds what llama.cpp printed, escapes and all: shown as data.
                    sys.stdout.write(printable(chunk, keep_lines=True))
                    sys.stdout.flush()
            if not follow:
                return
            time.sleep(0.25)
            if handle is not None and (not path.exists() or path.stat().st_ino != inode):
                handle.close()  # rotated: the next round opens the new file from its start
                handle = None
    except KeyboardInterrupt:
        pass
    finally:
        if handle is not None:
            handle.close()


@app.command("install-service")
def install_service(
    user: bool = typer.Option(True, "--user/--system", help="A user service (default) or a system one (root)."),
    start: bool = typer.Option(True, "--start/--no-start", help="Enable and start it with systemctl."),
    print_only: bool = typer.Option(False, "--print", help="Print the unit instead of installing it."),
) -> None:
    """Install stoker as a systemd service running this installation (`systemctl --user` by default)."""
    import os
    import shutil
    import subprocess

    from stoker.supervisor import service

    unit = service.render(user)
    if print_only:
        typer.echo(unit, nl=False)
        return
    if not user and os.geteuid() != 0:
        typer.echo("stoker: a system service is installed as root: sudo stoker install-service --system", err=True)
        raise typer.Exit(EXIT_ERROR)
    if not user and shutil.which("useradd") and subprocess.run(["id", "stoker"], capture_output=True).returncode:
        subprocess.run(["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", "stoker"],
                       check=True)
        typer.echo("stoker: created the system user 'stoker'; add users to its group to let them connect")
    if not user and shutil.which("runuser"):
        # The service runs as `stoker`: this installation must be readable by that user (a
        # venv under /root or a home folder is not), or systemd fails with a bare 203/EXEC.
        probe = subprocess.run(["runuser", "-u", "stoker", "--", sys.executable, "-c", "import stoker.supervisor"],
                               capture_output=True, text=True)
        if probe.returncode != 0:
            typer.echo(f"stoker: the 'stoker' user cannot run {sys.executable} "
                       f"({(probe.stderr.strip().splitlines() or ['permission denied'])[-1]}); install stoker "
                       "where other users can read it, e.g. python3 -m venv /opt/stoker/venv && "
                       "/opt/stoker/venv/bin/pip install stoker, and run its install-service", err=True)
            raise typer.Exit(EXIT_ERROR)
    config_home = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
    path = service.unit_path(user, config_home)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(unit)
    typer.echo(f"stoker: wrote {path}")
    scope = ["--user"] if user else []
    steps = [["systemctl", *scope, "daemon-reload"], ["systemctl", *scope, "enable", "--now", "stoker"]]
    if not start or shutil.which("systemctl") is None:
        typer.echo("stoker: now run: " + " && ".join(" ".join(s) for s in steps))
        return
    for step in steps:
        done = subprocess.run(step, capture_output=True, text=True)
        if done.returncode != 0:
            typer.echo(f"stoker: `{' '.join(step)}` failed: {done.stderr.strip()}", err=True)
            raise typer.Exit(EXIT_ERROR)
    typer.echo(f"stoker: started; see `systemctl {' '.join(scope)} status stoker`".replace("  ", " "))
    if not user:
        typer.echo(f"stoker: clients use STOKER_ENDPOINT={service.SYSTEM_ENDPOINT} and the 'stoker' group")


def _wait_gone(endpoint: str, timeout: float = 60.0) -> None:
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
    rows = [[printable(str(c)) for c in r] for r in rows]  # names from files and clients are data
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows])


def main() -> None:
    app(args=_optional_values(sys.argv[1:]))


def _optional_values(args: list[str]) -> list[str]:
    """`--ray` takes an ADDRESS or nothing. Click reads an option's optional value reliably only in
    a single-command program: give a bare `--ray` its "auto" here."""
    out = []
    for i, arg in enumerate(args):
        out.append(arg)
        if arg == "--ray" and (i + 1 == len(args) or args[i + 1].startswith("-") or args[i + 1] == "--"):
            out.append("auto")
    return out
