"""``make run``: the whole service on this machine, the way production runs it.

1. Checks Postgres and Redis (one line naming what is down and how to start it).
2. Creates the database if missing and runs the Procfile's ``release`` line.
3. Starts the Procfile's web, worker, beat and flower with honcho, plus the Stripe
   emulator, all under one honcho (``.run/Procfile.dev`` is the Procfile plus the
   emulator's line).
4. Seeds demo payments in the emulator, runs ``refunds payments sync``, and prints
   the API URL, a ready-to-paste curl with a dev token, and Flower's URL and login.

Ctrl-C stops everything. Ports and logins come from the environment (see the
defaults below); a ``.env`` file in the project root is read by honcho.
"""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from cli.procfile import procfile_lines

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
RUN_DIR = ROOT / ".run"
STACK = ("web", "worker", "beat", "flower")
DEMO_PAYMENTS = 3
DEMO_AMOUNT = 5000
START_TIMEOUT = 90.0

DEFAULTS = {
    "PORT": "8000",
    "FLOWER_PORT": "5555",
    "EMULATOR_PORT": "12111",
    "WORKER_METRICS_PORT": "9808",
    "FLOWER_BASIC_AUTH": "admin:admin",
    "LOG_LEVEL": "INFO",
}


class StackError(Exception):
    """Something the developer has to fix; its message is the one line printed."""


