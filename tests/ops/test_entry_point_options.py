"""Entry points take their programs' own options and say where they listen (SPEC 9).

Both tests failed before the fix: ``refunds flower --port N`` stopped with
"unrecognized arguments", and gunicorn's "Listening at:" line named no address.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from tests.support import BIN, ServiceProcess, free_port, wait_for_http


def test_refunds_flower_passes_flowers_own_options_through(
    service_env: dict[str, str], log_dir: Path
) -> None:
    port = free_port()
    env = {**service_env, "FLOWER_PORT": str(free_port())}  # the option must win
    argv = [str(BIN / "refunds"), "flower", "--port", str(port), "--address", "127.0.0.1"]
    with ServiceProcess("flower-options", argv, env, log_dir) as flower:
        wait_for_http(f"http://127.0.0.1:{port}/healthcheck", timeout=30, proc=flower.proc)
        answer = httpx.get(f"http://127.0.0.1:{port}/", timeout=5)
        assert answer.status_code == 401  # still behind FLOWER_BASIC_AUTH
        assert "unrecognized arguments" not in flower.log()


def test_other_commands_still_refuse_unknown_options(service_env: dict[str, str]) -> None:
    import subprocess

    result = subprocess.run(
        [str(BIN / "refunds"), "check-config", "--port", "5556"],
        env=service_env, capture_output=True, text=True, timeout=60, check=False,
    )
    assert result.returncode == 2 and "unrecognized arguments: --port 5556" in result.stderr


def test_gunicorns_listening_line_names_the_address_in_the_json_logs(
    service_env: dict[str, str], log_dir: Path
) -> None:
    port = free_port()
    argv = [
        str(BIN / "gunicorn"), "api.wsgi:app", "--config", "gunicorn.conf.py",
        "--bind", f"127.0.0.1:{port}", "--workers", "1",
    ]
    with ServiceProcess("web-listening", argv, service_env, log_dir) as web:
        wait_for_http(f"http://127.0.0.1:{port}/healthz", proc=web.proc)
        lines = [json.loads(line) for line in web.log().splitlines() if line.startswith("{")]
    listening = [ln["message"] for ln in lines if ln["message"].startswith("Listening at:")]
    assert listening and listening[0].startswith(f"Listening at: http://127.0.0.1:{port} ("), (
        listening
    )
