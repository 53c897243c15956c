"""The processes a benchmark run owns, and what the kernel says about them.

Everything here is created for one run and removed at its end: a Postgres database
``refunds_bench_<random>``, a ``redis-server`` on a free port, the Stripe emulator,
and the Procfile's ``web`` and ``worker`` lines (started through
``python -m cli.procfile``, so they run exactly as in production).

CPU time and memory come from ``/proc`` (Linux): ``VmHWM`` is a process's peak
resident set size, ``utime + stime`` its CPU time.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg

from cli.procfile import procfile_lines

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
PROCFILE_WEB = procfile_lines()["web"]


class BenchError(RuntimeError):
    """The run cannot go on; the message says why."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for_http(url: str, *, timeout: float = 60.0, proc: subprocess.Popen[Any] | None = None,
                  log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-2000:] if log and log.exists() else ""
            raise BenchError(f"process exited with {proc.returncode} before {url} answered\n{tail}")
        try:
            if httpx.get(url, timeout=1.0).status_code < 500:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.05)
    raise BenchError(f"{url} did not answer within {timeout:.0f} s")


# --------------------------------------------------------------------------- /proc


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def children(pid: int) -> list[int]:
    """``pid`` and all its descendants that are alive now."""
    by_parent: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        stat = _read(f"/proc/{entry}/stat")
        if stat is None:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        by_parent.setdefault(ppid, []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        if os.path.exists(f"/proc/{current}"):
            found.append(current)
        todo.extend(by_parent.get(current, []))
    return found


def cpu_seconds(pid: int) -> float:
    stat = _read(f"/proc/{pid}/stat")
    if stat is None:
        return 0.0
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def memory_kb(pid: int) -> dict[str, int]:
    """``{"rss": current, "hwm": peak}`` resident set size in kB (0 when gone)."""
    status = _read(f"/proc/{pid}/status") or ""
    out = {"rss": 0, "hwm": 0}
    for line in status.splitlines():
        if line.startswith("VmRSS:"):
            out["rss"] = int(line.split()[1])
        elif line.startswith("VmHWM:"):
            out["hwm"] = int(line.split()[1])
    return out


def pin(pids: Iterable[int], cpus: set[int]) -> None:
    """Every thread of each process in ``pids`` onto ``cpus`` (threads started later
    inherit them)."""
    for pid in pids:
        with contextlib.suppress(FileNotFoundError):
            for task in os.listdir(f"/proc/{pid}/task"):
                with contextlib.suppress(ProcessLookupError):
                    os.sched_setaffinity(int(task), cpus)


class CpuGroup:
    """A cgroup of the kernel's ``cpu`` controller (v1 or v2) for one run, at a low CPU
    weight: ``shares`` None sets ``cpu.idle`` (the kernel's SCHED_IDLE for a group, what
    systemd's ``CPUWeight=idle`` sets): its processes get the cores only when no process
    outside it wants one; a number is docker's ``cpu_shares`` (out of 1,024, what
    docker-compose.yml gives Stripe's webhooks and the worker). Needs write access to the
    cgroup hierarchy (root)."""

    def __init__(self, name: str, shares: int | None = None) -> None:
        v1 = Path("/sys/fs/cgroup/cpu")
        self.parent = v1 if (v1 / "cpu.shares").exists() else Path("/sys/fs/cgroup")
        self.path = self.parent / name
        try:
            self.path.mkdir(exist_ok=True)
            if shares is None:
                (self.path / "cpu.idle").write_text("1")
            elif self.parent == v1:
                (self.path / "cpu.shares").write_text(str(shares))
            else:  # cgroup v2's weight, from shares as the container runtimes map it
                weight = 1 + (shares - 2) * 9999 // 262142
                (self.path / "cpu.weight").write_text(str(weight))
        except OSError as exc:
            raise BenchError(f"cannot make the cpu cgroup {self.path} ({exc}): the weighted"
                             " burst needs root; BENCH_BURST_CORES=shared does not") from exc

    def add(self, pids: Iterable[int]) -> None:
        for pid in pids:
            with contextlib.suppress(OSError):  # gone, or not movable
                (self.path / "cgroup.procs").write_text(str(pid))

    def members(self) -> set[int]:
        return {int(p) for p in (_read(str(self.path / "cgroup.procs")) or "").split()}

    def remove(self) -> None:
        """Every process back in the parent group, and the group gone."""
        for pid in self.members():
            with contextlib.suppress(OSError):  # gone, or not movable
                (self.parent / "cgroup.procs").write_text(str(pid))
        with contextlib.suppress(OSError):
            self.path.rmdir()


def postgres_backends(database: str) -> list[int]:
    """The Postgres server processes serving connections to ``database``."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            cmdline = _read(f"/proc/{entry}/cmdline") or ""
            if cmdline.startswith("postgres: ") and f" {database} " in cmdline:
                pids.append(int(entry))
    return pids


def machine_cpu() -> tuple[float, float]:
    """(busy, total) jiffies of the whole machine since boot."""
    first = (_read("/proc/stat") or "cpu 0 0 0 0").splitlines()[0].split()[1:]
    values = [int(v) for v in first[:8]]
    idle = values[3] + values[4]  # idle + iowait
    return float(sum(values) - idle), float(sum(values))


def machine_info() -> dict[str, Any]:
    model = ""
    for line in (_read("/proc/cpuinfo") or "").splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem_kb = 0
    for line in (_read("/proc/meminfo") or "").splitlines():
        if line.startswith("MemTotal:"):
            mem_kb = int(line.split()[1])
    return {
        "cores": os.cpu_count(),
        "ram_gb": round(mem_kb / 1024 / 1024, 1),
        "cpu_model": model,
        "python": sys.version.split()[0],
        "postgres": "",
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
        "speed_probe_ms_at_start": speed_probe_ms(),
    }


def speed_probe_ms() -> float:
    """Milliseconds of CPU a fixed pure-Python loop takes, best of three: the same loop
    varied by a third from one hour to the next on the shared host these figures come
    from, so CPU figures of two runs compare only beside their probes."""
    best = float("inf")
    for _ in range(3):
        started = time.process_time()
        total = 0
        for i in range(2_000_000):
            total += i
        best = min(best, time.process_time() - started)
    return round(best * 1000, 1)


class CpuMeter:
    """CPU used by groups of processes between ``start()`` and ``stop()``, in cores."""

    def __init__(self, groups: Mapping[str, Callable[[], Iterable[int]]]) -> None:
        self.groups = groups
        self._start: dict[str, dict[int, float]] = {}
        self._t0 = 0.0
        self._machine0 = (0.0, 0.0)

    def _snapshot(self) -> dict[str, dict[int, float]]:
        return {
            name: {pid: cpu_seconds(pid) for pid in pids()} for name, pids in self.groups.items()
        }

    def start(self) -> None:
        self._start = self._snapshot()
        self._t0 = time.monotonic()
        self._machine0 = machine_cpu()

    def stop(self) -> dict[str, float]:
        end = self._snapshot()
        wall = max(time.monotonic() - self._t0, 1e-9)
        busy1, total1 = machine_cpu()
        out = {}
        for name, pids in end.items():
            before = self._start.get(name, {})
            used = sum(max(0.0, t - before.get(pid, 0.0)) for pid, t in pids.items())
            out[name] = round(used / wall, 2)
        total = total1 - self._machine0[1]
        busy = busy1 - self._machine0[0]
        out["machine"] = round((busy / total) * (os.cpu_count() or 1), 2) if total else 0.0
        return out


# --------------------------------------------------------------------------- services


@dataclass
class Process:
    """A child process in a session of its own, its output in a log file."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Process:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(  # noqa: S603 - our own commands
                self.argv, env=self.env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def pids(self) -> list[int]:
        return children(self.pid) if self.alive() else []

    def memory(self) -> list[dict[str, int]]:
        return [{"pid": pid, **memory_kb(pid)} for pid in self.pids()]

    def stop(self, timeout: float = 20.0) -> None:
        if not self.alive():
            return
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


def procfile_process(kind: str, env: dict[str, str], log_dir: Path, *, suffix: str = "") -> Process:
    """A Procfile process type, started the way containers start it."""
    argv = [sys.executable, "-m", "cli.procfile", kind]
    return Process(kind + suffix, argv, env, log_dir / f"{kind}{suffix}.log")


def shell_process(name: str, line: str, env: dict[str, str], log_dir: Path) -> Process:
    """A Procfile-style shell line (``exec ...``), run from the project root."""
    return Process(name, ["/bin/sh", "-c", line], env, log_dir / f"{name}.log")


@dataclass
class Database:
    """A Postgres database of this run's own, dropped at the end."""

    admin_url: str
    name: str = field(default_factory=lambda: f"refunds_bench_{secrets.token_hex(5)}")

    @property
    def url(self) -> str:
        return self.admin_url.rsplit("/", 1)[0] + f"/{self.name}"

    @property
    def dsn(self) -> str:
        """The plain libpq URL (no SQLAlchemy driver suffix), for psycopg."""
        return self.url.replace("postgresql+psycopg://", "postgresql://", 1)

    def _admin(self, sql: str) -> None:
        dsn = self.admin_url.replace("postgresql+psycopg://", "postgresql://", 1)
        with psycopg.connect(dsn, autocommit=True) as conn:
            conn.execute(sql)  # type: ignore[arg-type]

    def create(self) -> None:
        self._admin(f'CREATE DATABASE "{self.name}"')

    def drop(self) -> None:
        self._admin(f'DROP DATABASE IF EXISTS "{self.name}" WITH (FORCE)')

    def server_version(self) -> str:
        with psycopg.connect(self.dsn) as conn:
            row = conn.execute("SHOW server_version").fetchone()
        return str(row[0]) if row else ""


def redis_server(log_dir: Path) -> tuple[Process, str]:
    """A private, memory-only redis-server on a free port."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise BenchError("redis-server not found: apt-get install -y redis-server")
    port = free_port()
    argv = [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(log_dir)]
    proc = Process("redis", argv, dict(os.environ), log_dir / "redis.log").start()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            time.sleep(0.05)
    proc.stop()
    raise BenchError("redis-server did not start")
