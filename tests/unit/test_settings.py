"""Settings: standard variables first, the local stack's env file as fallback, secrets hidden."""

from __future__ import annotations

from pathlib import Path

import pytest

from infra.settings import load_settings

STANDARD = ("MLFLOW_TRACKING_URI", "MLFLOW_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL",
            "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "PREFECT_API_URL", "RAY_ADDRESS", "HEADBENCH_HOME")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in STANDARD:
        # set, then delete: monkeypatch records each name, so whatever a test exports (export_env writes
        # os.environ directly) is undone afterwards instead of leaking into later tests' stacks
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


def test_env_file_fills_unset_variables(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "env").write_text(
        "export MLFLOW_TRACKING_URI=http://127.0.0.1:5999\n"
        "export AWS_ENDPOINT_URL_S3=http://127.0.0.1:8999\n"
        "export AWS_ACCESS_KEY_ID=file-key\n"
        "export AWS_SECRET_ACCESS_KEY='file secret'\n"
        "export PREFECT_API_URL=http://127.0.0.1:4999/api\n")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:1234")  # the environment wins
    settings = load_settings(tmp_path)
    assert settings.mlflow_tracking_uri == "http://127.0.0.1:1234"
    assert settings.s3_endpoint_url == "http://127.0.0.1:8999"
    assert settings.prefect_api_url == "http://127.0.0.1:4999/api"
    assert settings.aws_secret_access_key is not None
    assert settings.aws_secret_access_key.get_secret_value() == "file secret"
    assert "file secret" not in repr(settings) and "file-key" not in repr(settings)
    assert settings.ray_address is None


def test_home_from_variable_and_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HEADBENCH_HOME", str(tmp_path))
    settings = load_settings()
    assert settings.home == tmp_path and settings.env_file == tmp_path / "env"
    assert settings.cache_dir == tmp_path / "cache"
    assert settings.model_bucket == "models" and settings.mlflow_tracking_uri is None


def test_export_env_never_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import os

    (tmp_path / "env").write_text("export PREFECT_API_URL=http://127.0.0.1:4999/api\n"
                                  "export RAY_ADDRESS=127.0.0.1:6390\n")
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:7000")
    load_settings(tmp_path).export_env()
    assert os.environ["PREFECT_API_URL"] == "http://127.0.0.1:4999/api"
    assert os.environ["RAY_ADDRESS"] == "127.0.0.1:7000"


@pytest.mark.parametrize(("name", "value"), [("HEADBENCH_RAY_PRESTART", "maybe"),
                                             ("HEADBENCH_KEEP_CHECKPOINTS", "-1"),
                                             ("PREFECT_WORKER_QUERY_SECONDS", "0")])
def test_a_bad_variable_is_one_line_naming_it_and_its_value(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                            name: str, value: str) -> None:
    from infra.errors import HeadbenchError

    monkeypatch.setenv(name, value)
    with pytest.raises(HeadbenchError) as caught:
        load_settings(tmp_path)
    message = str(caught.value)
    assert message.startswith(f"{name}={value!r}: ") and "\n" not in message


def test_prestarting_train_workers_is_on_unless_turned_off(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings(tmp_path).ray_prestart is True
    monkeypatch.setenv("HEADBENCH_RAY_PRESTART", "0")
    assert load_settings(tmp_path).ray_prestart is False
