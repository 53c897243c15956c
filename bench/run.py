"""The benchmark run behind ``make bench`` (``python -m bench``).

Phases, in order, on one stack of real processes:

1. seed: N succeeded payments at the emulator, then ``refunds payments sync``;
2. initiation: POST /v1/admin/refunds at each of BENCH_CONNECTIONS from the load
   generator, each phase over payments of its own (the worker is not running, so
   the refunds and their tasks pile up as they would behind a stopped worker), and
   GET /healthz; once per web server of BENCH_WEB_SERVERS;
3. baseline: the same database work and enqueue from ``bench.baseline``;
4. drain: a worker started on the pile (topped up through the API to
   BENCH_DRAIN_REFUNDS), emulator at zero latency: refunds/s, worker memory over it;
5. end to end: one refund at a time, 201 to ``succeeded`` seen in the database;
6. Stripe-shaped drain: emulator at 300 ms per call and 100 requests/s (429 beyond),
   worker limited by STRIPE_MAX_RPS a little under that;
7. hot spot: 8 connections refunding one payment in small amounts, and the baseline
   script on one payment of its own with as many threads.

Settings (environment): see ``Config.from_env``.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import math
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psycopg
import redis

from bench import events
from bench.baseline import ACTOR as BASELINE_ACTOR
from bench.loadgen import latency_summary
from bench.stack import (
    BIN,
    PROCFILE_WEB,
    ROOT,
    BenchError,
    CpuGroup,
    CpuMeter,
    Database,
    Process,
    free_port,
    machine_info,
    memory_kb,
    pin,
    postgres_backends,
    procfile_process,
    redis_server,
    shell_process,
    speed_probe_ms,
    wait_for_http,
)

RESULTS = ROOT / "bench" / "results" / "latest.json"
PAYMENT_AMOUNT = 10_000  # cents; each initiation request refunds REFUND_AMOUNT of it
REFUND_AMOUNT = 100
HOT_PAYMENT_AMOUNT = 100_000_000
SUBJECT = "bench@example.com"


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)


def _env_int(name: str, default: int, low: int = 1) -> int:
    raw = os.environ.get(name, "").strip()
    value = int(raw) if raw else default
    if value < low:
        raise BenchError(f"{name} must be at least {low}")
    return value


def _env_float(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    return float(raw) if raw else default


@dataclass(frozen=True)
class Config:
    payments: int
    seconds: float
    connections: tuple[int, ...]
    drain_refunds: int
    e2e_samples: int
    stripe_seconds: float
    stripe_latency_ms: int
    stripe_rate_limit: int
    stripe_max_rps: float
    worker_concurrency: int | None
    workers: int
    stripe_shapes: tuple[tuple[int, int | None], ...]
    phases: tuple[str, ...]
    webhook_events: int
    #: Rounds of (initiation alone, initiation during a burst), latencies pooled.
    burst_rounds: int
    webhook_rate: float
    webhook_connections: int
    webhook_stripe_latency_ms: int
    burst_refund_connections: int
    burst_refund_rates: tuple[float, ...]
    #: Where the burst's work runs, one run each: "weighted", "shared" or "split" (see
    #: ``Bench.arrange_burst``); the first is the targets'.
    burst_cores: tuple[str, ...]
    #: The weighted burst's CPU weight: None for ``cpu.idle``, else docker's cpu_shares.
    burst_shares: int | None
    baseline_threads: int
    hotspot_connections: int
    warmup_seconds: float
    idempotency_keys: bool
    web_servers: tuple[str, ...]
    profile: bool
    #: Celery's broker for the web and the workers; "" is the bench's own Redis.
    broker_url: str
    pg_admin_url: str
    output: str

    @classmethod
    def from_env(cls) -> Config:
        connections = tuple(
            int(c) for c in os.environ.get("BENCH_CONNECTIONS", "1,8,32").split(",") if c.strip()
        )
        payments = _env_int("BENCH_PAYMENTS", 20_000, low=400)
        return cls(
            payments=payments,
            seconds=_env_float("BENCH_SECONDS", 10.0),
            connections=connections,
            drain_refunds=_env_int("BENCH_DRAIN_REFUNDS", 20_000),
            e2e_samples=_env_int("BENCH_E2E_SAMPLES", 100),
            stripe_seconds=_env_float("BENCH_STRIPE_SECONDS", 30.0),
            stripe_latency_ms=_env_int("BENCH_STRIPE_LATENCY_MS", 300, low=0),
            stripe_rate_limit=_env_int("BENCH_STRIPE_RATE_LIMIT", 100),
            stripe_max_rps=_env_float("BENCH_STRIPE_MAX_RPS", 100.0),
            # Unset: the Procfile's default, as a new deployment runs it.
            worker_concurrency=(
                _env_int("BENCH_WORKER_CONCURRENCY", 64)
                if os.environ.get("BENCH_WORKER_CONCURRENCY") else None
            ),
            workers=_env_int("BENCH_WORKERS", 1),
            # "1": one Procfile worker with its defaults; "2x20": two with 20 threads each.
            stripe_shapes=tuple(
                _shape(shape)
                for shape in os.environ.get("BENCH_STRIPE_WORKERS", "1").split(",")
                if shape.strip()
            ),
            phases=tuple(
                p.strip() for p in os.environ.get("BENCH_PHASES", ",".join(PHASES)).split(",")
                if p.strip()
            ),
            webhook_events=_env_int("BENCH_WEBHOOK_EVENTS", 4000),
            burst_rounds=_env_int("BENCH_BURST_ROUNDS", 3, low=1),
            webhook_rate=_env_float("BENCH_WEBHOOK_RATE", 400.0),
            webhook_connections=_env_int("BENCH_WEBHOOK_CONNECTIONS", 32),
            webhook_stripe_latency_ms=_env_int("BENCH_WEBHOOK_STRIPE_LATENCY_MS", 1000, low=0),
            burst_refund_connections=_env_int("BENCH_BURST_REFUND_CONNECTIONS", 8),
            # The first rate is the targets' run: initiation arriving at 100/s, Stripe's
            # live limit. 0: as fast as the connections go (the machine saturated by
            # initiation alone; see webhook_burst), reported beside it.
            burst_refund_rates=tuple(
                float(r) for r in os.environ.get("BENCH_BURST_REFUND_RATE", "100,0").split(",")
                if r.strip()
            ) or (100.0,),
            burst_cores=_burst_cores(os.environ.get("BENCH_BURST_CORES", "weighted,shared")),
            burst_shares=_burst_shares(os.environ.get("BENCH_BURST_WEIGHT", "idle")),
            baseline_threads=_env_int("BENCH_BASELINE_THREADS", 8),
            hotspot_connections=_env_int("BENCH_HOTSPOT_CONNECTIONS", 8),
            warmup_seconds=_env_float("BENCH_WARMUP_SECONDS", 2.0),
            idempotency_keys=os.environ.get("BENCH_IDEMPOTENCY", "1") not in ("", "0"),
            web_servers=_web_servers(os.environ.get("BENCH_WEB_SERVERS",
                                                      "gunicorn,gunicorn-gthread,granian")),
            profile=os.environ.get("BENCH_PROFILE", "") not in ("", "0"),
            broker_url=os.environ.get("BENCH_BROKER_URL", ""),
            pg_admin_url=os.environ.get(
                "BENCH_PG_ADMIN_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
            ),
            output=os.environ.get("BENCH_OUTPUT", str(RESULTS)),
        )


PHASES = ("initiation", "http_floor", "baseline", "drain", "end_to_end", "events_out",
          "stripe_shaped", "webhook_burst", "hot_spot")


#: The web servers ``BENCH_WEB_SERVERS`` can name, each with WEB_CONCURRENCY processes.
#: The one the Procfile's ``web`` line runs (gunicorn's gevent worker) is started from the
#: Procfile itself, exactly as production starts it; the others are the alternatives it
#: was chosen over: gunicorn's thread worker (the earlier Procfile line) and granian.
WEB_SERVERS = {
    "gunicorn": "exec gunicorn api.wsgi:app --config gunicorn.conf.py --bind 127.0.0.1:${PORT}"
                " --workers ${WEB_CONCURRENCY:-2}",
    "gunicorn-gthread": "exec gunicorn api.wsgi:app --config gunicorn.conf.py"
                        " --bind 127.0.0.1:${PORT} --worker-class gthread"
                        " --workers ${WEB_CONCURRENCY:-2} --threads 4",
    "granian": "exec granian api.wsgi:app --interface wsgi --host 127.0.0.1 --port ${PORT}"
               " --workers ${WEB_CONCURRENCY:-2} --blocking-threads 4 --http 1 --no-ws",
}


def _web_servers(text: str) -> tuple[str, ...]:
    """``gunicorn,granian:--backpressure 8``: a server name, then flags added to its line."""
    servers = tuple(s.strip() for s in text.split(",") if s.strip())
    for server in servers:
        if server.partition(":")[0] not in WEB_SERVERS:
            raise BenchError(f"BENCH_WEB_SERVERS: {server!r}: known are {', '.join(WEB_SERVERS)}")
    if not servers:
        raise BenchError("BENCH_WEB_SERVERS names no server")
    return servers


def web_server_line(server: str) -> str:
    """The shell line that runs ``server`` (see ``WEB_SERVERS``)."""
    name, _, flags = server.partition(":")
    procfile_runs_it = f"exec {name} " in PROCFILE_WEB
    line = PROCFILE_WEB if procfile_runs_it else WEB_SERVERS[name]
    return f"{line} {flags}".strip()


def procfile_server() -> str:
    """The name of the web server the Procfile's ``web`` line runs."""
    return next(name for name in WEB_SERVERS if f"exec {name} " in PROCFILE_WEB)


