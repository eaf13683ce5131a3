"""Pictures for people (`make screenshots`): run a tiny comparison on the local stack, open the MLflow run
comparison and the Prefect flow-run page in headless Chromium, check that the strategy names and the test
accuracy are visible, and save PNGs under docs/img/.

Needs Debian's `chromium` and the `playwright` Python package (the Makefile target installs both); the
browser is Debian's, never one downloaded by playwright.
"""

from __future__ import annotations

import json
import sys
import urllib.parse
from pathlib import Path

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
         "--no-first-run", "--disable-component-update", "--disable-sync"]
OUT = Path("docs/img")
STRATEGIES = ["replace-fc", "mlp", "replace-fc+linear-probe"]


def main() -> int:
    from mlflow.tracking import MlflowClient
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    from flows.cli import run_compare, up
    from infra.settings import load_settings

    up(None)
    settings = load_settings()
    result = run_compare(settings, {"strategies": STRATEGIES, "seeds": 1, "classes": "0-2", "limit": 90,
                                    "test_limit": 60, "image_size": 32, "epochs": 2, "batch_size": 16,
                                    "workers": 1, "cpus_per_worker": 1})
    uri = settings.mlflow_tracking_uri
    assert uri and settings.prefect_api_url
    client = MlflowClient(uri)
    parent = client.get_run(result.parent_run_id)
    experiment = parent.info.experiment_id
    runs = urllib.parse.quote(json.dumps(result.children))
    compare_url = f"{uri}/#/compare-runs?runs={runs}&experiments={urllib.parse.quote(json.dumps([experiment]))}"
    flow_run_id = parent.data.tags["prefect.flow_run_id"]
    prefect_ui = settings.prefect_api_url.removesuffix("/api")
    pages = [
        ("mlflow-compare.png", compare_url, [*STRATEGIES, "test_accuracy"]),
        ("mlflow-parent-run.png", f"{uri}/#/experiments/{experiment}/runs/{parent.info.run_id}",
         ["winner", "headbench.kind"]),
        ("prefect-flow-run.png", f"{prefect_ui}/runs/flow-run/{flow_run_id}", ["compare-heads", "fit-strategy"]),
    ]
    OUT.mkdir(parents=True, exist_ok=True)
    failures = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1000})
        for name, url, expected in pages:
            page.goto(url, wait_until="domcontentloaded", timeout=60_000)
            try:  # single-page apps render after loading: wait until every expected word is on screen
                page.wait_for_function("words => words.every(w => document.body.innerText.includes(w))",
                                       arg=expected, timeout=45_000)
            except PlaywrightTimeout:
                pass
            page.wait_for_timeout(1500)
            text = page.inner_text("body")
            missing = [word for word in expected if word not in text]
            page.screenshot(path=str(OUT / name), full_page=False)
            print(f"{OUT / name}: {url}" + (f"  MISSING {missing}" if missing else "  ok"))
            if missing:
                failures.append((name, missing))
        browser.close()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
