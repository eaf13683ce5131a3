"""The import graph: no cycles between headbench's modules (the layer contract itself is import-linter's, in
`make test`). Lazy imports inside functions count too: grimp reads every import statement."""

from __future__ import annotations

from pathlib import Path

import grimp

PACKAGES = ("flows", "tasks", "models", "infra", "bench", "tools")


def test_no_module_imports_one_that_imports_it_back() -> None:
    graph = grimp.build_graph(*PACKAGES)
    cycles = sorted((a, b) for a in graph.modules for b in graph.find_modules_directly_imported_by(a)
                    if b in graph.modules and graph.chain_exists(importer=b, imported=a))
    assert cycles == []


def test_lower_layers_never_reach_the_flows_or_the_cli() -> None:
    graph = grimp.build_graph(*PACKAGES)
    for low in ("models", "infra", "tasks"):
        for module in graph.find_descendants(low) | {low}:
            imported = graph.find_upstream_modules(module)  # everything it imports, directly or not
            assert not {m for m in imported if m.split(".")[0] in ("flows", "bench", "tools")}, module


def test_every_module_or_file_named_in_a_string_exists() -> None:
    """Names the code hands to another process or library as text, which no import checks: the hook Ray's
    worker processes run, the node launcher `python -m` runs, the file MLflow copies into a logged model."""
    import importlib
    import importlib.util

    from infra.publishing.logged_model import PYFUNC_CODE
    from infra.stack.ray_nodes import PortPicker, driver_node_argv, node_argv
    from infra.training.prestart import PRELOAD_HOOK

    module, _, name = PRELOAD_HOOK.rpartition(".")
    assert callable(getattr(importlib.import_module(module), name))
    assert PYFUNC_CODE.is_file()
    launchers = (node_argv("127.0.0.1:1", 1, 1, PortPicker()), driver_node_argv("127.0.0.1:1", Path("d"), PortPicker()))
    for argv in launchers:
        launcher = argv[argv.index("-m") + 1]
        assert importlib.util.find_spec(launcher) is not None, launcher
