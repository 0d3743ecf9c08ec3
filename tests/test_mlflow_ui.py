"""The MLflow UI in a real headless Chromium shows the shared sweep: nested runs, params, charts.

Needs Debian's chromium (apt-get install chromium) and playwright's Python package
(pip install 'grpo-lab[browser]'); no browser is downloaded. Skipped, with the reason, without them,
unless GRPO_LAB_REQUIRE_BROWSER=1 (set by .ci/run once chromium is installed): then it fails, so
CI cannot pass with the browser test silently skipped.
The screenshots land in the test's temporary folder (printed on failure).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("GRPO_LAB_CHROMIUM", "/usr/bin/chromium")
ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]

pytestmark = [pytest.mark.slow, pytest.mark.browser]


def skip_or_fail(reason: str) -> None:
    """Skip where the browser is optional (a developer's machine); fail where CI requires it."""
    if os.environ.get("GRPO_LAB_REQUIRE_BROWSER") == "1":
        pytest.fail(f"GRPO_LAB_REQUIRE_BROWSER=1 but {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).is_file():
        skip_or_fail(
            f"no Chromium at {CHROMIUM}: apt-get install chromium (or set GRPO_LAB_CHROMIUM)"
        )
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        skip_or_fail(
            "playwright is not installed: pip install 'grpo-lab[browser]' (no browser download needed)"
        )
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_ui(grid_sweep):
    port = free_port()
    mlflow = shutil.which("mlflow", path=str(Path(sys.executable).parent)) or "mlflow"
    log = open(grid_sweep.cwd / "mlflow-ui.log", "w")  # noqa: SIM115 (closed after the server stops)
    proc = subprocess.Popen(
        [
            mlflow,
            "ui",
            "--backend-store-uri",
            grid_sweep.tracking_uri,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
        ],
        cwd=grid_sweep.cwd,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 90
        while True:
            try:
                if urllib.request.urlopen(f"{base}/health", timeout=2).read() == b"OK":
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.time() > deadline:
                raise AssertionError(
                    f"mlflow ui did not come up: {(grid_sweep.cwd / 'mlflow-ui.log').read_text()[-3000:]}"
                )
            time.sleep(0.5)
        yield base
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()


def test_runs_table_shows_the_nested_sweep_its_params_and_charts(
    browser, mlflow_ui, grid_sweep, tmp_path
):
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=grid_sweep.tracking_uri)
    exp = client.get_experiment_by_name("grpo_lab")
    assert exp.tags.get("mlflow.experimentKind") == "custom_model_development"
    parent = client.search_runs([exp.experiment_id], "tags.`grpo_lab.role` = 'sweep'")[0]
    page = browser.new_page(viewport={"width": 1600, "height": 1000})
    try:
        page.goto(
            f"{mlflow_ui}/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning"
        )
        row = page.locator("[role=row]", has_text=parent.info.run_name).first
        row.wait_for(timeout=60_000)
        # the sweep is one collapsed parent row; expanding it shows its four jobs
        row.locator("button[data-component-id*='runnamecellrenderer']").click()
        for name in ("G=2 eps=0.1", "G=2 eps=0.2", "G=4 eps=0.1", "G=4 eps=0.2"):
            page.locator("[role=row]", has_text=name).first.wait_for(timeout=20_000)
        page.screenshot(path=str(tmp_path / "runs_table.png"))

        # chart view: one chart per logged metric, with a line per run
        page.locator("label:has(input[name=runs-view-mode][value=CHART])").click()
        page.get_by_placeholder("Search metric charts").fill("eval/accuracy")
        page.locator(".js-plotly-plot").first.wait_for(timeout=30_000)
        # Plotly draws the lines after the chart frame appears: wait for one line per job.
        traces = ".js-plotly-plot .scatterlayer .trace"
        page.wait_for_function(f"document.querySelectorAll({traces!r}).length >= 4", timeout=30_000)
        assert page.locator(traces).count() >= 4
        page.screenshot(path=str(tmp_path / "charts.png"))

        # a job's own page lists its parameters
        job = client.search_runs([exp.experiment_id], "attributes.run_name = 'G=4 eps=0.2'")[0]
        page.goto(f"{mlflow_ui}/#/experiments/{exp.experiment_id}/runs/{job.info.run_id}")
        page.get_by_text("Parameters", exact=False).first.wait_for(timeout=30_000)
        params = page.get_by_placeholder("Search parameters")
        params.fill("epsilon")
        page.get_by_role("cell", name="epsilon", exact=True).first.wait_for(timeout=20_000)
        assert page.get_by_role("cell", name="0.2", exact=True).count() >= 1
        page.screenshot(path=str(tmp_path / "run_params.png"))
    except Exception:
        page.screenshot(path=str(tmp_path / "failure.png"))
        print(f"screenshots in {tmp_path}")
        raise
    finally:
        page.close()
    for shot in ("runs_table.png", "charts.png", "run_params.png"):
        assert (tmp_path / shot).stat().st_size > 10_000
