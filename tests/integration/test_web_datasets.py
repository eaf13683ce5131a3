"""Datasets from the web against a real HTTP server (tests/http_server.py, on loopback) and the real stack: a
retrain from an http archive end to end (its download cut short once and resumed), one-line failures for a
wrong sha256, a traversal member and an unreachable host, and a named dataset through the mirror, mirrored on
to the S3 data bucket."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import re
import stat
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from infra.data.catalogue import CATALOGUE, CatalogueFile, load_named
from infra.data.spec import Sources
from infra.processes.supervise import free_port
from infra.storage.s3 import s3_client, split_uri
from tests.dataset_files import cifar10_archive, image_folder_archive, md5, sha256
from tests.http_server import serving
from tests.integration.conftest import Stack, headbench_run
from tests.integration.scan import find_secrets

HEADBENCH = str(Path(sys.executable).parent / "headbench")
CLASSES = {"daisy": 40, "rose": 40, "tulip": 40}


@pytest.fixture(scope="module")
def web(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("www")
    image_folder_archive(root / "flowers.tar.gz", CLASSES)
    image_folder_archive(root / "evil.tar.gz", CLASSES, extra=[("../../escaped.png", b"x")])
    cifar10_archive(root / "mirror" / "cifar10" / "cifar-10-python.tar.gz")
    with zipfile.ZipFile(root / "chain.zip", "w") as zf:  # the symlink chain of docs/reliability.md
        for name, target in (("b", "p/q"), ("a", "b/../.."), ("p", ".")):
            info = zipfile.ZipInfo(name)
            info.external_attr = (stat.S_IFLNK | 0o777) << 16
            zf.writestr(info, target)
        zf.writestr("q/", b"")
        zf.writestr("a/X", b"escaped")
    (root / "huge.tar.gz").write_bytes(os.urandom(3_000_000))
    with serving(root) as (base, state):
        state.no_length.add("/huge.tar.gz")  # a response that never says how long it is
        yield base, state, root


def _archive_trees(stack: Stack) -> set[str]:
    folder = stack.settings.cache_dir / "archives"
    return {p.name for p in folder.iterdir() if p.is_dir()} if folder.is_dir() else set()


SIGNATURE, PASSWORD = "s3cr3t-signature-7f2a", "s3cr3t-pass-91c4"


@pytest.mark.training
def test_a_retrain_from_an_http_archive_end_to_end(stack: Stack, web) -> None:
    """From a URL with credentials and a presigned query string: the requests carry both, and no recorded
    copy of the URL does."""
    base, state, root = web
    pin = sha256(root / "flowers.tar.gz")
    state.cut_once["/flowers.tar.gz"] = 20_000  # the first transfer breaks off; the download resumes it
    url = f"{base}/flowers.tar.gz"
    secret_url = (f"http://reader:{PASSWORD}@{base.removeprefix('http://')}/flowers.tar.gz"
                  f"?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Signature={SIGNATURE}")
    run = headbench_run(stack, "--dataset", secret_url, "--dataset-sha256", pin, "--image-size", "32", "--epochs", "1",
                        "--workers", "1", "--batch-size", "16", "--strategy", "replace-fc",
                        "--model-name", "web-flowers", "--precise-bn-batches", "1")
    # the console's progress line (a pipe: one line every 5 s and the last), MB, rate
    assert re.search(r"downloaded flowers\.tar\.gz: [\d.]+ of [\d.]+ MB \(100%\), [\d.]+ MB/s", run["stdout"])
    query = f"?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Signature={SIGNATURE}"
    login = "Basic " + base64.b64encode(f"reader:{PASSWORD}".encode()).decode()
    asked = [(p, h.get("Range"), h.get("Authorization"), s) for p, h, s in state.requests
             if p.startswith("/flowers.tar.gz")]
    assert asked == [("/flowers.tar.gz" + query, None, login, 200),
                     ("/flowers.tar.gz" + query, "bytes=20000-", login, 206)]
    leaks = find_secrets(stack, [SIGNATURE, PASSWORD], run["stdout"], flow_parameters=False)
    assert not leaks, f"the dataset URL's secrets were recorded in: {leaks[:10]}"

    assert stack.settings.mlflow_tracking_uri
    mlflow_run = MlflowClient(stack.settings.mlflow_tracking_uri).get_run(run["run_id"])
    params = mlflow_run.data.params
    assert params["data_source_uri"] == params["dataset"] == url and params["archive_sha256"] == pin
    assert params["dataset_sha256"] == pin and mlflow_run.data.tags["dataset"] == url
    assert params["class_names"] == "daisy,rose,tulip"
    assert {int(params[f"{s}_size"]) for s in ("train", "val", "test")} and int(params["test_size"]) == 24
    assert {json.loads(d.dataset.source)["url"] for d in mlflow_run.inputs.dataset_inputs} == {url}  # MLflow's
    #                                                                                          HTTP source
    client = s3_client(stack.settings)
    bucket, prefix = split_uri(run["s3_uri"])
    manifest = json.loads(client.get_object(Bucket=bucket, Key=prefix + "manifest.json")["Body"].read())
    assert manifest["lineage"]["archive_sha256"] == pin and manifest["lineage"]["source_uri"] == url
    assert manifest["lineage"]["split_sizes"]["test"] == 24
    mirrored = client.list_objects_v2(Bucket=stack.settings.data_bucket, Prefix=f"archives/{pin}/")
    assert [o["Key"] for o in mirrored.get("Contents", [])] == [f"archives/{pin}/flowers.tar.gz"]
    assert pin[:32] in _archive_trees(stack)


BAD_CASES = ["wrong-sha256", "traversal-member", "unreachable-host", "symlink-chain", "over-the-cap"]


@pytest.fixture(scope="module")
def bad_web_runs(stack: Stack, web) -> dict[str, tuple[subprocess.CompletedProcess[str], str, float, int]]:
    """Every bad case's `headbench run`, all at once (independent commands; the cache's archive trees are
    read before the first starts and after the last ends): {case: (outcome, expected text, seconds, requests
    the web server got for the case's URL)}."""
    base, state, root = web
    cases = {
        "wrong-sha256": (["--dataset", f"{base}/flowers.tar.gz", "--dataset-sha256", "0" * 64],
                         f"is not the pinned content (sha256 {sha256(root / 'flowers.tar.gz')}, pinned {'0' * 64})"),
        "traversal-member": (["--dataset", f"{base}/evil.tar.gz"],
                             "member '../../escaped.png' has a '..' segment"),
        "unreachable-host": (["--dataset", f"http://127.0.0.1:{free_port()}/flowers.tar.gz"], "is unreachable"),
        "symlink-chain": (["--dataset", f"{base}/chain.zip"], "chain.zip: member 'b' is a symbolic link"),
        "over-the-cap": (["--dataset", f"{base}/huge.tar.gz"],
                         f"{base}/huge.tar.gz sent more than 1.0 MB without announcing a length, over the 1.0 MB "
                         "download cap"),
    }
    trees, started, seen = _archive_trees(stack), time.monotonic(), len(state.requests)
    env = {"over-the-cap": {"HEADBENCH_CACHE_LIMIT_GB": "0.001"}}
    procs = {case: subprocess.Popen([HEADBENCH, "run", "--model-name", f"web-{case}", "--epochs", "1", *args],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                    env=stack.cli_env(**env.get(case, {})))
             for case, (args, _) in cases.items()}
    outcomes = {}
    for case, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        # read after the earlier cases ended: an upper bound of this case's own time
        outcomes[case] = (subprocess.CompletedProcess(proc.args, proc.returncode, out, err), cases[case][1],
                          time.monotonic() - started)
    assert _archive_trees(stack) == trees  # nothing extracted, nothing cached, by any case
    asked = [path.split("?", 1)[0] for path, _, _ in state.requests[seen:]]
    return {case: (*outcome, asked.count("/" + cases[case][0][1].rsplit("/", 1)[1]) if case != "unreachable-host"
                   else 0) for case, outcome in outcomes.items()}


@pytest.mark.parametrize("case", BAD_CASES)
def test_a_bad_web_dataset_fails_in_one_line_within_seconds_and_caches_nothing(stack: Stack, web, bad_web_runs,
                                                                              case: str) -> None:
    _, _, root = web
    done, expected, elapsed, requests = bad_web_runs[case]
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and expected in last and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert requests <= 1, requests  # nothing is retried (a cached archive is not even asked for)
    assert elapsed < 180, elapsed  # generous: the CLIs start together on a loaded machine; no backoff loop
    assert not (root.parent / "escaped.png").exists()
    assert not list(stack.settings.cache_dir.rglob("X")) and not list(stack.settings.cache_dir.rglob("*.part"))
    assert stack.settings.mlflow_tracking_uri
    assert not MlflowClient(stack.settings.mlflow_tracking_uri).search_registered_models(f"name = 'web-{case}'")


def test_a_named_dataset_through_the_mirror_is_verified_and_mirrored_to_s3(stack: Stack, web,
                                                                          tmp_path: Path) -> None:
    base, state, root = web
    archive = root / "mirror" / "cifar10" / "cifar-10-python.tar.gz"
    # this archive is small and made by the test: its checksum stands in for the published one
    entry = dataclasses.replace(CATALOGUE["cifar10"], files=(CatalogueFile(archive.name, md5(archive)),))
    client = s3_client(stack.settings)
    sources = Sources.from_settings(stack.settings.model_copy(update={"dataset_mirror": f"{base}/mirror"}), client)
    raw = load_named(entry, tmp_path / "cache", sources)
    assert raw.train_images.shape == (200, 3, 32, 32) and raw.class_names[:2] == ["airplane", "automobile"]
    assert ("/mirror/cifar10/cifar-10-python.tar.gz", 200) in [(p, s) for p, _, s in state.requests]
    key = f"cifar10/{archive.name}"
    assert client.head_object(Bucket=stack.settings.data_bucket, Key=key)["ContentLength"] == archive.stat().st_size
    # with the mirror down, another machine (an empty cache) still gets it, from the S3 data bucket
    offline = dataclasses.replace(sources, mirror=f"http://127.0.0.1:{free_port()}", tried=[])
    again = load_named(entry, tmp_path / "other-cache", offline)
    assert again.files_digest == raw.files_digest and (again.train_labels == raw.train_labels).all()
