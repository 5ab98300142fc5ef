"""Configuration as data: one frozen dataclass tree, built by `resolve_config` alone.

Precedence, lowest first: built-in defaults, the TOML file, STOKER_* environment variables, flags.
Nothing else in stoker reads the environment for settings.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Mapping

from stoker.protocol.endpoint import default_endpoint
from stoker.supervisor.sizes import AUTO, parse_size
from stoker.workers.demo_model import DEMO_MODEL_NAME, demo_available, demo_path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

BACKENDS = ("llama", "fake")
# A request, plus a resumed completion, must fit in one worker-channel frame (MAX_WORKER_FRAME_BYTES).
MAX_MESSAGE_BYTES_LIMIT = 16 * 1024 * 1024


class ConfigError(ValueError):
    """The configuration is invalid; the message says which key and what it should be."""


def _size_field(default: int) -> Any:
    return field(default=default, metadata={"size": True})


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
    idle_timeout: float = -1.0  # seconds idle before unloading; -1 = the supervisor's idle_timeout
    # Memory it needs: 0 = estimated (from the GGUF for llama). The fake backend also allocates it.
    memory_bytes: int = _size_field(0)
    chat_format: str = ""  # llama-cpp-python's name (e.g. "gemma", "chatml"); "" = from the GGUF's template
    # fake backend
    tokens_per_second: float = 0.0
    load_seconds: float = 0.0
    end_every: int = 97  # about one token in this many ends the text; 0 = only max_tokens ends it
    fail_load: str = ""  # fault injection: "crash" kills the worker at load, other text is raised
    # set for the embedded demo model, whose file is assembled on first load
    demo: bool = False


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


@dataclass(frozen=True)
class Config:
    supervisor: SupervisorConfig
    models: Mapping[str, ModelConfig] = field(default_factory=dict)
    source: str = ""  # the file it was read from, if any
    # where each value came from: "supervisor.KEY" or "models.NAME" -> "default", the file,
    # "env STOKER_...", "flag", "models_dir" or "demo package"
    sources: Mapping[str, str] = field(default_factory=dict)


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
    unknown = set(data) - {"supervisor", "models"}
    if unknown:
        raise ConfigError(f"{where}: unknown section(s) {sorted(unknown)}; expected [supervisor], [models.NAME]")

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
    sup = replace(sup, models_dir=_expand(sup.models_dir), state_dir=_expand(sup.state_dir))
    _check_supervisor(sup, where)

    models: dict[str, ModelConfig] = {}
    for name, table in _table(data.get("models", {}), f"{where} [models]").items():
        models[name] = _model(name, _table(table, f"{where} [models.{name}]"), where)
        sources[f"models.{name}"] = str(path)
    if sup.models_dir:
        folder = Path(sup.models_dir)
        if not folder.is_dir():
            raise ConfigError(f"{sources.get('supervisor.models_dir', where)}: models_dir {folder} is not a folder")
        for gguf in sorted(folder.glob("*.gguf")):
            if gguf.stem not in models:
                models[gguf.stem] = ModelConfig(name=gguf.stem, backend="llama", path=str(gguf))
                sources[f"models.{gguf.stem}"] = "models_dir"
    if DEMO_MODEL_NAME not in models and demo_available():
        # Its GGUF carries no chat template; llama-cpp-python would fall back to llama-2's.
        models[DEMO_MODEL_NAME] = ModelConfig(
            name=DEMO_MODEL_NAME, path=str(demo_path()), chat_format="gemma", demo=True
        )
        sources[f"models.{DEMO_MODEL_NAME}"] = "demo package"
    return Config(supervisor=sup, models=models, source=str(path) if data else "", sources=sources)


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
    for key in ("n_threads", "tokens_per_second", "load_seconds", "end_every"):
        if getattr(model, key) < 0:
            raise ConfigError(f"{here}: {key} must be >= 0")
    if model.replicas < 1:
        raise ConfigError(f"{here}: replicas must be >= 1")
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
