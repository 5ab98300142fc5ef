"""systemd units for stoker: rendered for this installation by `stoker install-service`.

The files in the repository's systemd/ folder are these templates rendered for a typical
installation (a test keeps them in step).
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

SYSTEM_ENDPOINT = "ipc:///run/stoker/stoker.sock"

# Shared by both units: restart on failure, but give up (StartLimit*) on a crash loop rather
# than spin; stop gracefully (drain_timeout 30 s + stop_grace 5 s twice, with room to spare).
# Each client connection holds a file descriptor: the usual 1024 would cap the clients at about
# 850 (the supervisor raises its soft limit to this hard one, and derives max_clients from it).
_COMMON = """\
Type=notify
NotifyAccess=main
ExecStart={exec_start}
WatchdogSec=30
Restart=on-failure
RestartSec=2
KillMode=mixed
TimeoutStopSec=50
LimitNOFILE=65536
Environment=PYTHONUNBUFFERED=1
"""

USER_UNIT = """\
# stoker as a user service (systemctl --user). Installed by `stoker install-service --user`.
# The socket is ipc://$XDG_RUNTIME_DIR/stoker/stoker.sock, where the CLI and the client library
# look by default; logs go to the journal and to ~/.local/state/stoker/.
[Unit]
Description=stoker: supervisor for local LLM inference
StartLimitIntervalSec=120
StartLimitBurst=5

[Service]
{common}
[Install]
WantedBy=default.target
"""

SYSTEM_UNIT = """\
# stoker as a system service, run by the `stoker` system user. Installed by
# `stoker install-service --system` (as root), which also creates that user.
# The socket is {endpoint} (mode 0660): add users who may use it to the `stoker` group and
# give them STOKER_ENDPOINT={endpoint}. Configuration: /etc/stoker/config.toml.
# Logs: the journal and /var/lib/stoker/. The installation (its Python) must be outside
# /home or readable there: ProtectHome=read-only.
[Unit]
Description=stoker: supervisor for local LLM inference
After=network.target
StartLimitIntervalSec=120
StartLimitBurst=5

[Service]
{common}User=stoker
Group=stoker
Environment=STOKER_ENDPOINT={endpoint}
Environment=STOKER_SOCKET_MODE=0660
Environment=XDG_CONFIG_HOME=/etc
Environment=HOME=/var/lib/stoker
RuntimeDirectory=stoker
RuntimeDirectoryMode=0750
StateDirectory=stoker
StateDirectoryMode=0750
CacheDirectory=stoker
ConfigurationDirectory=stoker
ProtectSystem=strict
ProtectHome=read-only
PrivateTmp=yes
NoNewPrivileges=yes
ProtectKernelTunables=yes
ProtectKernelModules=yes
ProtectControlGroups=yes
RestrictSUIDSGID=yes
LockPersonality=yes

[Install]
WantedBy=multi-user.target
"""


def exec_start(python: str | None = None) -> str:
    """The command that runs this installation's supervisor."""
    return f"{shlex.quote(python or sys.executable)} -m stoker.supervisor serve"


def render(user: bool, python: str | None = None) -> str:
    common = _COMMON.format(exec_start=exec_start(python))
    if user:
        return USER_UNIT.format(common=common)
    return SYSTEM_UNIT.format(common=common, endpoint=SYSTEM_ENDPOINT)


def unit_path(user: bool, config_home: Path) -> Path:
    return (config_home / "systemd" / "user" if user else Path("/etc/systemd/system")) / "stoker.service"
