"""gunicorn settings for the web process (read by default from the working directory).

Command-line flags win over these defaults; the Procfile passes the tunables
explicitly. This file does three things a flag cannot:
- checks the settings before any worker boots, so a bad one is one line, not a
  traceback per worker;
- JSON logs for gunicorn's own logger and the app (``shared.logging``);
- prometheus_client multiprocess mode: every worker writes its metrics to
  ``PROMETHEUS_MULTIPROC_DIR`` (a fresh temporary directory unless set), and
  ``/metrics`` answers with the sum of all of them.
"""

import os
import shutil
import tempfile
from pathlib import Path

from shared.config import load_settings
from shared.logging import dict_config

settings = load_settings()

worker_class = "gthread"
workers = settings.web_concurrency
threads = settings.web_threads
timeout = 30
graceful_timeout = 20
keepalive = 5
# One control socket path per user would be shared by every gunicorn on the machine.
control_socket_disable = True
logconfig_dict = dict_config("web")
# Heartbeat files in memory, not on a container's overlay disk (gunicorn's advice).
if Path("/dev/shm").is_dir():  # noqa: S108 - only gunicorn's own heartbeat files
    worker_tmp_dir = "/dev/shm"  # noqa: S108

_owned_metrics_dir = None
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    _owned_metrics_dir = tempfile.mkdtemp(prefix="refunds-web-metrics-")
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = _owned_metrics_dir


def on_starting(server):
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
