"""Hostile and careless input that must end in one short line (and nothing written where it must not be):
markup in user text, huge class ranges, batches of one, GPUs the cluster lacks, decompression bombs,
unreadable classes, S3 keys that leave the cache, private state files and PostgreSQL URLs.
docs/reliability.md has a row for each."""

from __future__ import annotations

import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from infra.data.imagefolder import inside, load_image_folder
from infra.data.spec import DatasetError
from infra.training.cluster import PlacementError, check_gpus
from models.data import check_batch_split, parse_classes


@pytest.mark.parametrize("args, expected", [
    (["--classes", "[/]"], "error: --classes: bad class list '[/]': use indices like '0-4' or '0,2,7'"),
    (["--classes", "[bold]0-4[/bold]"], "error: --classes: bad class list '[bold]0-4[/bold]'"),
    (["--classes", "x" * 100_000], "error: --classes: bad class list 'xxxxxxxx"),
    (["--model-name", "[/]"], "error: --model-name: String should match pattern"),
    (["--strategy", "mlp[/]"], "error: --strategy: unknown"),
    (["--classes", "0-100000000000"], "error: --classes: class index 100000000000 in '0-100000000000' is too large; "
                                      "allowed: 0-999999"),
    (["--batch-size", "2", "--workers", "2"], "error: batch_size 2 over 2 workers leaves 1 sample(s) per worker; "
                                              "allowed: batch_size >= 4"),
    (["--batch-size", "8", "--workers", "5"], "error: batch_size 8 over 5 workers"),
])
def test_user_text_and_impossible_values_fail_in_one_plain_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                args: list[str], expected: str) -> None:
    from tests.unit.test_cli import _error_lines

    lines = _error_lines("run", args, tmp_path, monkeypatch)
    assert len(lines) == 1 and lines[0].startswith(expected), lines
    assert "Traceback" not in lines[0] and len(lines[0]) < 300


def test_huge_class_ranges_are_checked_before_they_are_expanded() -> None:
    """Bounded by the memory the checks take, not the clock: a range expanded first would build a list of
    its every class (a million ints, 36 MB)."""
    tracemalloc.start()
    for spec in ("0-100000", "0-999999", "5-999999,3"):
        with pytest.raises(ValueError) as caught:
            parse_classes(spec, 10)
        assert len(str(caught.value)) < 200, str(caught.value)
        assert "out of range for a dataset with 10 classes; allowed: 0-9" in str(caught.value)
    with pytest.raises(ValueError, match="bad class list '9999999999999999999"):
        parse_classes("9" * 5000, 10)  # int() of 5000 digits would raise a ValueError of its own
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert peak < 1_000_000, peak  # a list of 100,000 ints alone would be 3.6 MB


def test_lines_with_brackets_print_as_typed(capsys: pytest.CaptureFixture[str]) -> None:
    from flows.output import say

    say("cat[1].png: [x] 0.912, dog [/] 0.088 [bold]b[/bold]")
    assert capsys.readouterr().out.strip() == "cat[1].png: [x] 0.912, dog [/] 0.088 [bold]b[/bold]"


def test_a_worker_never_gets_a_batch_of_one() -> None:
    check_batch_split(4, 2, 3)  # ceil(3 / 2) = 2 samples per worker: one batch of 2 each
    with pytest.raises(ValueError, match=r"batch_size 3 over 2 workers leaves 1 sample\(s\) per worker"):
        check_batch_split(3, 2)
    with pytest.raises(ValueError, match="a training split of 4 sample.* over 4 workers .* allowed: workers <= 2"):
        check_batch_split(64, 4, 4)


def test_gpu_requests_the_cluster_cannot_meet_fail_at_once() -> None:
    check_gpus(2, [1, 1])
    with pytest.raises(PlacementError, match=r"--gpu: workers=2 x 1 GPU need 2 GPUs but the Ray cluster has no GPU "
                                             r"on its 2 node\(s\); allowed: --cpu"):
        check_gpus(2, [0, 0])
    with pytest.raises(PlacementError, match=r"has 1 GPU\(s\) on 1 node\(s\); allowed: at most 1 workers"):
        check_gpus(2, [1])


def _png_header_only(path: Path, width: int, height: int) -> None:
    Image.new("1", (width, height)).save(path)  # 1 bit per pixel: a cheap file with a huge pixel count


