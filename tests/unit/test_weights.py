"""models/weights.py: published and torchvision weights load safely (safetensors or weights-only), a file for
another arch, a pickle with code, a corrupt file and an unreachable download each fail in one line."""

from __future__ import annotations

import pickle
import socket
from pathlib import Path

import pytest
import torch
import torchvision
from safetensors.torch import save_file

from models import (
    WeightsError,
    build_model,
)
from models.weights import save_state_dict

EXPECTED_IN_FEATURES = {"resnet18": 512, "resnet34": 512, "resnet50": 2048, "resnet101": 2048,
                        "resnet152": 2048}


def test_published_weights_round_trip_and_warm_start(tmp_path: Path) -> None:
    source = build_model("resnet18", 5, "mlp")
    path = tmp_path / "model.safetensors"
    save_state_dict(source, path)
    # same head shape: backbone and head both load (a warm start)
    same = build_model("resnet18", 5, "mlp", path)
    for k, v in source.state_dict().items():
        torch.testing.assert_close(same.state_dict()[k], v)
    # a different task: backbone loads, the new head keeps its fresh init
    other = build_model("resnet18", 3, "replace-fc", path)
    for k, v in source.state_dict().items():
        if k.startswith("backbone."):
            torch.testing.assert_close(other.state_dict()[k], v)
    assert other.head.fc.out_features == 3


def test_torchvision_state_dict_loads_into_backbone(tmp_path: Path) -> None:
    reference = torchvision.models.resnet18(weights=None)
    path = tmp_path / "resnet18-tv.pth"
    torch.save(reference.state_dict(), path)
    model = build_model("resnet18", 4, "mlp", path)
    for k, v in reference.state_dict().items():
        if not k.startswith("fc."):
            torch.testing.assert_close(model.state_dict()[f"backbone.{k}"], v)


def test_weights_for_another_arch_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "r18.safetensors"
    save_state_dict(build_model("resnet18", 5, "mlp"), path)
    with pytest.raises(WeightsError, match="do not fit a resnet50 backbone"):
        build_model("resnet50", 5, "mlp", path)


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        import os

        return (os.system, (f"touch {self.marker}",))


def test_pickle_with_code_is_refused_and_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    path.write_bytes(pickle.dumps({"conv1.weight": _Exploit(marker)}))
    with pytest.raises(WeightsError, match="refused by the safe loader"):
        build_model("resnet18", 3, "mlp", path)
    assert not marker.exists()


def test_corrupt_and_missing_weights_files(tmp_path: Path) -> None:
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(WeightsError, match="not a valid safetensors file"):
        build_model("resnet18", 3, "mlp", bad)
    with pytest.raises(WeightsError, match="does not exist"):
        build_model("resnet18", 3, "mlp", tmp_path / "nope.safetensors")
    tensors = tmp_path / "partial.safetensors"
    save_file({"conv1.weight": torch.zeros(64, 3, 7, 7)}, tensors)
    with pytest.raises(WeightsError, match="missing"):
        build_model("resnet18", 3, "mlp", tensors)


def test_unknown_torchvision_weights_name_lists_allowed() -> None:
    with pytest.raises(WeightsError, match="unknown torchvision weights 'IMAGENET9K' for resnet18; allowed: "
                       "DEFAULT, IMAGENET1K_V1"):
        build_model("resnet18", 3, "mlp", "IMAGENET9K")


def test_torchvision_weights_unreachable_is_one_line_naming_the_url(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """torchvision's real download path, made unreachable on purpose (a proxy on a closed loopback port, so no
    test depends on the internet): one line naming the URL, and nothing left in the cache."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # no cached copy
    for var in ("https_proxy", "HTTPS_PROXY", "http_proxy", "HTTP_PROXY"):
        monkeypatch.setenv(var, f"http://127.0.0.1:{closed}")
    monkeypatch.delenv("no_proxy", raising=False)
    monkeypatch.delenv("NO_PROXY", raising=False)
    weights = torchvision.models.ResNet18_Weights.IMAGENET1K_V1
    with pytest.raises(WeightsError) as caught:
        build_model("resnet18", 3, "mlp", "IMAGENET1K_V1")
    assert weights.url in str(caught.value) and "offline?" in str(caught.value)
    assert "\n" not in str(caught.value)
    assert not list(tmp_path.rglob("*.pth"))


@pytest.mark.parametrize("arch", ["resnet18", "resnet50"])
def test_published_replace_fc_loads_into_torchvision_strictly_and_computes_the_same(tmp_path: Path, arch: str) -> None:
    """replace-fc is torchvision's ResNet with fc reassigned: its published file uses torchvision's key
    names, so `torchvision.models.<arch>(num_classes=C).load_state_dict(..., strict=True)` needs no surgery."""
    from safetensors.torch import load_file

    ours = build_model(arch, 4, "replace-fc", seed=1).eval()
    path = tmp_path / "model.safetensors"
    assert save_state_dict(ours, path) == "torchvision"
    theirs = torchvision.models.get_model(arch, num_classes=4).eval()
    theirs.load_state_dict(load_file(path), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(theirs(x), ours(x))


@pytest.mark.parametrize("strategy", ["mlp", "replace-fc:max", "conv1x1", "fastai+lp-ft"])
def test_other_heads_keep_headbench_keys_and_every_format_loads_back_exactly(tmp_path: Path, strategy: str) -> None:
    from models.weights import load_exact, read_state_dict

    ours = build_model("resnet18", 3, strategy, seed=2)
    path = tmp_path / "model.safetensors"
    assert save_state_dict(ours, path) == "headbench"
    assert all(k.startswith(("backbone.", "head.")) for k in read_state_dict(path))
    again = build_model("resnet18", 3, strategy, seed=9)
    load_exact(again, read_state_dict(path))
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(again.state_dict()[key], value)
    with pytest.raises(RuntimeError, match="size mismatch|Missing|Unexpected"):
        load_exact(build_model("resnet18", 5, strategy), read_state_dict(path))


def test_the_same_weights_saved_by_two_processes_hash_the_same(tmp_path: Path) -> None:
    """The published sha256 is the reproducibility check: the file's bytes must depend on the tensors only
    (safetensors writes header metadata in a per-process hash-map order, so none is written)."""
    import hashlib
    import subprocess
    import sys

    script = ("import sys; from pathlib import Path; from models import build_model; "
              "from models.weights import save_state_dict; "
              "[save_state_dict(build_model('resnet18', 3, s, seed=5), Path(sys.argv[1]) / f'{s}.safetensors') "
              "for s in ('mlp', 'replace-fc')]")
    digests = set()
    procs = []
    for i in range(2):  # two processes side by side, each saving both strategies
        (tmp_path / str(i)).mkdir()
        procs.append(subprocess.Popen([sys.executable, "-c", script, str(tmp_path / str(i))]))
    assert [proc.wait(timeout=120) for proc in procs] == [0, 0]
    for i in range(2):
        for strategy in ("mlp", "replace-fc"):
            digests.add((strategy, hashlib.sha256((tmp_path / str(i) / f"{strategy}.safetensors").read_bytes())
                         .hexdigest()))
    assert len(digests) == 2  # one per strategy