def _burst_cores(text: str) -> tuple[str, ...]:
    arrangements = tuple(a.strip() for a in text.split(",") if a.strip())
    for arrangement in arrangements:
        if arrangement not in ("weighted", "shared", "split"):
            raise BenchError("BENCH_BURST_CORES must list weighted, shared or split,"
                             f" not {arrangement!r}")
    if not arrangements:
        raise BenchError("BENCH_BURST_CORES lists no arrangement")
    if "split" in arrangements and len(os.sched_getaffinity(0)) < 2:
        raise BenchError("BENCH_BURST_CORES=split needs two cores")
    return arrangements


def _burst_shares(text: str) -> int | None:
    text = text.strip()
    if text == "idle":
        return None
    if not text.isdigit() or not 2 <= int(text) <= 262144:
        raise BenchError(f"BENCH_BURST_WEIGHT must be idle or cpu shares (2-262144), not {text!r}")
    return int(text)


def _shape(text: str) -> tuple[int, int | None]:
    processes, _, threads = text.strip().partition("x")
    return int(processes), int(threads) if threads else None


def _per_request(cpu_cores: dict[str, float], per_second: float) -> dict[str, float]:
    """CPU milliseconds each process kind spent per request (or operation)."""
    if not per_second:
        return {}
    return {kind: round(cores / per_second * 1000, 3) for kind, cores in cpu_cores.items()}


