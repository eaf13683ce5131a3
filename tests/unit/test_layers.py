"""The import graph: no cycles between headbench's modules (the layer contract itself is import-linter's, in
`make test`). Lazy imports inside functions count too: grimp reads every import statement."""

from __future__ import annotations

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
