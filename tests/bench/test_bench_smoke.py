"""``make bench`` end to end with tiny numbers, so the harness cannot rot.

It checks that every figure is there and that nothing failed; it never checks a
speed: figures from a shared test machine mean nothing, and ``make test`` must stay
deterministic.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PG_ADMIN_URL
from tests.support import ROOT

TINY = {
    "BENCH_PAYMENTS": "3000",  # each of the three web servers initiates on payments of its own
    "BENCH_SECONDS": "2.5",  # over 2 s, so that CPU is metered (a second of it)
    "BENCH_WARMUP_SECONDS": "0.5",
    "BENCH_CONNECTIONS": "1,8,32",
    "BENCH_DRAIN_REFUNDS": "300",
    "BENCH_E2E_SAMPLES": "5",
    "BENCH_STRIPE_SECONDS": "1",
    "BENCH_WORKER_CONCURRENCY": "4",  # few Postgres connections: other suites share the server
    "BENCH_STRIPE_WORKERS": "1x4,2x2",
    "BENCH_EVENTS_REFUNDS": "100",
    "BENCH_WEBHOOK_EVENTS": "100",
    "BENCH_WEBHOOK_RATE": "200",
    "BENCH_BURST_ROUNDS": "2",  # pooled over rounds
}


def run_bench(tmp_path: Path, **settings: str) -> dict[str, Any]:
    """``make bench`` with TINY and ``settings``: what it printed, checked against the file
    it wrote."""
    output = tmp_path / "bench.json"
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("BENCH_")},
        **TINY,
        **settings,
        "BENCH_OUTPUT": str(output),
        "BENCH_PG_ADMIN_URL": PG_ADMIN_URL,
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "bench"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, text=True,
    )
    try:
        stdout, stderr = proc.communicate(timeout=420)
    except subprocess.TimeoutExpired:
        proc.terminate()  # the bench stops its stack and drops its database on SIGTERM
        stdout, stderr = proc.communicate(timeout=60)
        pytest.fail(f"make bench took more than 420 s: {stderr[-4000:]}")
    assert proc.returncode == 0, stderr[-4000:]
    printed: dict[str, Any] = json.loads(stdout)
    assert json.loads(output.read_text()) == printed
    return printed


def test_bench_prints_every_figure_and_no_request_fails(tmp_path: Path) -> None:
    printed = run_bench(tmp_path)

    assert {"cores", "ram_gb", "cpu_model"} <= printed["machine"].keys()
    assert printed["seed"]["payments"] == 3000
    for connections in ("1", "8", "32"):
        phase = printed["initiation"][connections]
        assert phase["connections"] == int(connections)
        assert phase["ok"] > 0 and phase["errors"] == 0, phase["statuses"]
        assert {"p50", "p99"} <= phase["latency_ms"].keys()
        assert {"requests_per_s", "loadgen_cpu_cores"} <= phase.keys()

    keyed = printed["initiation_with_idempotency_key"]
    assert keyed["ok"] > 0 and keyed["errors"] == 0, keyed["statuses"]

    floor = printed["http_floor"]
    assert floor["ok"] > 0 and floor["errors"] == 0, floor["statuses"]
    assert printed["ratio_http_floor_to_baseline"] > 0
    assert printed["web_cpu_ms_per_post"] > 0

    # Each web server measured in the same run, keyed by server; the Procfile's on top.
    assert printed["web_servers"].keys() == {"gunicorn", "gunicorn-gthread", "granian"}
    assert printed["web_server"] == "gunicorn"
    for server in printed["web_servers"].values():
        top = server["initiation"]["32"]
        assert top["ok"] > 0 and top["errors"] == 0, top["statuses"]
        assert top["cpu_ms_per_request"]["web"] > 0
        assert server["http_floor"]["ok"] > 0 and server["http_floor"]["errors"] == 0
        assert server["ratio_initiation_to_baseline"] > 0
    assert printed["initiation"] == printed["web_servers"]["gunicorn"]["initiation"]

    baseline = printed["baseline"]
    assert baseline["ops"] > 0 and baseline["errors"] == 0
    assert printed["ratio_initiation_to_baseline"] > 0

    drains = [printed["drain"], *printed["stripe_shaped"].values()]
    assert printed["stripe_shaped"].keys() == {"1x4", "2x2"}
    for drain in drains:
        assert drain["left_pending"] == 0 and not drain.get("incomplete"), drain
        assert drain["statuses"].keys() == {"succeeded"}, drain["statuses"]
        assert drain["duplicate_stripe_refunds"] == 0
        assert drain["stripe_refunds_created"] == drain["refunds"]
        assert {"refunds_per_s", "steady_refunds_per_s", "emulator_429s"} <= drain.keys()
        assert {"start", "end", "max"} <= drain["worker_rss_mb"].keys()
        assert drain["worker_cpu_ms_per_refund"] > 0
        assert 0 < drain["peak_worker_db_connections"] <= 10

    e2e = printed["end_to_end"]
    assert e2e["samples"] == 5 and e2e["statuses"] == {"succeeded": 5}
    assert {"p50", "p99"} <= e2e["created_to_succeeded_ms"].keys()

    hot = printed["hot_spot"]
    assert hot["ok"] > 0 and hot["errors"] == 0, hot["statuses"]
    hot_baseline = printed["hot_spot_baseline"]
    assert hot_baseline["ops"] > 0 and hot_baseline["errors"] == 0
    assert printed["ratio_hot_spot_to_baseline"] > 0

    assert {"web", "worker", "emulator"} <= printed["peak_rss_mb"].keys()
    assert printed["targets"] and all(isinstance(v, bool) for v in printed["targets"].values())

    # The targets' arrangement (BENCH_BURST_CORES' first) at both rates, the other at the first.
    for name in ("webhook_burst", "webhook_burst_saturated", "webhook_burst_shared"):
        burst = printed[name]
        assert burst["webhooks"]["ok"] == 200 and burst["webhooks"]["errors"] == 0  # 2 rounds
        assert burst["initiation_during_burst"]["errors"] == 0
        assert burst["initiation_p99_ratio"] > 0
        for run in ("initiation_alone", "initiation_during_burst"):  # the cores each left
            assert len(burst[run]["p99_by_run"]) == 2
            assert "latencies_s" not in burst[run]
            assert burst[run]["cpu_cores"]["machine"] > 0
            assert burst[run]["cpu_cores"]["web"] > 0
    assert printed["webhook_burst"]["initiation_rate_per_s"] == 100
    assert printed["webhook_burst"]["cores"] == "weighted"
    assert printed["webhook_burst"]["weight"] == "idle"  # BENCH_BURST_WEIGHT's default
    assert "webhook_burst_saturated_shared" not in printed
    shared = printed["webhook_burst_shared"]
    assert shared["cores"] == "shared"  # one server took both
    assert "webhook_web" not in shared["initiation_during_burst"]["cpu_cores"]
    assert not _bench_cgroups()


def _bench_cgroups() -> list[Path]:
    """The weighted burst's cgroups left behind (it removes its own at the end)."""
    return [*Path("/sys/fs/cgroup").glob("refunds-bench-burst-*"),
            *Path("/sys/fs/cgroup/cpu").glob("refunds-bench-burst-*")]


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="the split needs two cores")
@pytest.mark.parametrize(("cores", "weight"), [("split", None), ("weighted", "64")])
def test_the_burst_arranged_apart_goes_to_a_server_of_its_own(
    tmp_path: Path, cores: str, weight: str | None,
) -> None:
    # Events for 3 s at 200/s: the burst is still on while the CPU is metered.
    settings = {"BENCH_BURST_WEIGHT": weight} if weight else {}
    printed = run_bench(tmp_path, BENCH_PHASES="drain,webhook_burst", BENCH_WEBHOOK_EVENTS="600",
                        BENCH_BURST_CORES=cores, BENCH_BURST_REFUND_RATE="100",
                        BENCH_BURST_ROUNDS="1", **settings)
    burst = printed["webhook_burst"]
    assert burst["cores"] == cores
    assert burst.get("weight") == (int(weight) if weight else None)
    assert burst["webhooks"]["ok"] == 600 and burst["webhooks"]["errors"] == 0
    assert burst["initiation_during_burst"]["errors"] == 0
    during = burst["initiation_during_burst"]["cpu_cores"]
    # The webhooks were served by the second server, initiation by the API's.
    assert during["webhook_web"] > 0 and during["web"] > 0
    assert "webhook_burst_saturated" not in printed
    assert not _bench_cgroups()
