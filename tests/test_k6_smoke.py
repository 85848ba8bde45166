"""Each k6 load test, a few users for a few seconds, against real platform processes: the
scripts run, and the platform passes their checks (nothing lost, every storm delivery
ended). Their speed is measured by `make k6`, not here."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from tests.platform import API_KEY, ROOT

pytestmark = pytest.mark.slow


def _runner():
    sys.path.insert(0, str(ROOT / "scripts" / "k6"))
    spec = importlib.util.spec_from_file_location("k6_run", ROOT / "scripts" / "k6" / "run.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


run = _runner()


@pytest.fixture(scope="module")
def base_url(platform):
    port, _ = platform.gateway(workers=2)
    platform.consumer_worker()
    platform.delivery_worker(concurrency=2)
    platform.channels_worker(concurrency=4)
    platform.beat()
    return f"http://127.0.0.1:{port}"


@pytest.mark.parametrize("name", run.SCRIPTS)
def test_k6_script_passes_its_thresholds_in_a_short_run(base_url, name):
    passed, summary, output = run.run_script(name, base_url, API_KEY, run.SMOKE[name])
    assert passed, output[-3000:]
    figures = dict(run.figures(name, summary))
    if name == "reconnect-chaos":
        assert figures["posted"] == run.SMOKE[name]["NOTIFICATIONS"]
        assert figures["lost"] == 0
    if name == "retry-storm":
        storm = run.SMOKE[name]["STORM_POSTS"] * run.SMOKE[name]["RECIPIENTS"]
        assert figures["delivered"] + figures["dead-lettered"] == storm
        assert figures["dead-lettered"] > 0
        assert summary["receiver_answers"].get(500, 0) > 0  # the storm did retry
