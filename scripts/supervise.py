"""Run the Procfile's processes under supervisord, which restarts any of them that dies.

make run                                 (what `make run` does after `make db`)
python scripts/supervise.py [--var DIR]  (writes DIR/supervisord.conf, then execs supervisord)

supervisord runs in the foreground: every process's output goes to this terminal and Ctrl-C
stops them all. `supervisorctl -c var/supervisord.conf status` lists them; `... restart web`
restarts one.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# The venv's bin, where gunicorn, celery and supervisord are; not resolved, as a venv's
# python is a symlink out of the venv.
BIN = Path(sys.executable).parent
# honcho's numbering, which `make run` used before: the first process gets $PORT, the
# next $PORT+100, and so on (only `web` reads it).
PORT_STEP = 100

HEADER = """\
; Written by scripts/supervise.py from {procfile}; edit the Procfile, not this file.
[supervisord]
nodaemon=true
logfile={var}/supervisord.log
pidfile={var}/supervisord.pid
childlogdir={var}

[unix_http_server]
file={var}/supervisor.sock
chmod=0700

[rpcinterface:supervisor]
supervisor.rpcinterface_factory=supervisor.rpcinterface:make_main_rpcinterface

[supervisorctl]
serverurl=unix://{var}/supervisor.sock
"""

# autorestart=true, startsecs=1: a process that has run for a second and then dies, whatever
# its exit status, is started again at once.
# startretries=60: a start that dies within startsecs (Redis or PostgreSQL down) is retried
# after 1 s, 2 s, ... 60 s, half an hour in all, before supervisord gives up (FATAL); the
# default, 3, gives up within 6 s.
# stopwaitsecs=15: room for gunicorn's graceful_timeout (10 s) and a worker's warm shutdown
# (a webhook try takes up to WEBHOOK_TIMEOUT_SECONDS, 10 s) before the group is killed.
# supervisord stops the programs one after another, each within a second or two when idle.
PROGRAM = """
[program:{name}]
command={command}
directory={root}
environment=PORT="{port}"
autorestart=true
startsecs=1
startretries=60
stopsignal=TERM
stopwaitsecs=15
stopasgroup=true
killasgroup=true
stdout_logfile=/dev/stdout
stdout_logfile_maxbytes=0
redirect_stderr=true
"""


def read_procfile(path: Path) -> dict[str, str]:
    """The Procfile's processes, name to command line, in the file's order."""
    processes = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, command = line.split(":", 1)
            processes[name.strip()] = command.strip()
    return processes


def program_command(command: str) -> str:
    """A supervisord `command=` running a Procfile line as honcho did, through /bin/sh."""
    if re.search(r"\s[;#]", command):
        sys.exit(f"supervisord would read the rest of {command!r} as a comment")
    # sh expands ${FLOWER_BASIC_AUTH} and ${X:-default} as it did under honcho; `exec`
    # makes the program sh's own process, so supervisord's signals reach it, not sh.
    line = shlex.join(["/bin/sh", "-c", f"exec {command}"])
    return line.replace("%", "%%")  # supervisord expands %(name)s; celery's -n has %h


def render(processes: dict[str, str], procfile: Path, var: Path, base_port: int) -> str:
    """A supervisord config running `processes`, with its socket, pid file and log in `var`."""
    parts = [HEADER.format(procfile=procfile, var=var)]
    for i, (name, command) in enumerate(processes.items()):
        parts.append(
            PROGRAM.format(
                name=name,
                command=program_command(command),
                root=ROOT,
                port=base_port + i * PORT_STEP,
            )
        )
    return "".join(parts)


def write_config(procfile: Path, var: Path, base_port: int) -> Path:
    """Write var/supervisord.conf for the Procfile's processes; return its path."""
    var.mkdir(parents=True, exist_ok=True)
    conf = var / "supervisord.conf"
    conf.write_text(render(read_procfile(procfile), procfile.resolve(), var.resolve(), base_port))
    return conf


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--procfile", type=Path, default=ROOT / "Procfile")
    parser.add_argument(
        "--var", type=Path, default=ROOT / "var", help="where the config, socket and log go"
    )
    args = parser.parse_args(argv)
    (ROOT / "var").mkdir(exist_ok=True)  # beat's schedule file (`-s var/...` in the Procfile)
    conf = write_config(args.procfile, args.var, int(os.environ.get("PORT") or 8000))
    # supervisord hands its own environment to every process: the caller's, with the venv.
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', os.defpath)}"}
    supervisord = [sys.executable, "-m", "supervisor.supervisord", "-n", "-c", str(conf)]
    os.execve(sys.executable, supervisord, env)


if __name__ == "__main__":
    main()
