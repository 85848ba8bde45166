"""`make run` under supervisord: the config it writes, and a killed process coming back."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import shlex
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from supervisor.datatypes import RestartUnconditionally
from supervisor.options import ClientOptions, ServerOptions

from tests.helpers import free_port, wait_until
from tests.platform import get, post

ROOT = Path(__file__).resolve().parent.parent
SUPERVISE = ROOT / "scripts" / "supervise.py"


def _supervise():
    spec = importlib.util.spec_from_file_location("supervise", SUPERVISE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_config_runs_every_procfile_line_restarting_it_and_stopping_its_group(tmp_path):
    supervise = _supervise()
    conf = supervise.write_config(ROOT / "Procfile", tmp_path, base_port=9000)
    server = ServerOptions()
    server.realize(["-c", str(conf)])
    programs = {group.name: group.process_configs for group in server.process_group_configs}
    procfile = supervise.read_procfile(ROOT / "Procfile")

    assert sorted(programs) == sorted(procfile)
    for name, line in procfile.items():
        (program,) = programs[name]
        # Through sh, as honcho ran them, so ${FLOWER_PORT:-5555} still expands.
        assert shlex.split(program.command) == ["/bin/sh", "-c", f"exec {line}"], name
        assert program.autorestart is RestartUnconditionally, name
        assert program.startretries >= 10, name
        assert program.stopasgroup, name
        assert program.killasgroup, name
        assert program.stdout_logfile == "/dev/stdout", name
        assert program.stdout_logfile_maxbytes == 0, name
        assert program.redirect_stderr, name
        assert program.directory == str(ROOT), name
    assert programs["web"][0].environment["PORT"] == "9000"
    assert server.nodaemon
    client = ClientOptions()
    client.realize(["-c", str(conf)])
    assert client.serverurl == f"unix://{tmp_path.resolve()}/supervisor.sock"


def _ctl(conf: Path, *args: str) -> str:
    command = [sys.executable, "-m", "supervisor.supervisorctl", "-c", str(conf), *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=20).stdout


def _pid(conf: Path, name: str) -> int:
    return int(_ctl(conf, "pid", name).strip() or 0)


def _running(conf: Path) -> dict[str, int]:
    """Each program's pid while RUNNING, 0 otherwise, as supervisorctl status reports them."""
    states = {}
    for line in _ctl(conf, "status").splitlines():
        # e.g. "web   RUNNING   pid 4242, uptime 0:00:11" or "web   STARTING"
        words = line.split()
        if len(words) >= 2:
            states[words[0]] = int(words[3].rstrip(",")) if words[1] == "RUNNING" else 0
    return states


def _children(pid: int) -> set[int]:
    found: set[int] = set()
    for children in Path(f"/proc/{pid}/task").glob("*/children"):
        with contextlib.suppress(OSError):
            found |= {int(child) for child in children.read_text().split()}
    return found


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended


def _answers(port: int) -> bool:
    try:
        return get(port, "/healthz", headers={})[0] == 200
    except OSError:
        return False


class Poster(threading.Thread):
    """POSTs notifications one after another until stopped, keeping every answer."""

    def __init__(self, port: int) -> None:
        super().__init__(daemon=True)
        self.port = port
        self.user = f"user-{uuid.uuid4().hex[:8]}"
        self.answers: list[tuple[int | None, object]] = []
        # Held around each request: a kill between two requests, as a request in flight on
        # a SIGKILLed gunicorn worker is lost whatever restarts the worker.
        self.between = threading.Lock()
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            with self.between:
                try:
                    answer = post(self.port, "/notifications",
                                  {"user_id": self.user, "title": "t", "body": "b"})  # fmt: skip
                except OSError as exc:
                    answer = (None, repr(exc))
                self.answers.append(answer)
            time.sleep(0.02)


