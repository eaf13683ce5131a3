"""Pictures for people (`make screenshots`): run a tiny comparison on the local stack, open the MLflow run
comparison and the Prefect flow-run page in headless Chromium (logged in to the Prefect UI with the stack's
auth string, as a person types it into the login box), check that the strategy names and the test
accuracy are visible, and save PNGs under docs/img/. Then do what a person does in the dashboard: open
`retrain/scheduled` -> Custom run, change a field of the typed form, Submit, and wait until the process
worker has run it to COMPLETED (a champion in the registry, a link artifact to MLflow); the MLflow page of
that retrain run shows its datasets and its logged model.

Needs Debian's `chromium` and the `playwright` Python package (the Makefile target installs both); the
browser is Debian's, never one downloaded by playwright.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-quic",
         "--no-first-run", "--disable-component-update", "--disable-sync"]
OUT = Path("docs/img")
STRATEGIES = ["replace-fc", "mlp", "replace-fc+linear-probe"]


def main() -> int:
    from mlflow.tracking import MlflowClient
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    from flows.cli import up
    from flows.runner import run_compare
    from infra.settings import load_settings
    from infra.tracking.runs import MODEL_TRAINING_UI, run_url

    up(None, None, None)
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
    compare_url = f"{uri}/#/compare-runs?runs={runs}&experiments={urllib.parse.quote(json.dumps([experiment]))}" \
        f"&{MODEL_TRAINING_UI}"
    flow_run_id = parent.data.tags["prefect.flow_run_id"]
    prefect_ui = settings.prefect_api_url.removesuffix("/api")
    pages = [
        ("mlflow-compare.png", compare_url, [*STRATEGIES, "test_accuracy"]),
        ("mlflow-parent-run.png", run_url(uri, parent.info.run_id),
         ["winner", "headbench.kind"]),
        ("prefect-flow-run.png", f"{prefect_ui}/runs/flow-run/{flow_run_id}", ["compare-heads", "fit-strategy"]),
    ]
    OUT.mkdir(parents=True, exist_ok=True)
    failures = []
    deployment_url = deploy_small(settings)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        # MLflow's login, as a person types it into the browser's sign-in dialog (sent to MLflow's origin only)
        password = settings.mlflow_tracking_password
        context = browser.new_context(viewport={"width": 1600, "height": 1000}, http_credentials={
            "username": settings.mlflow_tracking_username or "", "origin": uri,
            "password": password.get_secret_value() if password else ""})
        log_in_to_prefect(context, settings)
        page = context.new_page()
        for name, url, expected in pages:
            page.goto(url, wait_until="domcontentloaded", timeout=60_000)
            try:  # single-page apps render after loading: wait until every expected word is on screen
                page.wait_for_function("words => words.every(w => document.body.innerText.includes(w))",
                                       arg=expected, timeout=45_000)
            except PlaywrightTimeout:
                pass
            if name == "mlflow-compare.png":
                failures += plot_strategy_against_test_accuracy(page)
            failures += capture(page, name, expected, url)
        failures += custom_run_through_the_dashboard(page, settings, deployment_url)
        browser.close()
    return 1 if failures else 0


def plot_strategy_against_test_accuracy(page: Any) -> list[tuple[str, list[str]]]:
    """MLflow's compare view opens its parallel-coordinates plot on the first three parameters that differ and
    the first metric the runs logged (its own defaults; no URL parameter sets them): choose `strategy` against
    `test_accuracy` in its two pickers, as a user does."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        close = page.get_by_role("button", name="Close")  # the UI's assistant side panel, when it opens
        if close.count():
            close.first.click()
        page.get_by_role("button", name="Clear All").click(timeout=10_000)
        for index, key in enumerate(("strategy", "test_accuracy")):  # the Parameters, then the Metrics picker
            picker = page.get_by_role("combobox").nth(index)
            picker.click(timeout=10_000)
            picker.fill(key)
            page.locator(f"[class*='select-item-option'][title='{key}']").first.click(timeout=10_000)
            page.keyboard.press("Escape")
        page.get_by_text("Parallel Coordinates Plot").first.click(timeout=10_000)  # close any open list
    except PlaywrightTimeout:
        pass
    # the plot's axes are titled by its keys: both chosen, and the default first metric gone
    page.wait_for_timeout(1500)
    axes = page.locator("svg text").all_text_contents()
    missing = [key for key in ("strategy", "test_accuracy") if key not in axes] + \
        [f"not {key}" for key in ("phase",) if key in axes]
    print(f"compare plot axes: {axes[:12]}")
    return [("mlflow-compare.png plot", missing)] if missing else []


def log_in_to_prefect(context: Any, settings: Any) -> None:
    """What the dashboard's login box does with the auth string a person types: keep it, base64-encoded,
    in the page's localStorage (`prefect-password`), from where the UI sends it on every API call."""
    import base64

    secret = settings.prefect_api_auth_string
    if secret:
        token = base64.b64encode(secret.get_secret_value().encode()).decode()
        context.add_init_script(f"window.localStorage.setItem('prefect-password', {json.dumps(token)});")


