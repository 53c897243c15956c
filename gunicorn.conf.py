"""gunicorn settings for the web process (read by default from the working directory).

Command-line flags win over these defaults; the Procfile passes the tunables
explicitly. This file does what a flag cannot:
- checks the settings before any worker boots, so a bad one is one line, not a
  traceback per worker;
- JSON logs for gunicorn's own logger and the app (``shared.adapters.logging``);
- prometheus_client multiprocess mode: every worker writes its metrics to
  ``PROMETHEUS_MULTIPROC_DIR`` (a fresh temporary directory unless set), and
  ``/metrics`` answers with the sum of all of them.
- requests gunicorn refuses itself (a malformed request, a URL or headers over its
  limits) are answered as JSON errors like every other (SPEC 3), not as HTML pages.
"""

import json
import logging
import os
import shutil
import tempfile
import uuid
from pathlib import Path

from gunicorn import glogging, util

from shared.adapters.config import load_settings
from shared.adapters.logging import dict_config

settings = load_settings()

# Requests as greenlets: a request waiting on Postgres (a hot payment's row lock, a slow
# statement) holds no thread, so a process goes on serving the others, and Postgres sees
# at most WEB_DB_CONNECTIONS per pool whatever the number of clients. make bench puts it
# level with gthread's 4 threads on CPU and throughput, behind it on p99 (README,
# Performance). gevent patches the standard library in each worker before the app is
# loaded; psycopg and redis-py then wait on the hub like any socket.
worker_class = "gevent"
workers = settings.web_concurrency
worker_connections = settings.web_connections
timeout = 30
graceful_timeout = 20
keepalive = 5
# A listening socket per worker (SO_REUSEPORT): the kernel spreads new connections over
# the workers. With one shared socket, keep-alive clients piled onto whichever worker won
# the accept race (8 connections: often 8/0 or 7/1), and that one process, held to one
# core by the GIL, served them all while the other idled (make bench: 8 connections no
# faster than 1). Side effect: a second server started on the same port by the same user
# shares it instead of failing to bind.
reuse_port = True
# One control socket path per user would be shared by every gunicorn on the machine.
control_socket_disable = True
logconfig_dict = dict_config("web")


class AppWritesTheAccessLog(glogging.Logger):
    """No gunicorn access line: the app writes a richer one per request
    (api/metrics.py). With ``logconfig_dict`` set, gunicorn would otherwise build every
    line's fields and hand them to a logger that drops them (2 % of a POST's CPU)."""

    def access(self, resp, req, environ, request_time):
        pass


logger_class = AppWritesTheAccessLog
# Heartbeat files in memory, not on a container's overlay disk (gunicorn's advice).
if Path("/dev/shm").is_dir():  # noqa: S108 - only gunicorn's own heartbeat files
    worker_tmp_dir = "/dev/shm"  # noqa: S108

_owned_metrics_dir = None
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    _owned_metrics_dir = tempfile.mkdtemp(prefix="refunds-web-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = _owned_metrics_dir


# Answers gunicorn writes before the app sees the request. The message never repeats
# what was sent (gunicorn's own page quotes the request line).
EDGE_ERRORS = {
    400: ("bad_request", "The request is not valid HTTP."),
    403: ("forbidden", "The request is not allowed."),
    414: ("uri_too_long", "The request URL is too long."),
    417: ("expectation_failed", "The Expect header cannot be met."),
    431: ("headers_too_large", "The request headers are too large or too many."),
}
# gunicorn answers an unknown Transfer-Encoding with 501; it is the client's malformed
# request, so it gets the same 400 as any other request that is not valid HTTP.
CLIENT_FAULTS_AS_400 = {501}


def write_json_error(sock, status_int, reason, mesg):
    if status_int in CLIENT_FAULTS_AS_400:
        status_int, reason = 400, "Bad Request"
    code, message = EDGE_ERRORS.get(status_int, ("internal_error", "Something went wrong."))
    body = json.dumps({"error": code, "message": message}).encode()
    head = (
        f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        f"X-Request-Id: {uuid.uuid4().hex}\r\n\r\n"
    )
    util.write_nonblock(sock, head.encode("latin-1") + body)


# Workers call util.write_error at request time, so this reaches every forked worker.
util.write_error = write_json_error


class ListeningAddress(logging.Filter):
    """Puts the bound addresses back into gunicorn's "Listening at:" line.

    With ``reuse_port`` each worker binds its own socket and the arbiter holds none, so
    gunicorn's line names no address; operators and scripts read the port from it."""

    def __init__(self, bind: list[str]) -> None:
        super().__init__()
        self.addresses = ",".join(
            address if address.startswith(("unix:", "fd://")) else f"http://{address}"
            for address in bind
        )

    def filter(self, record: logging.LogRecord) -> bool:
        if (
            isinstance(record.msg, str)
            and record.msg.startswith("Listening at:")
            and record.args
            and not record.args[0]
        ):
            record.args = (self.addresses, *record.args[1:])
        return True


def on_starting(server):
    logging.getLogger("gunicorn.error").addFilter(ListeningAddress(server.cfg.bind))
    # Values left by a previous run would be added to this one's.
    path = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):
        stale.unlink()


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)


def on_exit(server):
    if _owned_metrics_dir:
        shutil.rmtree(_owned_metrics_dir, ignore_errors=True)
