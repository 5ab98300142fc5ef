"""Configuration as data: one frozen dataclass tree, built by `resolve_config` alone.

Precedence, lowest first: built-in defaults, the TOML file, STOKER_* environment variables, flags.
Nothing else in stoker reads the environment for settings.
"""

from __future__ import annotations

import math
import os
import re
import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

from stoker.protocol.endpoint import default_endpoint, is_loopback
from stoker.supervisor.sizes import AUTO, parse_size
from stoker.workers.demo_model import DEMO_MODEL_NAME, demo_available, demo_path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

BACKENDS = ("llama", "fake")
# A request, plus a resumed completion, must fit in one worker-channel frame (MAX_WORKER_FRAME_BYTES).
MAX_MESSAGE_BYTES_LIMIT = 16 * 1024 * 1024
# Sequences one worker may run at once: llama.cpp keeps up to 256 sequence ids in one context.
MAX_PARALLEL = 64


class ConfigError(ValueError):
    """The configuration is invalid; the message says which key and what it should be."""


def _size_field(default: int) -> Any:
    return field(default=default, metadata={"size": True})


POOLINGS = ("mean", "cls", "last")

@dataclass(frozen=True)
class ModelConfig:
    """One model: which backend serves it and that backend's settings."""

    name: str
    backend: str = "llama"
    path: str = ""
    n_ctx: int = 4096
    n_gpu_layers: int = 0
    n_threads: int = 0  # 0 = the cores split between the model's replicas
    replicas: int = 1  # workers it may get while requests queue for it
    # Requests one worker runs at once, sharing the model's weights (and, for llama, one context
    # whose KV cache they split): continuous batching. 1 = one request at a time.
    parallel: int = 1
    # With parallel > 1: requests that begin the same way share the KV cells of what they have in
    # common instead of computing it again (while they run), and up to `prefix_cache` tokens of
    # finished requests are kept for later ones that begin the same way. Kept tokens are not free:
    # every step attends over them (see docs/performance.md), hence 0 by default.
    share_prefixes: bool = True
    prefix_cache: int = 0
    idle_timeout: float = -1.0  # seconds idle before unloading; -1 = the supervisor's idle_timeout
    # Memory it needs: 0 = estimated (from the GGUF for llama). The fake backend also allocates it.
    memory_bytes: int = _size_field(0)
    chat_format: str = ""  # llama-cpp-python's name (e.g. "gemma", "chatml"); "" = from the GGUF's template
    # Serves `embed`: a vector per input, the model's last hidden states pooled over the input's
    # tokens (`pooling`: their mean, the first token's ("cls") or the last one's).
    embedding: bool = False
    pooling: str = "mean"
    # Tokens: the longest input an embed takes (longer ones are refused, or cut with `truncate`),
    # and the most one batch of inputs evaluates at once. The embedding context it sizes is made
    # at the first embed; llama.cpp reserves a row of logits per token for it (n_vocab floats).
    embedding_ctx: int = 512
    embedding_dim: int = 64  # fake backend: the length of its vectors
    # fake backend
    tokens_per_second: float = 0.0
    load_seconds: float = 0.0
    end_every: int = 97  # about one token in this many ends the text; 0 = only max_tokens ends it
    # What one more sequence in a step adds to its time, as a share of a one-sequence step (a
    # real model's step grows with the batch, far less than the batch): 0.15 makes 8 at once
    # take 2.05 times as long per step as one, for 8 times the tokens.
    batch_cost: float = 0.15
    fail_load: str = ""  # fault injection: "crash" kills the worker at load, other text is raised
    stall_after: int = 0  # fault injection: hang (GIL released) after this many tokens of a request; 0 = never
    allocate_bytes: int = _size_field(0)  # fault injection: really allocate this, not memory_bytes; 0 = as claimed
    ignore_sigterm: bool = False  # fault injection: the worker ignores SIGTERM (stop_grace's SIGKILL must come)
    # set for the embedded demo model, whose file is assembled on first load
    demo: bool = False