def deploy_small(settings: Any) -> str:
    """`headbench deploy` with small defaults (outside the browser's event loop); the retrain deployment URL."""
    from flows.deploy import deploy_all
    from flows.params import RetrainParams

    params = RetrainParams(classes="1,8,9", limit=300, test_limit=150, image_size=32, epochs=1, workers=1,
                           model_name="ui-custom-run")
    return next(d.url for d in deploy_all(settings, retrain_params=params) if d.target.name == "scheduled")


def custom_run_through_the_dashboard(page: Any, settings: Any, deployment_url: str) -> list[tuple[str, list[str]]]:
    """Run -> Custom run in the UI with epochs changed to 2; wait for the worker; check the outcome."""
    from mlflow.tracking import MlflowClient

    from infra.stack.prefect_api import prefect_http

    api = prefect_http(settings)
    before = {r["id"] for r in api.post("/flow_runs/filter", json={"limit": 200}).json()}
    page.goto(f"{deployment_url}/run", wait_until="domcontentloaded", timeout=60_000)
    label = page.get_by_text("Epochs (Optional)", exact=True)
    label.wait_for(timeout=45_000)
    page.screenshot(path=str(OUT / "prefect-custom-run-form.png"), full_page=False)
    field = page.locator("div").filter(has=label).filter(has=page.locator("input")).last
    field.locator("input").first.fill("2")
    page.get_by_role("button", name="Submit").click()
    deadline, run = time.monotonic() + 600, None
    while time.monotonic() < deadline:
        runs = api.post("/flow_runs/filter", json={"limit": 200}).json()
        new = [r for r in runs if r["id"] not in before and not r["auto_scheduled"]]
        if new and new[0]["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED"):
            run = new[0]
            break
        time.sleep(3)
    problems = []
    if run is None or run["state"]["type"] != "COMPLETED" or run["parameters"]["params"]["epochs"] != 2:
        problems.append(("custom run", [f"flow run {run and run['id']} {run and run['state']['type']}"]))
    else:
        client = MlflowClient(settings.mlflow_tracking_uri)
        exp = client.get_experiment_by_name(settings.experiment)
        [mlrun] = client.search_runs([exp.experiment_id], f"tags.`prefect.flow_run_id` = '{run['id']}'")
        if mlrun.data.tags.get("prefect.deployment") != "retrain/scheduled":
            problems.append(("custom run", ["prefect.deployment tag"]))
        page.goto(f"{settings.prefect_api_url.removesuffix('/api')}/runs/flow-run/{run['id']}",
                  wait_until="domcontentloaded", timeout=60_000)
        page.wait_for_timeout(5000)
        page.screenshot(path=str(OUT / "prefect-custom-run-done.png"), full_page=False)
        print(f"custom run from the dashboard: flow run {run['id']} COMPLETED with epochs=2, MLflow run "
              f"{mlrun.info.run_id}, promotion {mlrun.data.tags.get('promotion')}")
        problems += retrain_run_page(page, settings, mlrun.info.run_id)
    return problems


def retrain_run_page(page: Any, settings: Any, run_id: str) -> list[tuple[str, list[str]]]:
    """The MLflow overview of a retrain run: its three datasets (with digests, the '+2' opened) and, further
    down, its logged model (READY, the registered version's source)."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    from infra.tracking.runs import run_url

    page.goto(run_url(settings.mlflow_tracking_uri, run_id),
              wait_until="domcontentloaded", timeout=60_000)
    shots = [("mlflow-retrain-run.png", ["fashion-mnist-train", "fashion-mnist-val", "fashion-mnist-test"]),
             ("mlflow-logged-model.png", ["Logged models (1)", "Ready"])]
    problems = []
    try:
        page.get_by_text("fashion-mnist-train").first.wait_for(timeout=45_000)
        close = page.get_by_role("button", name="Close")  # the UI's assistant side panel, when it opens
        if close.count():
            close.first.click()
        page.get_by_text("+2", exact=True).first.click(timeout=10_000)  # the other two datasets
    except PlaywrightTimeout:
        pass
    for i, (name, expected) in enumerate(shots):
        if i == 1:
            page.keyboard.press("Escape")
            page.get_by_text("Logged models (1)").scroll_into_view_if_needed(timeout=10_000)
        problems += capture(page, name, expected, f"run {run_id}")
    return problems


def capture(page: Any, name: str, expected: list[str], where: str) -> list[tuple[str, list[str]]]:
    """Screenshot the page as docs/img/NAME after it settled; the expected words it does not show."""
    page.wait_for_timeout(1500)
    text = page.inner_text("body")
    missing = [word for word in expected if word not in text]
    page.screenshot(path=str(OUT / name), full_page=False)
    print(f"{OUT / name}: {where}" + (f"  MISSING {missing}" if missing else "  ok"))
    return [(name, missing)] if missing else []


if __name__ == "__main__":
    sys.exit(main())