def test_decompression_bombs_are_named_and_skipped_like_corrupt_images(tmp_path: Path,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "tree"
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(np.full((8, 8, 3), i, dtype=np.uint8)).save(root / name / f"{i}.png")
    _png_header_only(root / "cat" / "bomb90.png", 10_000, 9_000)  # 90 Mpx: PIL only warns, then decodes it
    with caplog.at_level("WARNING"):
        raw = load_image_folder(str(root), 32, tmp_path / "cache")
    assert raw.skipped == 1 and len(raw.train_labels) == 20
    assert any("bomb90.png" in r.getMessage() and "decompression-bomb limit: Image size (90000000 pixels)"
               in r.getMessage() for r in caplog.records)
    _png_header_only(root / "dog" / "bomb196.png", 14_000, 14_000)  # over 2x the limit: PIL raises
    assert load_image_folder(str(root), 32, tmp_path / "cache").skipped == 2  # the same rule, no traceback
    _png_header_only(root / "dog" / "bomb196b.png", 14_000, 14_000)
    with pytest.raises(DatasetError, match=r"3 of 23 images .* are corrupt \(more than 10%\)"):
        load_image_folder(str(root), 32, tmp_path / "cache")


def test_a_class_whose_images_are_all_unreadable_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    (root / "cat").mkdir(parents=True)
    (root / "dog").mkdir()
    for i in range(40):
        Image.fromarray(np.full((8, 8, 3), i, dtype=np.uint8)).save(root / "cat" / f"{i}.png")
    (root / "dog" / "a[1].png").write_bytes(b"not a png")  # 1 of 41 files: under the corrupt threshold
    with pytest.raises(DatasetError, match=re.escape("class folder 'dog' in") + ".*all 1 image.* unreadable "
                       r"\(first: dog/a\[1\].png: not an image PIL can identify\)"):
        load_image_folder(str(root), 32, tmp_path / "cache")


@pytest.mark.parametrize("key", ["/etc/passwd", "../outside.png", "cat/../../outside.png", "cat\\..\\..\\x.png"])
def test_s3_keys_that_would_leave_the_cache_are_refused(tmp_path: Path, key: str) -> None:
    with pytest.raises(DatasetError, match="outside the dataset cache"):
        inside(tmp_path / "cache", key, f"s3://data/set/{key}")
    assert inside(tmp_path / "cache", "cat/1.png", "x") == (tmp_path / "cache" / "cat" / "1.png").resolve()


def test_a_symlinked_folder_cannot_carry_a_key_out_of_the_cache(tmp_path: Path) -> None:
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "cat").symlink_to(tmp_path)
    with pytest.raises(DatasetError, match="resolves to .* outside the dataset cache"):
        inside(tmp_path / "cache", "cat/x.png", "s3://data/set/cat/x.png")


def test_home_and_env_file_are_private_and_an_existing_mode_is_reset(tmp_path: Path) -> None:
    from infra.settings import load_settings
    from infra.stack.local import LocalStack

    home = tmp_path / "home"
    home.mkdir(mode=0o755)
    (home / "env").write_text("export OLD=1\n")
    (home / "env").chmod(0o644)
    stack = LocalStack(load_settings(home))
    stack._write_private(stack.env_file, "export NEW=1\n")
    assert stat.S_IMODE(home.stat().st_mode) == 0o700
    assert stat.S_IMODE((home / "env").stat().st_mode) == 0o600
    for sub in ("pids", "logs", "s3", "mlflow", "prefect"):
        assert stat.S_IMODE((home / sub).stat().st_mode) == 0o700, sub