@dataclass(frozen=True)
class GatewayConfig:
    """The HTTP gateway (OpenAI and Ollama APIs, status page): `stoker serve` starts it when
    `listen` is set, and `stoker gateway` reads the rest."""

    listen: str = ""  # HOST:PORT; "" = no gateway with `stoker serve`
    # API keys callers send as `Authorization: Bearer KEY`: each "KEY" or "NAME:KEY" (the name is
    # who the fair queue counts the caller as). Required unless the gateway listens on loopback.
    api_keys: tuple[str, ...] = ()
    api_keys_file: str = ""  # one key per line, the same forms; # starts a comment


@dataclass(frozen=True)
class SupervisorConfig:
    """The daemon's own settings."""

    endpoint: str = ""
    idle_timeout: float = 300.0
    max_queue: int = 256
    default_model: str = DEMO_MODEL_NAME
    models_dir: str = ""
    max_tokens_limit: int = 8192  # a generate's max_tokens is capped at this
    default_max_tokens: int = 256
    drain_timeout: float = 30.0  # on shutdown, running requests get this long to finish
    stop_grace: float = 5.0  # a worker asked to exit gets this long before SIGTERM, then SIGKILL
    worker_liveness: float = 3.0  # a worker silent this long (no heartbeat) is killed and replaced
    max_retries: int = 2  # a request whose worker dies is resumed on a new one at most this often
    crash_loop_max: int = 3  # more workers of a model than this dying before ready ...
    crash_loop_window: float = 60.0  # ... within this many seconds marks the model failed ...
    crash_loop_cooldown: float = 60.0  # ... for this long (or until `stoker load` retries it)
    max_message_bytes: int = 1024 * 1024  # larger request frames get bad_request
    state_dir: str = ""  # logs; default $XDG_STATE_HOME/stoker
    ram_budget: int = _size_field(AUTO)  # bytes workers may hold; auto = available at start - ram_margin
    ram_margin: float = 0.10  # share of available RAM left out of an automatic ram_budget
    vram_budget: int = _size_field(AUTO)  # bytes per GPU; auto = free at start - vram_margin; 0 = no GPU work
    vram_margin: float = 0.10
    load_wait: float = 60.0  # a request waits this long for memory to free before insufficient_memory
    socket_mode: int = 0o600  # 0o660 lets the socket's group in (a system service's clients)
    log_level: str = "INFO"
    metrics: str = ""  # HOST:PORT of a Prometheus endpoint; "" = none
    # A running request whose worker shows no progress (no token, no prompt batch) this long is
    # taken as stuck: its worker is killed and the request resumed elsewhere.
    stall_timeout: float = 120.0
    file_timeout: float = 10.0  # a look at a model file (stat, GGUF header) taking longer fails the model
    # Client connections at once; past it the ipc socket is hidden until some leave. 0 = from the
    # file-descriptor limit.
    max_clients: int = 0
    max_outbox_bytes: int = _size_field(16 * 1024 * 1024)  # replies waiting for one client; past it, dropped
    max_outbox_messages: int = 100_000
    # CurveZMQ for tcp:// endpoints (`stoker keys` makes the files): this supervisor's secret key
    # file, and a folder of the public key files of the clients that may connect.
    curve_server_key: str = ""
    curve_authorized_keys: str = ""
    # A tcp:// endpoint off this machine without CurveZMQ: anyone who reaches the port may use
    # the supervisor (and stop it). Refused unless this is set.
    allow_insecure_tcp: bool = False


@dataclass(frozen=True)
class Config:
    supervisor: SupervisorConfig
    models: Mapping[str, ModelConfig] = field(default_factory=dict)
    gateway: "GatewayConfig" = field(default_factory=lambda: GatewayConfig())
    source: str = ""  # the file it was read from, if any
    # where each value came from: "supervisor.KEY" or "models.NAME" -> "default", the file,
    # "env STOKER_...", "flag", "models_dir" or "demo package"
    sources: Mapping[str, str] = field(default_factory=dict)
    notes: tuple[str, ...] = ()  # what was skipped, for the log (files whose names are not text)


def default_config_path(environ: Mapping[str, str]) -> Path:
    base = environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base) / "stoker" / "config.toml"


def default_state_dir(environ: Mapping[str, str]) -> Path:
    if environ.get("STATE_DIRECTORY"):  # systemd's StateDirectory= (a system service)
        return Path(environ["STATE_DIRECTORY"].split(":")[0])
    base = environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "stoker"