@pytest.mark.slow
@pytest.mark.usefixtures("platform")  # for its reset of the platform's database and Redis DB
def test_each_killed_process_is_restarted_while_the_api_keeps_answering(
    platform_settings, tmp_path
):
    port = free_port()
    flower_port = free_port()
    while flower_port == port:
        flower_port = free_port()
    env = {
        **os.environ,
        **platform_settings,
        "PORT": str(port),
        "BIND_HOST": "127.0.0.1",
        "WEB_CONCURRENCY": "2",  # one gunicorn worker answers while the other is replaced
        "FLOWER_PORT": str(flower_port),
        "FLOWER_ADDRESS": "127.0.0.1",
        "FLOWER_BASIC_AUTH": "admin:admin",
    }
    var = tmp_path / "var"
    conf = var / "supervisord.conf"
    log = tmp_path / "supervisord.out"
    with log.open("wb") as out:
        supervisord = subprocess.Popen(
            [sys.executable, str(SUPERVISE), "--var", str(var)],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
    seen: set[int] = set()  # every pid supervisor reported, to check they all end
    poster = Poster(port)
    try:

        def up() -> bool:
            if supervisord.poll() is not None:
                raise AssertionError(f"supervise.py exited with {supervisord.returncode}")
            return _answers(port)

        wait_until(up, timeout=30, interval=0.2)
        running = wait_until(lambda: (r := _running(conf)) and all(r.values()) and r, timeout=10)
        seen |= set(running.values())
        poster.start()
        wait_until(lambda: len(poster.answers) >= 5, timeout=10)

        for name in ("consumer", "worker", "channels", "beat", "flower"):
            old = _pid(conf, name)
            assert old == running[name]
            with poster.between:
                os.kill(old, signal.SIGKILL)
            started = time.monotonic()
            wait_until(lambda n=name, o=old: _running(conf)[n] not in (0, o), timeout=10)
            assert time.monotonic() - started < 10
            others = {k: v for k, v in _running(conf).items() if k != name}
            assert others == {k: v for k, v in running.items() if k != name}, name
            running = _running(conf)
            seen |= set(running.values())

        # gunicorn, not supervisord, replaces a dead worker: the master keeps its pid.
        master = _pid(conf, "web")
        workers = wait_until(lambda: len(c := _children(master)) == 2 and c, timeout=10)
        doomed = min(workers)
        with poster.between:
            os.kill(doomed, signal.SIGKILL)
        replaced = wait_until(
            lambda: len(c := _children(master)) == 2 and doomed not in c and c, timeout=10
        )
        seen |= workers | replaced
        assert _running(conf) == running
        time.sleep(1)  # a few more requests on the replacement worker
        poster.done.set()
        poster.join(timeout=40)

        # A dead master is supervisord's to restart; its orphaned workers leave by themselves.
        os.kill(master, signal.SIGKILL)
        wait_until(lambda: _running(conf)["web"] not in (0, master), timeout=10)
        wait_until(lambda: _answers(port), timeout=10, interval=0.2)
        seen |= set(_running(conf).values()) | _children(_pid(conf, "web"))

        failed = [answer for answer in poster.answers if answer[0] != 202]
        assert failed == []
        ids = [body["id"] for _, body in poster.answers]
        engine = create_engine(platform_settings["DATABASE_URL"])
        query = text(
            "SELECT count(DISTINCT notification_id) FROM deliveries"
            " WHERE notification_id::text = ANY(:ids)"
        )

        def all_delivered() -> bool:
            with engine.connect() as conn:
                return conn.execute(query, {"ids": ids}).scalar() == len(ids)

        try:
            wait_until(all_delivered, timeout=60, interval=0.5)
        finally:
            engine.dispose()

        supervisord.send_signal(signal.SIGINT)
        supervisord.wait(timeout=20)
        wait_until(lambda: not any(_alive(pid) for pid in seen), timeout=5)
    finally:
        poster.done.set()
        if supervisord.poll() is None:
            supervisord.send_signal(signal.SIGINT)
            try:
                supervisord.wait(timeout=30)
            except subprocess.TimeoutExpired:
                supervisord.kill()
                supervisord.wait()
        for pid in seen:  # each program leads its own process group
            with contextlib.suppress(ProcessLookupError, PermissionError):
                if _alive(pid):
                    os.killpg(pid, signal.SIGKILL)
        print(log.read_text(errors="replace")[-8000:])  # shown when the test fails