def test_cli_commands_create_private_files(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = ("from flows.cli import app; import sys; sys.argv=['headbench', 'strategies']\n"
            "try:\n    app()\nexcept SystemExit:\n    pass\n"
            "import os; open(os.environ['OUT'], 'w').close()")
    out = tmp_path / "made-by-a-command"
    subprocess.run([sys.executable, "-c", code], env=os.environ | {"OUT": str(out)}, check=True,
                   capture_output=True, timeout=120)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600


@pytest.mark.parametrize("url, message", [
    ("postgresql://u@127.0.0.1:6543/bad-name", "database name 'bad-name' is not allowed"),
    ('postgresql://u@127.0.0.1:6543/x"; DROP DATABASE y; --', "is not allowed"),
    ("postgresql://u@127.0.0.1:6543/" + "a" * 50, "at most 41 characters"),
    ("mysql://u@127.0.0.1/x", "expected postgresql://"),
])
def test_database_names_must_be_identifiers(tmp_path: Path, url: str, message: str) -> None:
    from infra.settings import load_settings
    from infra.stack.local import LocalStack
    from infra.stack.services import StackError

    with pytest.raises(StackError, match=re.escape(message)):
        LocalStack(load_settings(tmp_path), backend="postgres", database_url=url)


def test_database_url_keeps_its_query_and_can_come_from_the_environment(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    from infra.settings import load_settings
    from infra.stack.local import LocalStack

    monkeypatch.setenv("HEADBENCH_DATABASE_URL", "postgresql://hb:s3cret@db.internal:6543/team?sslmode=require")
    stack = LocalStack(load_settings(tmp_path), backend="postgres")
    assert stack.database("mlflow") == "postgresql://hb:s3cret@db.internal:6543/team_mlflow?sslmode=require"
    assert stack.prefect_store == "postgresql+asyncpg://hb:s3cret@db.internal:6543/team_prefect?ssl=require"
    assert stack.database("", name="postgres") == "postgresql://hb:s3cret@db.internal:6543/postgres?sslmode=require"


def test_every_task_and_flow_has_a_timeout_prefect_can_enforce() -> None:
    """A timeout wherever Prefect enforces one: flows and the tasks they call in their own thread. A task the
    flow submits to its thread pool gets none (Prefect cannot interrupt a thread and warns once per task
    run); its flow's timeout bounds it."""
    import importlib
    import pkgutil

    from prefect import Flow, Task

    import flows
    import tasks

    found: dict[str, float | None] = {}
    for package in (tasks, flows):
        for info in pkgutil.iter_modules(package.__path__):
            if info.name in ("cli", "deploy"):
                continue
            module = importlib.import_module(f"{package.__name__}.{info.name}")
            for value in vars(module).values():
                if isinstance(value, Task | Flow):
                    found[value.name] = value.timeout_seconds
    assert {"download-data", "train", "publish", "promote", "evaluate", "retrain", "compare-heads"} <= set(found)
    submitted = {"fit-strategy"}  # compare's children, side by side in the flow's thread pool
    assert all(t and t > 0 for name, t in found.items() if name not in submitted), found
    assert all(found[name] is None for name in submitted), found
    assert found["compare-heads"] and found["compare-heads"] > 0


@pytest.mark.parametrize(("uri", "public"), [
    ("https://u:p@host:8443/a/data.zip?X-Amz-Signature=abc&X-Amz-Credential=k#frag", "https://host:8443/a/data.zip"),
    ("http://token@host/data.tar.gz", "http://host/data.tar.gz"),
    ("s3://bucket/prefix/?versionId=1", "s3://bucket/prefix/"),
    ("https://host/data.tar.gz", "https://host/data.tar.gz"),
    ("fashion-mnist", "fashion-mnist"),
    ("/data/my images?/x", "/data/my images?/x"),  # a path is no URL: kept as it is
    ("http://u:p@[::1/x.zip?sig=1", "[::1/x.zip"),  # unparsable: nothing after '?' or before '@' survives
])
def test_public_uri_drops_credentials_query_and_fragment(uri: str, public: str) -> None:
    from infra.uris import public_name, public_uri

    assert public_uri(uri) == public
    assert "p@" not in public_name(uri) and "sig" not in public_name(uri)


def test_a_database_password_on_the_command_line_is_refused_and_postgres_urls_are_normalised(tmp_path: Path) -> None:
    from infra.settings import load_settings
    from infra.stack.local import LocalStack
    from infra.stack.postgres import check_no_password
    from infra.stack.services import StackError

    with pytest.raises(StackError) as err:
        check_no_password("postgresql://hb:s3cret@db:6543/team")
    assert "s3cret" not in str(err.value) and "HEADBENCH_DATABASE_URL" in str(err.value)
    check_no_password("postgresql://hb@db:6543/team")  # no password: fine
    done = subprocess.run([sys.executable, "-m", "flows.cli", "up", "--home", str(tmp_path), "--backend", "postgres",
                           "--database-url", "postgresql://hb:s3cret@127.0.0.1:1/team"], capture_output=True,
                          text=True, timeout=120, check=False)
    assert done.returncode == 2 and "carries a password" in done.stderr and "s3cret" not in done.stderr + done.stdout
    assert not (tmp_path / "stack.json").exists()  # refused before anything started
    stack = LocalStack(load_settings(tmp_path), backend="postgres", database_url="postgres://hb@127.0.0.1/team")
    assert stack.mlflow_store == "postgresql://hb@127.0.0.1/team_mlflow"


def test_ray_temp_dirs_under_a_long_home_are_private_mkdtemp_folders_kept_by_the_state(tmp_path: Path) -> None:
    import json
    import stat

    from infra.settings import load_settings
    from infra.stack.local import LocalStack, free_ports

    home = tmp_path / ("h" * 60)
    stack = LocalStack(load_settings(home), free_ports(), ray_nodes=1)
    assert not stack.ray_temp_dirs[0].exists()  # nothing is made before `up` (status, down, argv for display)
    stack._make_ray_temp_dirs()
    base, driver = stack.ray_temp_dirs
    try:
        private = base.parent
        assert private == driver.parent and private.parent == Path(tempfile.gettempdir()) and base != driver
        assert stat.S_IMODE(private.stat().st_mode) == 0o700  # Ray's own 0777 on base and driver stays behind it
        assert len(str(base / "session_latest" / "sockets" / "plasma_store")) < 108
        assert stack.ray_temp_dirs == (base, driver)  # stable
        stack._write_private(stack.state_file, json.dumps({"ports": stack.ports.all(), "ray_tmp": stack.ray_tmp}))
        assert LocalStack(load_settings(home)).ray_temp_dirs == (base, driver)  # and remembered
        base.mkdir()  # what Ray made in it
        stack._remove_ray_temp_dirs()  # `down`
        assert not private.exists()
        again = LocalStack(load_settings(home))  # the state still names the removed folder
        again._make_ray_temp_dirs()  # the next `up`: a new mkdtemp folder, never the old, known name
        assert again.ray_temp_dirs[0].parent != private and again.ray_temp_dirs[0].parent.is_dir()
        again.ray_temp_dirs[0].parent.rmdir()
    finally:
        shutil.rmtree(base.parent, ignore_errors=True)