def _refund_events(made: list[Any], count: int) -> list[str]:
    """``count`` of Stripe's refund events (four kinds, each about one of ``made``'s
    refunds), new ids each call: the endpoint stores an event once."""
    types = ("refund.created", "refund.updated", "charge.refund.updated", "refund.updated")
    return [
        json.dumps({
            "id": f"evt_bench_{i:08d}_{secrets.token_hex(4)}", "object": "event",
            "type": types[i % len(types)], "created": int(time.time()),
            "data": {"object": {"id": made[(i // len(types)) % len(made)][0],
                                "object": "refund"}},
        })
        for i in range(count)
    ]


def _pooled(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Load generator runs as one: latencies pooled, counts summed, rates and cores
    averaged; ``p99_by_run`` keeps each run's own p99."""
    latencies = [x for run in runs for x in run.pop("latencies_s")]
    statuses: Counter[str] = Counter()
    for run in runs:
        statuses.update(run["statuses"])
    out = {
        **runs[0],
        "requests": sum(run["requests"] for run in runs),
        "ok": sum(run["ok"] for run in runs),
        "errors": sum(run["errors"] for run in runs),
        "statuses": dict(statuses),
        "requests_per_s": round(statistics.fmean(run["requests_per_s"] for run in runs), 1),
        "latency_ms": latency_summary(latencies),
        "p99_by_run": [run["latency_ms"]["p99"] for run in runs],
    }
    if all("cpu_cores" in run for run in runs):
        out["cpu_cores"] = {kind: round(statistics.fmean(run["cpu_cores"].get(kind, 0.0)
                                                         for run in runs), 3)
                            for kind in runs[0]["cpu_cores"]}
        out["cpu_ms_per_request"] = _per_request(out["cpu_cores"], out["requests_per_s"])
    return out


def _mb(kb: int) -> float:
    return round(kb / 1024, 1)


class Bench:
    def __init__(self, config: Config, work: Path) -> None:
        self.config = config
        self.work = work
        self.db = Database(config.pg_admin_url)
        self.processes: list[Process] = []
        self.peak_rss_kb: dict[str, list[int]] = {}
        self.result: dict[str, Any] = {}
        self.env: dict[str, str] = {}
        self.web: Process | None = None
        #: The burst's webhook server when BENCH_BURST_CORES is weighted or split, else
        #: None (the API's).
        self.webhook_web: Process | None = None
        self.webhook_url = ""
        #: The API's core and the burst's (BENCH_BURST_CORES=split).
        self.burst_cpus = sorted(os.sched_getaffinity(0))[:2]
        #: How the burst's work is placed now (``arrange_burst``), and its cgroup when
        #: "weighted".
        self.burst_cores = "shared"
        self.burst_group: CpuGroup | None = None
        self.web_slug = ""
        self.emulator: Process | None = None
        self.redis: Process | None = None
        self.workers: list[Process] = []
        self._conn: psycopg.Connection[Any] | None = None

    # ------------------------------------------------------------------ plumbing

    def start(self, process: Process) -> Process:
        self.processes.append(process)
        return process.start()

    def note_peak(self, kind: str, process: Process | None) -> None:
        """Remember the peak RSS of each process of ``process`` (call before stopping it)."""
        if process is not None:
            self.peak_rss_kb.setdefault(kind, []).extend(m["hwm"] for m in process.memory())

    def stop(self, process: Process | None, kind: str) -> None:
        if process is not None:
            self.note_peak(kind, process)
            process.stop()

    def sql(self, query: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        """Run one statement on the run's own (autocommit) connection."""
        if self._conn is None:
            self._conn = psycopg.connect(self.db.dsn, autocommit=True)
        return self._conn.execute(query, params).fetchall()  # type: ignore[arg-type]

    def status_counts(self, since: Any = None) -> dict[str, int]:
        """Refunds by status (those created at or after ``since``, a database timestamp).

        The baseline's refunds have no task behind them (and the audit trail is
        append-only, so they stay): they are not part of any drain."""
        return {str(s): int(n) for s, n in self.sql(
            "SELECT status, count(*) FROM refunds WHERE initiated_by <> %s"
            " AND created_at >= coalesce(%s::timestamptz, '-infinity') GROUP BY status",
            (BASELINE_ACTOR, since),
        )}

    def db_now(self) -> Any:
        return self.sql("SELECT now()")[0][0]

    def worker_pids(self) -> list[int]:
        """Every process of the running workers."""
        return [p for w in self.workers for p in w.pids()]

    def meter(self) -> CpuMeter:
        groups = {
            "web": lambda: self.web.pids() if self.web else [],
            "worker": self.worker_pids,
            "postgres": lambda: postgres_backends(self.db.name),
            "redis": lambda: self.redis.pids() if self.redis else [],
            "emulator": lambda: self.emulator.pids() if self.emulator else [],
        }
        if self.webhook_web is not None:  # BENCH_BURST_CORES=weighted or split
            groups["webhook_web"] = self.webhook_web.pids
        return CpuMeter(groups)

    def write_lines(self, name: str, lines: list[str]) -> Path:
        path = self.work / name
        path.write_text("\n".join(lines) + "\n")
        return path

    def loadgen(self, payments: Path, connections: int, *, duration: float | None = None,
                requests: int | None = None, amount: int = REFUND_AMOUNT,
                meter: bool = False, profile: str | None = None,
                idempotency_keys: bool = False, get: str | None = None,
                webhook_events: Path | None = None, rate: float = 0.0,
                latencies: bool = False) -> dict[str, Any]:
        """Run the load generator as its own process; with ``meter``, the CPU each
        process kind used in the middle of the run is added as ``cpu_cores``."""
        # The webhooks go to the burst's own server when there is one (BENCH_BURST_CORES).
        url = self.webhook_url if webhook_events is not None and self.webhook_url else self.url
        argv = [sys.executable, "-m", "bench.loadgen", "--url", url,
                "--payments", str(payments), "--connections", str(connections),
                "--amount", str(amount)]
        argv += ["--duration", str(duration)] if duration is not None else [
            "--requests", str(requests)]
        if idempotency_keys:
            argv.append("--idempotency-keys")
        if get is not None:
            argv += ["--get", get, "--expect", "200"]
        if webhook_events is not None:
            argv += ["--webhook-events", str(webhook_events), "--expect", "200"]
        if rate:
            argv += ["--rate", str(rate)]
        if latencies:
            argv.append("--latencies")
        env = {**self.env, "LOADGEN_TOKEN": self.token,
               "LOADGEN_WEBHOOK_SECRET": self.env["STRIPE_WEBHOOK_SECRET"]}
        proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.PIPE)  # noqa: S603
        if webhook_events is not None and self.burst_cores == "split":
            pin([proc.pid], {self.burst_cpus[1]})  # Stripe's side, on the burst's core
        if webhook_events is not None and self.burst_group is not None:
            self.burst_group.add([proc.pid])  # Stripe's side, with the burst
        cpu = None
        spy = None
        if meter and duration is not None and duration > 2:
            # Skip the generator's start-up and the last half second: steady state only.
            time.sleep(1.0)
            if profile:
                spy = self.profile_web(profile, duration - 2.0)
            cpu_meter = self.meter()
            cpu_meter.start()
            time.sleep(duration - 1.5)
            cpu = cpu_meter.stop()
        out, _ = proc.communicate(timeout=(duration or 600) + 120)
        if proc.returncode != 0:
            raise BenchError(f"load generator failed with {proc.returncode}")
        if spy is not None:
            spy.wait(60)
        result: dict[str, Any] = json.loads(out)
        if cpu is not None:
            result["cpu_cores"] = cpu
            result["cpu_ms_per_request"] = _per_request(cpu, result["requests_per_s"])
        return result

    def profile_web(self, name: str, seconds: float) -> subprocess.Popen[bytes] | None:
        """py-spy on the web processes, GIL holders only (what costs a process its core),
        as raw collapsed stacks: ``flamegraph.pl`` or speedscope draw them, and a per-step
        breakdown is a grep away."""
        assert self.web is not None
        spy = BIN / "py-spy"
        if not spy.exists():
            log("py-spy is not installed; no profile")
            return None
        out = self.work / f"{name}.txt"
        log(f"profiling the web processes for {seconds:.0f} s into {out}")
        return subprocess.Popen(  # noqa: S603
            [str(spy), "record", "--pid", str(self.web.pid), "--subprocesses", "--gil",
             "--duration", str(max(1, int(seconds))), "--rate", "200", "--nonblocking",
             "--format", "raw", "--output", str(out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

    def profile_worker(self, name: str) -> subprocess.Popen[bytes] | None:
        """py-spy on the first worker process for 15 s, GIL holders only (what costs the
        process its one core)."""
        spy = BIN / "py-spy"
        if not spy.exists() or not self.workers:
            log("py-spy is not installed; no profile")
            return None
        out = self.work / f"{name}.txt"
        # The Procfile line runs under a wrapper: profile the process that is Celery.
        time.sleep(2.0)
        pid = max(self.workers[0].pids(), key=lambda p: memory_kb(p)["rss"])
        log(f"profiling the worker (pid {pid}) into {out}")
        return subprocess.Popen(  # noqa: S603
            [str(spy), "record", "--pid", str(pid), "--gil", "--rate", "200",
             "--duration", "15", "--nonblocking", "--format", "raw", "--output", str(out)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )

    # ------------------------------------------------------------------ stack

    def setup(self) -> None:
        c = self.config
        self.result["machine"] = machine_info()
        log(f"load average {self.result['machine']['load_average_at_start']}")
        self.db.create()
        log(f"database {self.db.name}")
        self.redis, redis_url = redis_server(self.work)
        self.processes.append(self.redis)
        emulator_port, web_port = free_port(), free_port()
        self.url = f"http://127.0.0.1:{web_port}"
        self.emulator_url = f"http://127.0.0.1:{emulator_port}"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("BENCH_", "CELERY_"))},
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "DATABASE_URL": self.db.url,
            "REDIS_URL": redis_url,
            "JWT_SECRET": secrets.token_hex(32),
            "STRIPE_API_KEY": "sk_test_bench",
            "STRIPE_API_BASE": self.emulator_url,
            "STRIPE_WEBHOOK_SECRET": f"whsec_{secrets.token_hex(16)}",
            "PORT": str(web_port),
            "WORKER_METRICS_PORT": "0",
            "LOG_LEVEL": os.environ.get("LOG_LEVEL", "INFO"),
            "PYTHONUNBUFFERED": "1",
        }
        if c.broker_url:
            self.env["CELERY_BROKER_URL"] = c.broker_url
        self.env.pop("PROMETHEUS_MULTIPROC_DIR", None)
        self.redis_url = redis_url
        release = procfile_process("release", self.env, self.work)
        release.start()
        assert release.proc is not None
        if release.proc.wait(120) != 0:
            raise BenchError(f"release (migrations) failed: {release.log_path.read_text()[-2000:]}")
        self.result["machine"]["postgres"] = self.db.server_version()

        self.emulator = self.start(Process(
            "emulator", [sys.executable, "-m", "emulator", "--port", str(emulator_port)],
            self.env, self.work / "emulator.log",
        ))
        wait_for_http(f"{self.emulator_url}/_emulator/health", proc=self.emulator.proc,
                      log=self.emulator.log_path)
        from emulator.testing import Admin

        self.admin = Admin(self.emulator_url, timeout=120)
        self.seed()

        os.environ.update(self.env)
        from shared.adapters.config import get_settings
        from shared.adapters.tokens import issue_token

        get_settings.cache_clear()
        self.token = issue_token(
            get_settings(), subject=SUBJECT, scopes=["refunds:write", "refunds:read"],
            ttl_seconds=24 * 3600,
        )
        self.result["config"] = {
            **{k: v for k, v in asdict(c).items()
               if k not in ("pg_admin_url", "output", "broker_url")},
            # The scheme only: a broker URL may carry a password.
            "broker": c.broker_url.partition(":")[0] if c.broker_url else "redis (the bench's own)",
            "web": f"WEB_CONCURRENCY={os.environ.get('WEB_CONCURRENCY', 'default')}, "
                   f"WEB_CONNECTIONS={os.environ.get('WEB_CONNECTIONS', 'default')}, "
                   f"WEB_DB_CONNECTIONS={os.environ.get('WEB_DB_CONNECTIONS', 'default')}; "
                   "the Procfile runs "
                   f"{procfile_server()}, which serves every phase after the web servers' own",
            "web_server_lines": {server: web_server_line(server) for server in c.web_servers},
            "worker": f"Procfile worker x{c.workers}, WORKER_CONCURRENCY="
                      f"{c.worker_concurrency or 'default'}",
            "webhooks": "off: the emulator sends none, so the drains measure the worker alone; "
                        "the webhook_burst phase sends signed events of its own",
        }

    def start_web(self, server: str) -> None:
        """Serve the API with ``server`` (an entry of BENCH_WEB_SERVERS) in place of the
        one running now; each gets a Prometheus directory of its own."""
        self.stop(self.web, "web")
        slug = "".join(ch if ch.isalnum() else "-" for ch in server).strip("-")
        self.web_slug = slug
        metrics_dir = self.work / f"metrics-{slug}"
        metrics_dir.mkdir(exist_ok=True)
        env = {**self.env, "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
        self.web = self.start(shell_process(f"web-{slug}", web_server_line(server), env, self.work))
        wait_for_http(f"{self.url}/readyz", proc=self.web.proc, log=self.web.log_path)

    def seed(self) -> None:
        c = self.config
        started = time.perf_counter()
        seeded = self.admin.seed(c.payments, amount=PAYMENT_AMOUNT)
        # Two hot payments: one for the API's hot spot, one for the baseline's.
        hot = self.admin.seed(2, amount=HOT_PAYMENT_AMOUNT)
        emulator_seconds = time.perf_counter() - started
        # The real backfill path; its own one-off run may use the whole Stripe budget.
        started = time.perf_counter()
        sync = subprocess.run(  # noqa: S603
            [str(BIN / "refunds"), "payments", "sync"],
            env={**self.env, "STRIPE_MAX_RPS": "1000"}, cwd=ROOT, capture_output=True,
            text=True, check=False,
        )
        if sync.returncode != 0:
            raise BenchError(f"refunds payments sync failed: {sync.stderr[-2000:]}")
        sync_seconds = time.perf_counter() - started
        by_charge = dict(self.sql("SELECT id, payment_id FROM charges"))
        charges = [ch for ch in seeded["charges"] if ch in by_charge]
        if len(charges) != c.payments or not set(hot["charges"]) <= by_charge.keys():
            raise BenchError(f"sync stored {len(by_charge)} charges, expected {c.payments + 2}")
        self.charges = charges
        self.payment_of = by_charge
        self.hot_charge, self.hot_baseline_charge = hot["charges"]
        self.result["seed"] = {
            "payments": c.payments,
            "method": "emulator /_emulator/seed, then `refunds payments sync` "
                      "(STRIPE_MAX_RPS=1000 for this one-off backfill)",
            "emulator_seconds": round(emulator_seconds, 2),
            "sync_seconds": round(sync_seconds, 2),
            "sync_payments_per_s": round(c.payments / sync_seconds, 1),
        }
        log(f"seeded {c.payments} payments: sync took {sync_seconds:.1f} s")

    def slices(self) -> dict[str, list[str]]:
        """Disjoint shares of the payments: one per phase."""
        n = self.config.payments
        sizes = {"warmup": 0.02, "initiation": 0.45, "idempotency": 0.12, "baseline": 0.20,
                 "e2e": 0.11, "burst": 0.10}
        out, start = {}, 0
        for name, share in sizes.items():
            size = int(n * share)
            out[name] = self.charges[start : start + size]
            start += size
        return out

    # ------------------------------------------------------------------ phases

    def web_server_phases(self, shares: dict[str, list[str]]) -> None:
        """Initiation and the HTTP floor once per web server of BENCH_WEB_SERVERS, each on
        payments of its own, keyed by server under ``web_servers``. The server the
        Procfile runs goes last and keeps serving the later phases; its figures are also
        the top-level ``initiation``, ``initiation_with_idempotency_key`` and
        ``http_floor`` (those of the first server listed if it is not measured)."""
        c = self.config
        production = procfile_server()
        servers = [s for s in c.web_servers if s != production]
        servers += [production] if production in c.web_servers else []
        measured = {"initiation", "http_floor"} & set(c.phases) or (
            {"initiation"} if "baseline" in c.phases else set())
        self.result["web_servers"] = {}
        for i, server in enumerate(servers if measured else []):
            self.start_web(server)
            mine = {name: share[i :: len(servers)] for name, share in shares.items()}
            out: dict[str, Any] = {}
            if "initiation" in measured:
                out.update(self.initiation(server, mine))
            if "http_floor" in measured:
                out["http_floor"] = self.http_floor(server, mine["baseline"])
            self.result["web_servers"][server] = out
        if not measured or servers[-1] != production:
            self.start_web(production)
        top = self.result["web_servers"].get(production) or next(
            iter(self.result["web_servers"].values()), {})
        self.result.update(top)
        self.result["web_server"] = production if production in c.web_servers else (
            servers[0] if measured else production)

    def initiation(self, server: str, shares: dict[str, list[str]]) -> dict[str, Any]:
        c = self.config
        warm = self.write_lines("warmup.txt", shares["warmup"])
        self.loadgen(warm, 8, duration=c.warmup_seconds)
        # Each connection count gets payments of its own, in proportion to its load.
        pool = shares["initiation"]
        weights = [min(k, 8) for k in c.connections]
        start = 0
        result: dict[str, Any] = {"initiation": {}}
        for k, weight in zip(c.connections, weights, strict=True):
            size = max(k, len(pool) * weight // sum(weights))
            mine = pool[start : start + size] or pool
            start += size
            path = self.write_lines(f"initiation-{k}.txt", mine)
            profile = (f"profile-web-{self.web_slug}-{k}"
                       if c.profile and k == max(c.connections) else None)
            out = self.loadgen(path, k, duration=c.seconds, meter=True, profile=profile)
            result["initiation"][str(k)] = out
            web_cpu = out.get("cpu_ms_per_request", {}).get("web")
            log(f"{server}: initiation @{k}: {out['requests_per_s']}/s,"
                f" p50 {out['latency_ms']['p50']} ms, p99 {out['latency_ms']['p99']} ms,"
                f" errors {out['errors']}, web CPU {web_cpu} ms per request,"
                f" loadgen {out['loadgen_cpu_cores']} cores")
        if c.idempotency_keys:
            # What careful callers send: a fresh Idempotency-Key with each refund (two more
            # statements in the transaction: claim the key, store the answer).
            k = max(c.connections)
            path = self.write_lines("idempotency.txt", shares["idempotency"])
            out = self.loadgen(path, k, duration=c.seconds, meter=True, idempotency_keys=True)
            result["initiation_with_idempotency_key"] = out
            log(f"{server}: initiation with Idempotency-Key @{k}: {out['requests_per_s']}/s,"
                f" p99 {out['latency_ms']['p99']} ms, errors {out['errors']}")
        return result

    def http_floor(self, server: str, share: list[str]) -> dict[str, Any]:
        """GET /healthz at the highest connection count: what the web server and Flask
        alone serve on this machine (no token, no database, no broker), the ceiling any
        endpoint of this stack could reach."""
        c = self.config
        k = max(c.connections)
        path = self.write_lines("floor.txt", share[:1])
        out = self.loadgen(path, k, duration=c.seconds, meter=True, get="/healthz")
        log(f"{server}: GET /healthz @{k}: {out['requests_per_s']}/s,"
            f" p99 {out['latency_ms']['p99']} ms, web CPU"
            f" {out.get('cpu_ms_per_request', {}).get('web')} ms per request")
        return out

    def baseline(self, share: list[str]) -> None:
        result = self.run_baseline("baseline", share, REFUND_AMOUNT,
                                   self.config.baseline_threads)
        self.result["baseline"] = result
        log(f"baseline: {result['ops_per_s']} ops/s, p99 {result['latency_ms']['p99']} ms,"
            f" errors {result['errors']}")

    def celery_message(self) -> Path:
        """A copy of a ``refunds.process`` message the API queued, ``{refund_id}`` where
        its id goes: what the baseline pushes."""
        msg = self.work / "celery-message.json"
        if msg.exists():
            return msg
        message = redis.Redis.from_url(self.redis_url).lindex("refunds", 0)
        if message is None:
            raise BenchError("no Celery message in the queue to model the baseline's on")
        text = message.decode()
        refund_ids = self.sql("SELECT id FROM refunds ORDER BY created_at DESC LIMIT 50000")
        for (refund_id,) in refund_ids:
            if refund_id in text:
                text = text.replace(refund_id, "{refund_id}")
                break
        msg.write_text(text)
        return msg

    def run_baseline(self, name: str, charges: list[str], amount: int, threads: int
                     ) -> dict[str, Any]:
        """``bench.baseline`` with ``threads`` threads over ``charges``."""
        c = self.config
        payments = self.write_lines(
            f"{name}.txt", [f"{self.payment_of[ch]} {ch}" for ch in charges]
        )
        argv = [sys.executable, "-m", "bench.baseline", "--dsn", self.db.dsn,
                "--redis-url", self.redis_url, "--payments", str(payments),
                "--message", str(self.celery_message()),
                "--threads", str(threads), "--duration", str(c.seconds),
                "--amount", str(amount)]
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=subprocess.PIPE, env=self.env)  # noqa: S603
        time.sleep(1.0)
        meter = self.meter()
        meter.start()
        time.sleep(max(0.5, c.seconds - 1.5))
        cpu = meter.stop()
        out, _ = proc.communicate(timeout=c.seconds + 120)
        if proc.returncode != 0:
            raise BenchError(f"{name} failed")
        result: dict[str, Any] = json.loads(out)
        result["cpu_cores"] = cpu
        result["cpu_ms_per_op"] = _per_request(cpu, result["ops_per_s"])
        return result

    def top_up(self, target: int) -> int:
        pending = self.status_counts().get("pending", 0)
        if pending < target:
            all_payments = self.write_lines("all.txt", self.charges)
            log(f"topping up the pile to {target} refunds through the API")
            out = self.loadgen(all_payments, 8, requests=target - pending)
            if out["errors"]:
                raise BenchError(f"top-up requests failed: {out['statuses']}")
        return self.status_counts().get("pending", 0)

    def start_workers(self, processes: int, threads: int | None, **env: str) -> None:
        self.stop_workers()
        worker_env = {**self.env, **env}
        if threads is not None:
            worker_env["WORKER_CONCURRENCY"] = str(threads)
        self.workers = []
        for i in range(processes):
            worker_env["HONCHO_PROCESS_NAME"] = f"bench-{self.db.name}-{i}"
            proc = procfile_process("worker", dict(worker_env), self.work, suffix=f"-{i}")
            self.workers.append(self.start(proc))

    def stop_workers(self) -> None:
        for w in self.workers:
            self.stop(w, "worker")
        self.workers = []

    def worker_db_connections(self) -> int:
        """Postgres connections of the worker processes (their application_name)."""
        rows = self.sql(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
            " AND application_name = 'refunds-worker'"
        )
        return int(rows[0][0])

    def worker_rss_kb(self) -> int:
        return sum(memory_kb(p)["rss"] for p in self.worker_pids())

    def drain(self, name: str, expected: int, *, timeout: float, since: Any = None
              ) -> dict[str, Any]:
        """Watch the pending pile go down with the workers running; per-second samples."""
        started = time.monotonic()
        samples: list[tuple[float, int, int]] = []  # (t, done, worker rss kB)
        meter = self.meter()
        meter_started = False
        last_progress = started
        done = 0
        peak_connections = 0
        while True:
            time.sleep(0.5)
            peak_connections = max(peak_connections, self.worker_db_connections())
            counts = self.status_counts()
            pending = counts.get("pending", 0)
            done_now = expected - pending
            now = time.monotonic()
            for w in self.workers:
                if not w.alive():
                    raise BenchError(f"worker exited: {w.log_path.read_text()[-2000:]}")
            samples.append((now - started, done_now, self.worker_rss_kb()))
            if done_now > done:
                last_progress = now
                if not meter_started:
                    meter.start()
                    meter_started = True
            done = done_now
            if pending == 0 or now - last_progress > 60 or now - started > timeout:
                break
        cpu = meter.stop() if meter_started else {}
        first = next((s for s in samples if s[1] > 0), samples[-1])
        last = next((s for s in samples if s[1] >= done), samples[-1])

        def at(fraction: float) -> tuple[float, int, int]:
            return next((s for s in samples if s[1] >= fraction * expected), samples[-1])

        lo, hi = at(0.1), at(0.9)
        steady = (hi[1] - lo[1]) / (hi[0] - lo[0]) if hi[0] > lo[0] else 0.0
        overall = (last[1] - first[1]) / (last[0] - first[0]) if last[0] > first[0] else 0.0
        counts = self.status_counts(since)
        stats = self.admin.stats()
        by_id = stats.get("refunds_by_metadata_refund_id", {})
        rss = [s[2] for s in samples if s[1] > 0]
        out = {
            "refunds": expected,
            "done": done,
            "left_pending": counts.get("pending", 0),
            "statuses": counts,
            "seconds": round(last[0] - first[0], 2),
            "refunds_per_s": round(overall, 1),
            "steady_refunds_per_s": round(steady, 1),
            "worker_start_seconds": round(first[0], 2),
            "stripe_refunds_created": stats.get("refunds", 0) - self.stripe_refunds_before,
            "duplicate_stripe_refunds": sum(n - 1 for n in by_id.values() if n > 1),
            "emulator_429s": stats.get("rate_limited", 0),
            "emulator_requests": stats.get("requests_total", 0),
            "worker_rss_mb": {
                "start": _mb(rss[0]) if rss else 0.0,
                "at_10pct": _mb(lo[2]),
                "at_50pct": _mb(at(0.5)[2]),
                "end": _mb(rss[-1]) if rss else 0.0,
                "max": _mb(max(rss)) if rss else 0.0,
            },
            "cpu_cores": cpu,
            # CPU of the worker processes for each refund, over the drain.
            "worker_cpu_ms_per_refund": (
                round(cpu.get("worker", 0.0) / overall * 1000, 2) if overall else None
            ),
            # Postgres backends the worker processes held, sampled every 0.5 s.
            "peak_worker_db_connections": peak_connections,
        }
        if done < expected:
            out["incomplete"] = True
        log(f"{name}: {out['refunds_per_s']} refunds/s (steady {out['steady_refunds_per_s']}),"
            f" {done}/{expected} done, 429s {out['emulator_429s']},"
            f" worker CPU {out['worker_cpu_ms_per_refund']} ms/refund,"
            f" peak DB connections {peak_connections}, worker RSS {out['worker_rss_mb']}")
        return out

    def zero_latency_drain(self) -> None:
        c = self.config
        pending = self.top_up(c.drain_refunds)
        queued = redis.Redis.from_url(self.redis_url).llen("refunds")
        self.admin.clear_faults()
        self.admin.reset_stats()
        self.stripe_refunds_before = self.admin.stats().get("refunds", 0)
        log(f"drain: {pending} pending refunds ({queued} tasks queued), emulator at 0 ms")
        # The limiter is not what this phase measures: a budget far above what one machine
        # can send leaves the workers' own speed.
        self.start_workers(c.workers, c.worker_concurrency, STRIPE_MAX_RPS="100000")
        spy = self.profile_worker("profile-worker-drain") if c.profile else None
        out = self.drain("drain", pending, timeout=1800)
        if spy is not None:
            spy.wait(120)
        out["tasks_queued"] = queued
        out["stripe_max_rps"] = 100000
        self.result["drain"] = out

    def end_to_end(self, share: list[str]) -> None:
        """One refund at a time: POST, then poll its row until it leaves ``pending``."""
        c = self.config
        if not self.workers:  # BENCH_PHASES without the drain, which starts them
            self.start_workers(c.workers, c.worker_concurrency, STRIPE_MAX_RPS="100000")
            deadline = time.monotonic() + 60
            while not all(" ready." in w.log_path.read_text(errors="replace")
                          for w in self.workers):
                if time.monotonic() > deadline:
                    raise BenchError("the workers did not start within 60 s")
                time.sleep(0.2)
        api = http.client.HTTPConnection("127.0.0.1", int(self.url.rsplit(":", 1)[1]))
        headers = {"Authorization": f"Bearer {self.token}", "Content-Type": "application/json"}
        e2e, post = [], []
        statuses: dict[str, int] = {}
        self.sql("SELECT 1")
        conn = self._conn
        assert conn is not None
        for charge in share[: c.e2e_samples]:
            body = json.dumps({"charge_id": charge, "amount_cents": REFUND_AMOUNT})
            sent = time.perf_counter()
            api.request("POST", "/v1/admin/refunds", body=body, headers=headers)
            response = api.getresponse()
            payload = json.loads(response.read())
            answered = time.perf_counter()
            if response.status != 201:
                statuses[str(response.status)] = statuses.get(str(response.status), 0) + 1
                continue
            status = "pending"
            while status == "pending" and time.perf_counter() - answered < 30:
                time.sleep(0.001)
                row = conn.execute("SELECT status FROM refunds WHERE id = %s",
                                   (payload["refund_id"],)).fetchone()
                status = row[0] if row else "pending"
            seen = time.perf_counter()
            statuses[status] = statuses.get(status, 0) + 1
            post.append(answered - sent)
            e2e.append(seen - answered)
            time.sleep(0.02)
        api.close()
        self.result["end_to_end"] = {
            "samples": len(e2e),
            "statuses": statuses,
            "created_to_succeeded_ms": latency_summary(e2e),
            "post_ms": latency_summary(post),
            "how": "one refund at a time; 201 received -> 'succeeded' read from Postgres "
                   "(polled every 1 ms)",
        }
        log(f"end to end: p50 {latency_summary(e2e)['p50']} ms, p99 {latency_summary(e2e)['p99']}")

    def stripe_shaped(self) -> None:
        """The Stripe-shaped drain once per worker shape (processes x threads)."""
        self.stop_workers()
        self.result["stripe_shaped"] = {}
        for processes, threads in self.config.stripe_shapes:
            self.stripe_shaped_once(processes, threads)
        self.admin.clear_faults()

    def stripe_shaped_once(self, processes: int, threads: int | None) -> None:
        c = self.config
        shape = f"{processes}x{threads}" if threads else f"{processes}x(Procfile default)"
        count = math.ceil(c.stripe_max_rps * c.stripe_seconds)
        since = self.db_now()
        all_payments = self.write_lines("all.txt", self.charges)
        out = self.loadgen(all_payments, 8, requests=count)
        if out["errors"]:
            raise BenchError(f"requests for the Stripe-shaped drain failed: {out['statuses']}")
        pending = self.status_counts().get("pending", 0)
        self.admin.faults(latency_ms=c.stripe_latency_ms, rate_limit_rps=c.stripe_rate_limit)
        self.admin.reset_stats()
        self.stripe_refunds_before = self.admin.stats().get("refunds", 0)
        log(f"Stripe-shaped drain, {shape} worker threads: {pending} refunds, emulator"
            f" {c.stripe_latency_ms} ms and {c.stripe_rate_limit}/s,"
            f" STRIPE_MAX_RPS={c.stripe_max_rps:g}")
        self.start_workers(processes, threads, STRIPE_MAX_RPS=f"{c.stripe_max_rps:g}")
        result = self.drain(f"Stripe-shaped drain {shape}", pending,
                            timeout=c.stripe_seconds * 10 + 120, since=since)
        result.update({
            "worker_processes": processes,
            "worker_concurrency": threads or "Procfile default",
            "emulator_latency_ms": c.stripe_latency_ms,
            "emulator_rate_limit_rps": c.stripe_rate_limit,
            "stripe_max_rps": c.stripe_max_rps,
        })
        retried = self.sql(
            "SELECT count(*) FROM refunds WHERE attempts > 1 AND created_at >= %s", (since,)
        )
        result["refunds_retried"] = int(retried[0][0])
        self.result["stripe_shaped"][shape] = result
        self.stop_workers()

    def webhook_burst(self, share: list[str]) -> None:
        """Stripe's refund events arriving in a burst while Stripe is slow: the webhook
        must answer at once (it stores events that need Stripe for a worker), and
        initiation beside it must not slow down. Once per BENCH_BURST_REFUND_RATE: the
        first is ``webhook_burst`` (the targets), the others ``webhook_burst_at_<rate>``
        (``webhook_burst_saturated`` for 0).

        The targets' run has initiation arriving at a steady rate. Run as fast as its
        connections go, initiation alone takes every core (a closed loop: each answer
        sends the next request), so any other work, the burst's 400 requests a second
        included, takes cores from it and lengthens its latency by its share: that run
        measures the machine's capacity, not the burst's harm, and is reported beside."""
        c = self.config
        half = len(share) // 2
        alone_file = self.write_lines("burst-alone.txt", share[:half])
        during_file = self.write_lines("burst-during.txt", share[half:])
        made = self.sql(
            "SELECT stripe_refund_id FROM refunds WHERE stripe_refund_id IS NOT NULL LIMIT %s",
            (max(1, c.webhook_events // 4),),
        )
        if not made:
            raise BenchError("no Stripe refunds to send events about (run the drain first)")
        self.start_workers(1, None, STRIPE_MAX_RPS="100")
        try:
            # The same conditions with and without the burst: Stripe 1 s away, the worker
            # started and busy with the refunds being made (a short unmeasured run first,
            # so its start-up is in neither figure).
            self.admin.faults(latency_ms=c.webhook_stripe_latency_ms)
            for n, cores in enumerate(c.burst_cores):
                # The first arrangement is the targets'; the others, at the first rate,
                # are reported beside it as webhook_burst_<arrangement>.
                rates = c.burst_refund_rates if n == 0 else c.burst_refund_rates[:1]
                self.arrange_burst(cores)
                try:
                    for i, rate in enumerate(rates):
                        key = ("webhook_burst" if i == 0 else "webhook_burst_saturated"
                               if not rate else f"webhook_burst_at_{rate:g}")
                        key += f"_{cores}" if n else ""
                        self.result[key] = self.one_burst(rate, alone_file, during_file,
                                                          made, key)
                finally:
                    self.end_burst_arrangement()
        finally:
            self.admin.clear_faults()
            self.stop_workers()

    def arrange_burst(self, cores: str) -> None:
        """Where the burst's work runs (BENCH_BURST_CORES):

        - "shared": one server takes the API's requests and Stripe's webhooks, every
          process where the kernel puts it;
        - "weighted": the deployment README's Deploying describes: a second server from
          the Procfile's ``web`` line takes the webhooks; it and the worker (and the
          burst's load generator, Stripe's stand-in) run in a cgroup with ``cpu.idle``
          set, so they have every core initiation's side leaves idle and yield them the
          moment it wants one (or with BENCH_BURST_WEIGHT's cpu shares). Postgres and
          Redis, which both sides use, keep their priority;
        - "split": that second server, the worker, the emulator and the burst's load
          generator on the second core, the API's server on the first; Postgres, Redis
          and initiation's load generator where the kernel puts them."""
        self.burst_cores = cores
        if cores == "shared":
            return
        self.start_webhook_web()
        assert self.web is not None and self.webhook_web is not None and self.emulator is not None
        burst_side = self.webhook_web.pids() + self.worker_pids()
        if cores == "weighted":
            shares = self.config.burst_shares
            self.burst_group = CpuGroup(f"refunds-bench-burst-{os.getpid()}", shares)
            self.burst_group.add(burst_side)
            log("burst weighted: the webhook server and the worker at "
                + ("idle priority" if shares is None else f"cpu shares {shares} of 1024"))
        else:
            api, burst = self.burst_cpus
            pin(self.web.pids(), {api})
            pin(burst_side + self.emulator.pids(), {burst})
            log(f"burst on cores of its own: the API on cpu {api}; webhooks, worker and"
                f" emulator on cpu {burst}")

    def end_burst_arrangement(self) -> None:
        """Back to one server, every process on every core at its own priority."""
        if self.webhook_web is not None:
            self.stop(self.webhook_web, "web")
            self.webhook_web, self.webhook_url = None, ""
        if self.burst_group is not None:
            self.burst_group.remove()
            self.burst_group = None
        if self.burst_cores == "split":
            everywhere = os.sched_getaffinity(0)
            pin(self.web.pids() if self.web else [], everywhere)
            pin(self.emulator.pids() if self.emulator else [], everywhere)
            pin(self.worker_pids(), everywhere)
        self.burst_cores = "shared"

    def start_webhook_web(self) -> None:
        """A second server from the Procfile's ``web`` line; Stripe's endpoint routed to it."""
        port = free_port()
        metrics_dir = self.work / "metrics-webhook-web"
        metrics_dir.mkdir(exist_ok=True)
        env = {**self.env, "PORT": str(port), "PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)}
        self.webhook_web = self.start(shell_process("webhook-web", PROCFILE_WEB, env, self.work))
        self.webhook_url = f"http://127.0.0.1:{port}"
        wait_for_http(f"{self.webhook_url}/readyz", proc=self.webhook_web.proc,
                      log=self.webhook_web.log_path)

    def one_burst(self, rate: float, alone_file: str, during_file: str,
                  made: list[Any], name: str) -> dict[str, Any]:
        """``BENCH_BURST_ROUNDS`` rounds of initiation alone, then initiation during a
        burst; each side's latencies pooled over its rounds. A p99 of one 10-second run
        is its tenth-worst request of a thousand, and on a shared host a pause of the
        whole machine moves it by half (two runs of initiation alone, back to back,
        differ by that much): the rounds take the drift of the host out of the
        comparison and put more requests behind each percentile."""
        c = self.config
        # Unmeasured, both: initiation, and a second of the burst, so that neither side's
        # start-up (a server's first requests, its pool's first connections) is in a figure.
        warm = int(c.webhook_rate) or 100
        warm_events = self.write_lines(f"{name}-warm-events.txt", _refund_events(made, warm))
        self.loadgen(alone_file, c.webhook_connections, requests=warm, rate=c.webhook_rate,
                     webhook_events=warm_events)
        self.loadgen(alone_file, c.burst_refund_connections, duration=c.warmup_seconds + 1,
                     rate=rate)
        alones, durings, bursts = [], [], []
        for round_ in range(c.burst_rounds):
            events_file = self.write_lines(f"{name}-{round_}-events.txt",
                                           _refund_events(made, c.webhook_events))
            # Metered, both: the CPU each process kind and the machine used says how much
            # of the two cores the burst left to initiation.
            alones.append(self.loadgen(alone_file, c.burst_refund_connections,
                                       duration=c.seconds, rate=rate, meter=True,
                                       latencies=True))
            with ThreadPoolExecutor(1) as pool:
                burst = pool.submit(self.loadgen, alone_file, c.webhook_connections,
                                    requests=c.webhook_events, rate=c.webhook_rate,
                                    webhook_events=events_file, latencies=True)
                time.sleep(0.5)
                durings.append(self.loadgen(
                    during_file, c.burst_refund_connections, duration=c.seconds, rate=rate,
                    meter=True, latencies=True,
                    profile=f"profile-web-{name}-{round_}" if c.profile else None))
                bursts.append(burst.result())
            log(f"{name} round {round_ + 1}: initiation p99"
                f" {alones[-1]['latency_ms']['p99']} -> {durings[-1]['latency_ms']['p99']} ms,"
                f" webhook p99 {bursts[-1]['latency_ms']['p99']} ms")
        alone, during, webhooks = _pooled(alones), _pooled(durings), _pooled(bursts)
        ratio = (during["latency_ms"]["p99"] / alone["latency_ms"]["p99"]
                 if alone["latency_ms"]["p99"] else 0.0)
        log(f"{name}: webhook p99 {webhooks['latency_ms']['p99']} ms,"
            f" errors {webhooks['errors']}; initiation p99 {alone['latency_ms']['p99']} ->"
            f" {during['latency_ms']['p99']} ms; machine"
            f" {alone.get('cpu_cores', {}).get('machine')} ->"
            f" {during.get('cpu_cores', {}).get('machine')} cores busy")
        return {
            "events": c.webhook_events,
            "event_rate_per_s": c.webhook_rate,
            "webhook_connections": c.webhook_connections,
            "initiation_rate_per_s": rate or "as fast as 8 connections go",
            "emulator_latency_ms": c.webhook_stripe_latency_ms,
            "cores": self.burst_cores,
            **({"weight": c.burst_shares or "idle"} if self.burst_cores == "weighted" else {}),
            "rounds": c.burst_rounds,
            "webhooks": webhooks,
            "initiation_alone": alone,
            "initiation_during_burst": during,
            "initiation_p99_ratio": round(ratio, 2),
        }

    def hot_spot(self) -> None:
        c = self.config
        path = self.write_lines("hot.txt", [self.hot_charge])
        out = self.loadgen(path, c.hotspot_connections, duration=c.seconds, amount=1, meter=True)
        self.result["hot_spot"] = out
        log(f"hot spot @{c.hotspot_connections}: {out['requests_per_s']}/s,"
            f" p99 {out['latency_ms']['p99']} ms, errors {out['errors']}")
        # What the database work alone reaches on one payment with as many threads (the
        # baseline script on a hot payment of its own, so neither run sums the other's
        # refunds): the row lock serializes both.
        base = self.run_baseline("hot_spot_baseline", [self.hot_baseline_charge], 1,
                                 c.hotspot_connections)
        self.result["hot_spot_baseline"] = base
        log(f"hot spot baseline, {base['threads']} threads on one payment: {base['ops_per_s']}"
            f" ops/s, p99 {base['latency_ms']['p99']} ms, errors {base['errors']}")

    # ------------------------------------------------------------------ run

    def run(self) -> dict[str, Any]:
        self.setup()
        shares = self.slices()
        phases = self.config.phases
        # The baseline models its message on the tasks initiation queued.
        self.web_server_phases(shares)
        steps = {
            "baseline": lambda: self.baseline(shares["baseline"]),
            "drain": self.zero_latency_drain,
            "end_to_end": lambda: self.end_to_end(shares["e2e"]),
            "events_out": lambda: events.run(self),  # refund events out: bench/events.py
            "stripe_shaped": self.stripe_shaped,
            "webhook_burst": lambda: self.webhook_burst(shares["burst"]),
            "hot_spot": self.hot_spot,
        }
        for name, step in steps.items():
            if name in phases:
                step()
        self.summarize()
        return self.result

    def summarize(self) -> None:
        c = self.config
        for kind, proc in (("web", self.web), ("emulator", self.emulator), ("redis", self.redis)):
            self.note_peak(kind, proc)
        self.result["peak_rss_mb"] = {
            kind: {"processes": len(values), "max": _mb(max(values)), "total": _mb(sum(values))}
            for kind, values in self.peak_rss_kb.items() if values
        }
        self.result["peak_rss_mb"]["beat"] = None  # not run: it only reconciles stuck refunds
        top = str(max(c.connections))
        targets: dict[str, bool] = {}
        init = self.result.get("initiation", {}).get(top)
        base = self.result.get("baseline")
        if init is not None:
            targets[f"initiation@{top} p99 <= 50 ms"] = init["latency_ms"]["p99"] <= 50
            # The endpoint's own CPU in the web processes, per POST, at the top count.
            web_cpu = init.get("cpu_ms_per_request", {}).get("web")
            self.result["web_cpu_ms_per_post"] = web_cpu
            if web_cpu is not None:
                targets[f"web CPU per POST @{top} <= 1.0 ms"] = web_cpu <= 1.0
            targets["initiation 0 errors"] = all(
                r["errors"] == 0 for r in self.result["initiation"].values())
        if init is not None and base is not None and base["ops_per_s"]:
            ratio = init["requests_per_s"] / base["ops_per_s"]
            self.result["ratio_initiation_to_baseline"] = round(ratio, 3)
            targets[f"initiation@{top} >= 0.6 x baseline"] = ratio >= 0.6
            floor = self.result.get("http_floor", {}).get("requests_per_s", 0)
            self.result["ratio_http_floor_to_baseline"] = round(floor / base["ops_per_s"], 3)
            for server in self.result.get("web_servers", {}).values():
                server_init = server.get("initiation", {}).get(top)
                if server_init is not None:
                    server["ratio_initiation_to_baseline"] = round(
                        server_init["requests_per_s"] / base["ops_per_s"], 3)
        hot, hot_base = self.result.get("hot_spot"), self.result.get("hot_spot_baseline")
        if hot is not None and hot_base is not None and hot_base["ops_per_s"]:
            ratio = hot["requests_per_s"] / hot_base["ops_per_s"]
            self.result["ratio_hot_spot_to_baseline"] = round(ratio, 3)
            targets["hot spot >= 0.5 x its baseline (one payment, same threads)"] = ratio >= 0.5
        if "end_to_end" in self.result:
            targets["end-to-end p50 <= 100 ms"] = (
                self.result["end_to_end"]["created_to_succeeded_ms"]["p50"] <= 100)
        if "drain" in self.result:
            drain = self.result["drain"]
            targets["worker CPU per refund <= 3 ms (zero-latency drain)"] = (
                (drain["worker_cpu_ms_per_refund"] or 1e9) <= 3)
            targets["one worker process drains >= 300 refunds/s at 0 ms"] = (
                drain["steady_refunds_per_s"] >= 300 and c.workers == 1)
            targets["worker memory flat (end <= 10% point + 10%)"] = (
                drain["worker_rss_mb"]["end"] <= drain["worker_rss_mb"]["at_10pct"] * 1.10)
        for shape, run in self.result.get("stripe_shaped", {}).items():
            targets[f"Stripe-shaped ({shape} worker threads) >= 90 refunds/s, 0 429s"] = (
                run["steady_refunds_per_s"] >= 90 and run["emulator_429s"] == 0)
            targets[f"Stripe-shaped ({shape}): worker DB connections <= 10"] = (
                run["peak_worker_db_connections"] <= 10)
        burst = self.result.get("webhook_burst")
        if burst is not None:
            targets["webhook p99 <= 50 ms in a burst, Stripe 1 s away"] = (
                burst["webhooks"]["latency_ms"]["p99"] <= 50 and burst["webhooks"]["errors"] == 0)
            targets["initiation p99 during the burst within 20 %"] = (
                burst["initiation_p99_ratio"] <= 1.2)
        self.result["targets"] = targets
        self.result["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
        self.result["speed_probe_ms_at_end"] = speed_probe_ms()

    def close(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(Exception):
                self._conn.close()
        self.stop_workers()
        for proc in reversed(self.processes):
            with contextlib.suppress(Exception):
                proc.stop()
        with contextlib.suppress(Exception):
            self.db.drop()


def main() -> int:
    # Stopped from outside (a timeout, `kill`): end as with Ctrl-C, through the cleanup
    # below, or the stack's processes (each in a session of its own) would outlive it.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    config = Config.from_env()
    keep = os.environ.get("BENCH_KEEP", "") not in ("", "0") or config.profile
    (ROOT / ".bench").mkdir(exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="run-", dir=ROOT / ".bench"))
    bench = Bench(config, work)
    try:
        result = bench.run()
    except BenchError as exc:
        log(f"failed: {exc} (logs in {work})")
        return 1
    finally:
        bench.close()
    output = Path(config.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(result, indent=2)
    output.write_text(text + "\n")
    print(text)
    log(f"written to {output}; logs in {work}" if keep else f"written to {output}")
    if not keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0