def main() -> int:
    # Ctrl-C and SIGTERM both mean "stop everything", even where SIGINT was inherited ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    env = _environment()
    os.environ.update(env)
    try:
        _check_services(env)
        _check_ports(env)
        _ensure_database()
        _release(env)
        procfile = _write_dev_procfile(env)
    except StackError as exc:
        print(f"make run: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("make run: interrupted before the stack started", file=sys.stderr)
        return 1
    return _run(procfile, env)


# --------------------------------------------------------------------------- preparation


def _environment() -> dict[str, str]:
    env = dict(os.environ)
    for name, value in DEFAULTS.items():
        env.setdefault(name, value)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    env["EMULATOR"] = "0" if env.get("STRIPE_API_BASE") else "1"
    env.setdefault("STRIPE_API_BASE", f"http://127.0.0.1:{env['EMULATOR_PORT']}")
    env.setdefault("FLOWER_URL", f"http://127.0.0.1:{env['FLOWER_PORT']}")  # console links
    return env


def _check_services(env: dict[str, str]) -> None:
    from shared.adapters.config import load_settings

    settings = load_settings()
    env.setdefault("STRIPE_WEBHOOK_SECRET", settings.stripe_webhook_secret)
    _check_postgres(settings.sqlalchemy_url)
    _check_redis(settings.redis_url)
    if settings.broker_url != settings.redis_url:
        _check_broker(settings.broker_url)


def _server_url(database_url: str) -> tuple[str, str, str]:
    """(maintenance URL, database name, host:port) for a database URL."""
    from sqlalchemy.engine import make_url

    url = make_url(database_url)
    where = f"{url.host or 'localhost'}:{url.port or 5432}"
    maintenance = url.set(database="postgres").render_as_string(hide_password=False)
    return maintenance, url.database or "", where


def _check_postgres(database_url: str) -> None:
    import psycopg

    maintenance, _, where = _server_url(database_url)
    dsn = maintenance.replace("postgresql+psycopg://", "postgresql://", 1)
    try:
        psycopg.connect(dsn, connect_timeout=3).close()
    except psycopg.OperationalError as exc:
        reason = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
        raise StackError(
            f"Postgres is not reachable at {where} ({reason}); start it "
            "(e.g. `sudo service postgresql start`) or set DATABASE_URL"
        ) from exc


def _check_redis(redis_url: str) -> None:
    import redis

    client = redis.Redis.from_url(redis_url, socket_connect_timeout=2, socket_timeout=2)
    pool_kwargs = client.connection_pool.connection_kwargs
    where = f"{pool_kwargs.get('host', 'localhost')}:{pool_kwargs.get('port', 6379)}"
    try:
        client.ping()
    except redis.RedisError as exc:
        raise StackError(
            f"Redis is not reachable at {where} ({type(exc).__name__}); start it "
            "(e.g. `redis-server --daemonize yes` or `sudo service redis-server start`) "
            "or set REDIS_URL"
        ) from exc
    finally:
        client.close()


def _check_broker(broker_url: str) -> None:
    from kombu import Connection

    try:
        with Connection(broker_url, connect_timeout=3) as conn:
            conn.ensure_connection(max_retries=1, timeout=3)
    except Exception as exc:
        where = Connection(broker_url).as_uri()  # password masked
        raise StackError(
            f"the Celery broker is not reachable at {where} ({type(exc).__name__}); "
            "start it (e.g. `sudo service rabbitmq-server start`) or unset CELERY_BROKER_URL"
        ) from exc


def _check_ports(env: dict[str, str]) -> None:
    names = ["PORT", "FLOWER_PORT", "WORKER_METRICS_PORT"]
    if env["EMULATOR"] == "1":
        names.append("EMULATOR_PORT")
    for name in names:
        port = env[name]
        if not port.isdigit():
            raise StackError(f"{name} must be a port number, got {port!r}")
        with socket.socket() as s:
            s.settimeout(0.5)
            if s.connect_ex(("127.0.0.1", int(port))) == 0:
                raise StackError(f"port {port} ({name}) is taken; stop what holds it or set {name}")


def _ensure_database() -> None:
    from sqlalchemy import create_engine, text

    from shared.adapters.config import get_settings

    maintenance, name, _ = _server_url(get_settings().sqlalchemy_url)
    engine = create_engine(maintenance, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            query = text("SELECT 1 FROM pg_database WHERE datname = :n")
            exists = conn.execute(query, {"n": name}).first()
            if not exists:
                quoted = '"' + name.replace('"', '""') + '"'
                conn.execute(text(f"CREATE DATABASE {quoted}"))
                print(f"make run: created database {name}", flush=True)
    finally:
        engine.dispose()


def _release(env: dict[str, str]) -> None:
    command = procfile_lines()["release"]
    result = subprocess.run(["/bin/sh", "-c", command], env=env, cwd=ROOT, check=False)  # noqa: S603
    if result.returncode != 0:
        raise StackError(f"the release step ({command}) failed with exit code {result.returncode}")


def _write_dev_procfile(env: dict[str, str]) -> Path:
    lines = procfile_lines()
    out = [f"{name}: {lines[name]}" for name in STACK]
    if env["EMULATOR"] == "1":
        webhook = f"http://127.0.0.1:{env['PORT']}/v1/webhooks/stripe"
        out.append(
            f"emulator: exec refunds stripe-emulator --port {env['EMULATOR_PORT']} "
            f'--webhook-url {webhook} --webhook-secret "$STRIPE_WEBHOOK_SECRET"'
        )
    RUN_DIR.mkdir(exist_ok=True)
    path = RUN_DIR / "Procfile.dev"
    path.write_text("\n".join(out) + "\n")
    return path


# --------------------------------------------------------------------------- running


def _run(procfile: Path, env: dict[str, str]) -> int:
    # honcho gives the first process PORT itself, so web comes first.
    names = [*STACK, "emulator"] if env["EMULATOR"] == "1" else list(STACK)
    argv = [str(BIN / "honcho"), "start", "-f", str(procfile), "-d", str(ROOT), *names]
    honcho = subprocess.Popen(argv, env=env, cwd=ROOT)  # noqa: S603
    try:
        try:
            banner = _prepare(env, honcho)
        except StackError as exc:
            print(f"make run: {exc}", file=sys.stderr, flush=True)
            _stop(honcho)
            return 1
        print(banner, flush=True)
        return _wait(honcho)
    except KeyboardInterrupt:
        _stop(honcho)
        print("make run: stopped", flush=True)
        return 0


def _prepare(env: dict[str, str], honcho: subprocess.Popen[bytes]) -> str:
    web = f"http://127.0.0.1:{env['PORT']}"
    charge = None
    if env["EMULATOR"] == "1":
        emulator = env["STRIPE_API_BASE"]
        _wait_for(f"{emulator}/_emulator/config", honcho, "the Stripe emulator")
        demo = {"count": DEMO_PAYMENTS, "amount": DEMO_AMOUNT}
        seeded = httpx.post(f"{emulator}/_emulator/seed", json=demo, timeout=10).json()
        charge = seeded["charges"][0]
    sync = _cli(env, "payments", "sync")
    print(f"make run: refunds payments sync: {sync}", flush=True)
    _wait_for(f"{web}/readyz", honcho, "the web process", ok_only=True)
    _wait_for(f"http://127.0.0.1:{env['FLOWER_PORT']}/healthcheck", honcho, "Flower")
    token = _cli(env, "token", "--ttl", "43200")
    return _banner(env, web, token, charge)


def _banner(env: dict[str, str], web: str, token: str, charge: str | None) -> str:
    user, _, password = env["FLOWER_BASIC_AUTH"].split(",")[0].partition(":")
    body = shlex.quote(f'{{"charge_id": "{charge or "ch_..."}", "amount_cents": 500}}')
    auth = '"Authorization: Bearer $TOKEN"'
    lines = [
        "",
        "=" * 72,
        "Refund service is running.",
        f"  API:      {web}   (OpenAPI {web}/openapi.json, console {web}/console)",
        "  Refund a demo payment (a dev token, valid 12 h):",
        f"    export TOKEN={shlex.quote(token)}",
        f"    curl -s -X POST {web}/v1/admin/refunds -H {auth} \\",
        f"      -H 'Content-Type: application/json' -d {body}",
        "  Then follow it:",
        f"    curl -s {web}/v1/admin/refunds -H {auth}",
        f"  Flower:   http://127.0.0.1:{env['FLOWER_PORT']}   (login {user} / {password})",
        f"  Metrics:  {web}/metrics  and the worker's http://127.0.0.1:{env['WORKER_METRICS_PORT']}/metrics",
    ]
    if env["EMULATOR"] == "1":
        lines.append(f"  Stripe:   emulator at {env['STRIPE_API_BASE']}")
    lines += ["Ctrl-C stops everything.", "=" * 72, ""]
    return "\n".join(lines)


def _cli(env: dict[str, str], *args: str) -> str:
    argv = [str(BIN / "refunds"), *args]
    result = subprocess.run(argv, env=env, cwd=ROOT, capture_output=True, text=True, check=False)  # noqa: S603
    if result.returncode != 0:
        last = (result.stderr.strip().splitlines() or ["no output"])[-1]
        raise StackError(f"`refunds {' '.join(args)}` failed: {last}")
    return result.stdout.strip()


def _wait_for(
    url: str, honcho: subprocess.Popen[bytes], what: str, *, ok_only: bool = False
) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    last = "no answer"
    while time.monotonic() < deadline:
        if honcho.poll() is not None:
            raise StackError(f"the stack stopped before {what} was up (see the lines above)")
        try:
            response = httpx.get(url, timeout=2)
            if not ok_only or response.status_code == 200:
                return
            last = f"{response.status_code} {response.text[:200]}"
        except httpx.TransportError as exc:
            last = type(exc).__name__
        time.sleep(0.2)
    raise StackError(f"{what} did not come up within {START_TIMEOUT:g}s ({last})")


def _wait(honcho: subprocess.Popen[bytes]) -> int:
    code = honcho.wait()
    print(f"make run: the stack stopped (honcho exit code {code}; see the lines above)", flush=True)
    return code or 1


def _stop(honcho: subprocess.Popen[bytes]) -> None:
    """Let honcho stop its processes (SIGTERM, then SIGKILL after 5 s) and wait for it."""
    if honcho.poll() is None:
        honcho.send_signal(signal.SIGINT)
    while True:
        try:
            honcho.wait(30)
            return
        except KeyboardInterrupt:  # a second Ctrl-C while stopping: keep waiting
            continue
        except subprocess.TimeoutExpired:
            honcho.kill()
            honcho.wait()
            return


if __name__ == "__main__":
    sys.exit(main())