# STOKER_* variable -> [supervisor] key
_ENV_KEYS = {
    "STOKER_ENDPOINT": "endpoint",
    "STOKER_IDLE_TIMEOUT": "idle_timeout",
    "STOKER_MAX_QUEUE": "max_queue",
    "STOKER_DEFAULT_MODEL": "default_model",
    "STOKER_MODELS_DIR": "models_dir",
    "STOKER_STATE_DIR": "state_dir",
    "STOKER_RAM_BUDGET": "ram_budget",
    "STOKER_SOCKET_MODE": "socket_mode",
    "STOKER_LOG_LEVEL": "log_level",
    "STOKER_METRICS": "metrics",
    "STOKER_VRAM_BUDGET": "vram_budget",
    "STOKER_STALL_TIMEOUT": "stall_timeout",
    "STOKER_MAX_CLIENTS": "max_clients",
    "STOKER_CURVE_SERVER_KEY": "curve_server_key",
    "STOKER_CURVE_AUTHORIZED_KEYS": "curve_authorized_keys",
}


def resolve_config(
    config_file: str | os.PathLike[str] | None = None,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Build the configuration. `overrides` are [supervisor] keys from flags (None = not given)."""
    env = dict(os.environ if environ is None else environ)
    explicit = config_file or env.get("STOKER_CONFIG")
    path = Path(explicit).expanduser() if explicit else default_config_path(env)
    data: dict[str, Any] = {}
    if path.is_file():
        try:
            data = tomllib.loads(path.read_text())
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    elif explicit:
        raise ConfigError(f"config file {path} does not exist")
    where = str(path) if data else "defaults"
    unknown = set(data) - {"supervisor", "models", "gateway"}
    if unknown:
        raise ConfigError(f"{where}: unknown section(s) {sorted(unknown)}; expected [supervisor], [models.NAME], "
                          "[gateway]")
    gateway = _gateway(_table(data.get("gateway", {}), f"{where} [gateway]"), f"{where} [gateway]")

    raw_sup = dict(_table(data.get("supervisor", {}), f"{where} [supervisor]"))
    sources = {f"supervisor.{key}": str(path) for key in raw_sup}
    raw_sup.setdefault("endpoint", default_endpoint(env))
    raw_sup.setdefault("state_dir", str(default_state_dir(env)))
    for var, key in _ENV_KEYS.items():
        if env.get(var):
            raw_sup[key] = env[var]
            sources[f"supervisor.{key}"] = f"env {var}"
    for key, value in (overrides or {}).items():
        if value is not None:
            raw_sup[key] = value
            sources[f"supervisor.{key}"] = "flag"
    not_from_file = {k.split(".", 1)[1]: v for k, v in sources.items()
                     if k.startswith("supervisor.") and (v == "flag" or v.startswith("env "))}
    sup = _build(SupervisorConfig, raw_sup, f"{where} [supervisor]", fixed={}, origin=not_from_file)
    sup = replace(sup, models_dir=_expand(sup.models_dir), state_dir=_expand(sup.state_dir),
                  curve_server_key=_expand(sup.curve_server_key),
                  curve_authorized_keys=_expand(sup.curve_authorized_keys))
    _check_supervisor(sup, where)

    models: dict[str, ModelConfig] = {}
    notes: list[str] = []
    for name, table in _table(data.get("models", {}), f"{where} [models]").items():
        models[name] = _model(name, _table(table, f"{where} [models.{name}]"), where)
        sources[f"models.{name}"] = str(path)
    if sup.models_dir:
        folder = Path(sup.models_dir)
        if not folder.is_dir():
            raise ConfigError(f"{sources.get('supervisor.models_dir', where)}: models_dir {folder} is not a folder")
        for gguf in sorted(folder.glob("*.gguf")):
            try:
                gguf.stem.encode("utf-8")
            except UnicodeEncodeError:  # a name that is not text cannot cross the wire
                notes.append(f"models_dir: skipped {gguf.name.encode('utf-8', 'backslashreplace').decode()}: "
                             "its name is not valid UTF-8")
                continue
            if gguf.stem not in models:
                models[gguf.stem] = ModelConfig(name=gguf.stem, backend="llama", path=str(gguf))
                sources[f"models.{gguf.stem}"] = "models_dir"
    if DEMO_MODEL_NAME not in models and demo_available():
        # Its GGUF carries no chat template; llama-cpp-python would fall back to llama-2's.
        models[DEMO_MODEL_NAME] = ModelConfig(
            name=DEMO_MODEL_NAME, path=str(demo_path()), chat_format="gemma", demo=True, embedding=True
        )
        sources[f"models.{DEMO_MODEL_NAME}"] = "demo package"
    return Config(supervisor=sup, models=models, source=str(path) if data else "", sources=sources,
                  notes=tuple(notes), gateway=gateway)


def _gateway(table: Mapping[str, Any], where: str) -> GatewayConfig:
    known = {f.name for f in fields(GatewayConfig)}
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    listen = table.get("listen", "")
    if not isinstance(listen, str) or (listen and not _host_port(listen)):
        raise ConfigError(f"{where}: listen must be HOST:PORT, like 127.0.0.1:8080, not {listen!r}")
    keys = table.get("api_keys", [])
    if not isinstance(keys, list) or not all(isinstance(k, str) and k.strip() for k in keys):
        raise ConfigError(f"{where}: api_keys must be a list of non-empty strings (\"KEY\" or \"NAME:KEY\")")
    keys_file = table.get("api_keys_file", "")
    if not isinstance(keys_file, str):
        raise ConfigError(f"{where}: api_keys_file must be a path")
    if listen and not keys and not keys_file:
        from stoker.protocol.endpoint import is_loopback

        host = listen.rpartition(":")[0]
        if not is_loopback(f"tcp://{host}:1"):
            raise ConfigError(f"{where}: listen = {listen!r} can be reached from other machines, and no API key "
                              "is set: set api_keys or api_keys_file (callers then send 'Authorization: Bearer "
                              "KEY'), or listen on 127.0.0.1")
    return GatewayConfig(listen=listen, api_keys=tuple(keys), api_keys_file=_expand(keys_file))


def _host_port(value: str) -> bool:
    host, _, port = value.rpartition(":")
    return bool(host) and port.isdigit() and 0 < int(port) < 65536


def _expand(value: str) -> str:
    return str(Path(value).expanduser()) if value else value


def _table(value: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(value, dict):
        raise ConfigError(f"{where} must be a table")
    return value


def _model(name: str, table: Mapping[str, Any], where: str) -> ModelConfig:
    here = f"{where} [models.{name}]"
    model = _build(ModelConfig, table, here, fixed={"name": name, "demo": False})
    if model.backend not in BACKENDS:
        raise ConfigError(f"{here}: backend must be one of {', '.join(BACKENDS)}, not {model.backend!r}")
    if model.backend == "llama":
        if not model.path:
            raise ConfigError(f"{here}: a llama model needs path = \"/path/to/model.gguf\"")
    model = replace(model, path=_expand(model.path))
    for key in ("n_ctx",):
        if getattr(model, key) < 1:
            raise ConfigError(f"{here}: {key} must be >= 1")
    for key in ("n_threads", "tokens_per_second", "load_seconds", "end_every", "batch_cost"):
        if getattr(model, key) < 0:
            raise ConfigError(f"{here}: {key} must be >= 0")
    if model.replicas < 1:
        raise ConfigError(f"{here}: replicas must be >= 1")
    if model.prefix_cache < 0:
        raise ConfigError(f"{here}: prefix_cache must be a number of tokens >= 0")
    if model.pooling not in POOLINGS:
        raise ConfigError(f"{here}: pooling must be one of {', '.join(POOLINGS)}, not {model.pooling!r}")
    if not 8 <= model.embedding_ctx <= model.n_ctx and model.embedding:
        raise ConfigError(f"{here}: embedding_ctx must be from 8 to n_ctx ({model.n_ctx}) tokens")
    if not model.embedding_dim >= 1:
        raise ConfigError(f"{here}: embedding_dim must be >= 1")
    if not 1 <= model.parallel <= MAX_PARALLEL:
        raise ConfigError(f"{here}: parallel must be from 1 to {MAX_PARALLEL} (requests one worker runs at once)")
    if model.idle_timeout < 0 and model.idle_timeout != -1:
        raise ConfigError(f"{here}: idle_timeout must be >= 0 seconds (or -1: the supervisor's)")
    if model.memory_bytes == AUTO:
        raise ConfigError(f"{here}: memory_bytes must be a size (0 = estimate it)")
    return model


def _check_supervisor(sup: SupervisorConfig, where: str) -> None:
    here = f"{where} [supervisor]"
    for key in ("idle_timeout", "drain_timeout", "stop_grace", "crash_loop_window", "crash_loop_cooldown",
                "load_wait"):
        if getattr(sup, key) < 0:
            raise ConfigError(f"{here}: {key} must be >= 0 seconds")
    for key in ("stall_timeout", "file_timeout"):
        if not getattr(sup, key) > 0:
            raise ConfigError(f"{here}: {key} must be > 0 seconds")
    if sup.max_clients < 0:
        raise ConfigError(f"{here}: max_clients must be >= 0 (0 = from the file-descriptor limit)")
    if sup.max_outbox_bytes < 64 * 1024 or sup.max_outbox_messages < 100:
        raise ConfigError(f"{here}: max_outbox_bytes must be >= 64KiB and max_outbox_messages >= 100")
    if sup.worker_liveness < 0.3:
        raise ConfigError(f"{here}: worker_liveness must be >= 0.3 seconds")
    for key in ("max_retries", "crash_loop_max"):
        if getattr(sup, key) < 0:
            raise ConfigError(f"{here}: {key} must be >= 0")
    for key in ("max_queue", "max_tokens_limit", "default_max_tokens"):
        if getattr(sup, key) < 1:
            raise ConfigError(f"{here}: {key} must be >= 1")
    if sup.socket_mode not in (0o600, 0o660):
        raise ConfigError(f"{here}: socket_mode must be 0o600 (this user only) or 0o660 (and its group), "
                          f"not {sup.socket_mode:#o}")
    if sup.log_level.upper() not in ("TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL"):
        raise ConfigError(f"{here}: log_level must be DEBUG, INFO, WARNING or ERROR, not {sup.log_level!r}")
    if sup.metrics:
        host, _, port = sup.metrics.rpartition(":")
        if not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"{here}: metrics must be HOST:PORT, like 127.0.0.1:9464, not {sup.metrics!r}")
    for key in ("ram_margin", "vram_margin"):
        if not 0 <= getattr(sup, key) < 1:
            raise ConfigError(f"{here}: {key} must be a share from 0 to 0.99 (0.1 = 10%)")
    if not 1024 <= sup.max_message_bytes <= MAX_MESSAGE_BYTES_LIMIT:
        raise ConfigError(f"{here}: max_message_bytes must be from 1024 to {MAX_MESSAGE_BYTES_LIMIT}")
    if not sup.endpoint.startswith(("ipc://", "tcp://")):
        raise ConfigError(f"{here}: endpoint must start with ipc:// or tcp://, not {sup.endpoint!r}")
    _check_security(sup, here)


def _check_security(sup: SupervisorConfig, here: str) -> None:
    """An ipc socket is guarded by file permissions; a tcp port by nothing. One that others can
    reach needs CurveZMQ, or a setting that says in its name that it is insecure."""
    if bool(sup.curve_server_key) != bool(sup.curve_authorized_keys):
        raise ConfigError(f"{here}: CurveZMQ needs both curve_server_key (this supervisor's secret key file) and "
                          "curve_authorized_keys (a folder of clients' public key files); `stoker keys` makes them")
    for key in ("curve_server_key", "curve_authorized_keys"):
        value = getattr(sup, key)
        if value and not Path(value).exists():
            raise ConfigError(f"{here}: {key}: {value} does not exist; `stoker keys` makes key files")
    if (sup.endpoint.startswith("tcp://") and not is_loopback(sup.endpoint) and not sup.curve_server_key
            and not sup.allow_insecure_tcp):
        raise ConfigError(
            f"{here}: endpoint {sup.endpoint} can be reached from other machines, and without authentication "
            "anyone who reaches it can run models and stop the supervisor. Secure it with CurveZMQ "
            "(`stoker keys`, then curve_server_key and curve_authorized_keys), bind it to 127.0.0.1, or, "
            "on a network you trust completely, set allow_insecure_tcp = true"
        )


def _build(cls: type, raw: Mapping[str, Any], where: str, fixed: Mapping[str, Any],
           origin: Mapping[str, str] | None = None) -> Any:
    """Instantiate a config dataclass from a table, converting env strings and checking types.

    `fixed` fields are set by stoker, never by the user. `origin` names where a key's value came
    from when that is not the table `where` (an environment variable, a flag), for errors.
    """
    known = {f.name: f for f in fields(cls) if f.name not in fixed}
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    values = {}
    for key, value in raw.items():
        here = origin[key] if origin and key in origin else where
        if key == "socket_mode" and isinstance(value, str):  # from the environment: octal digits
            try:
                values[key] = int(value, 8)
            except ValueError:
                raise ConfigError(f"{here}: socket_mode must be octal, like 0660, not {value!r}") from None
        elif known[key].metadata.get("size"):
            try:
                values[key] = parse_size(value)
            except ValueError as exc:
                raise ConfigError(f"{here}: {key}: {exc}") from None
        else:
            values[key] = _coerce(value, type(known[key].default), f"{here}: {key}")
    return cls(**values, **fixed)


def _coerce(value: Any, kind: type, what: str) -> Any:
    if kind is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{what} must be true or false, not {value!r}")
    if kind in (int, float):
        if isinstance(value, str):  # from the environment or a flag
            try:
                value = kind(value)
            except ValueError:
                raise ConfigError(f"{what} must be a number, not {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{what} must be a number, not {value!r}")
        if kind is int and isinstance(value, float) and not value.is_integer():
            raise ConfigError(f"{what} must be a whole number, not {value!r}")
        return kind(value)
    if not isinstance(value, str):
        raise ConfigError(f"{what} must be a string, not {value!r}")
    return value


# ---- writing it back out ---------------------------------------------------------------------

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_TOML_ESCAPES = {'"': '\\"', "\\": "\\\\", "\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r"}


def toml_string(text: str) -> str:
    """A TOML basic string holding exactly `text`. What TOML cannot hold (bytes of a file name
    that were not UTF-8) is written as the escape Python reads them as."""
    out = []
    for ch in text:
        code = ord(ch)
        if ch in _TOML_ESCAPES:
            out.append(_TOML_ESCAPES[ch])
        elif code < 0x20 or code == 0x7F:
            out.append(f"\\u{code:04x}")
        elif 0xD800 <= code <= 0xDFFF:  # a lone surrogate: no TOML (or UTF-8) for it
            out.append(f"\\\\u{code:04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def toml_key(key: str) -> str:
    return key if _BARE_KEY.fullmatch(key) else toml_string(key)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    return toml_string(str(value))


def _comment(text: str) -> str:
    """Text safe in a TOML comment: one line, no control characters."""
    return "".join(ch if ord(ch) >= 0x20 and ord(ch) != 0x7F and not 0xD800 <= ord(ch) <= 0xDFFF
                   else f"\\x{ord(ch):02x}" for ch in text)


def to_toml(cfg: Config) -> str:
    """The resolved configuration as TOML that `--config` takes back, with where each value came
    from in a comment. Names from files (a models_dir's) are data: quoted and escaped."""
    lines = [f"# configuration file: {_comment(cfg.source or 'none')}", "[supervisor]"]
    for f in fields(cfg.supervisor):
        value = getattr(cfg.supervisor, f.name)
        if f.name == "socket_mode":
            text = f"0o{value:o}"
        elif f.metadata.get("size") and value == AUTO:
            text = '"auto"'
        else:
            text = toml_value(value)
        origin = cfg.sources.get(f"supervisor.{f.name}", "default")
        lines.append(f"{f.name + ' = ' + text:<50}  # {_comment(origin)}")
    for name, mc in cfg.models.items():
        origin = cfg.sources.get(f"models.{name}", "default")
        lines += ["", f"[models.{toml_key(name)}]  # {_comment(origin)}"]
        for f in fields(mc):
            value = getattr(mc, f.name)
            if f.name not in ("name", "demo") and value != f.default:
                lines.append(f"{f.name} = {toml_value(value)}")
    return "\n".join(lines) + "\n"
