"""The house rules, checked over the import graph: imports flow one way (``http`` → ``state`` → ``spec``), the pure
rooms do no I/O, ``service`` never imports ``workers``, nothing imports the HTTP layer or the CLI, and every job
name queued by string resolves to a real function."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest
from rq.utils import import_attribute

from service.state.queue import CRON_CONFIG, JOBS

ROOT = Path(__file__).resolve().parent.parent
IO_LIBRARIES = {"redis", "rq", "httpx", "starlette", "uvicorn", "socket", "subprocess"}


def modules() -> dict[str, set[str]]:
    """module -> every module it imports (absolute names; a function-level import counts too)."""
    graph = {}
    for path in sorted([*ROOT.joinpath("service").rglob("*.py"), *ROOT.joinpath("workers").rglob("*.py")]):
        name = ".".join(path.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                imported |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
        graph[name] = imported
    return graph


GRAPH = modules()


def within(module: str, *rooms: str) -> bool:
    return any(module == room or module.startswith(room + ".") for room in rooms)


# room -> the project rooms it may import (besides itself)
ALLOWED = {
    "service.spec": ("service.config",),
    "service.state": ("service.spec", "service.config", "service.logs"),
    "service.http": ("service.state", "service.spec", "service.config", "service.logs"),
    "service.devstack": ("service.config",),
    "workers.compute": ("service.spec", "service.config"),
    "workers.mavera": ("workers.compute", "service.spec", "service.state", "service.config",
                       "service.logs"),
    "workers": ("workers", "service.spec", "service.state", "service.config", "service.logs"),
}


@pytest.mark.parametrize("room", sorted(ALLOWED, key=len, reverse=True))
def test_imports_flow_one_way(room: str) -> None:
    narrower = [r for r in ALLOWED if r != room and within(r, room)]
    wrong = {}
    for module, imported in GRAPH.items():
        if not within(module, room) or any(within(module, r) for r in narrower):
            continue
        project = {i for i in imported if within(i, "service", "workers")}
        bad = {i for i in project if not within(i, room, *ALLOWED[room])
               and i not in ("service", "workers")}  # `from service.x import y` also lists the bare package
        if bad:
            wrong[module] = sorted(bad)
    assert wrong == {}, f"{room} may import only {ALLOWED[room]}"


def test_service_never_imports_workers_and_nothing_imports_the_cli() -> None:
    assert {m for m, imp in GRAPH.items() if within(m, "service") and any(within(i, "workers") for i in imp)} == set()
    assert {m for m, imp in GRAPH.items() if any(within(i, "service.cli") for i in imp)} == set()
    assert {m for m, imp in GRAPH.items() if not within(m, "service.http", "service.cli")
            and any(within(i, "service.http") for i in imp)} == set()


@pytest.mark.parametrize("room", ["service.spec", "workers.compute"])
def test_pure_rooms_do_no_io(room: str) -> None:
    io = {m: sorted(i for i in imp if i.split(".")[0] in IO_LIBRARIES) for m, imp in GRAPH.items() if within(m, room)}
    assert {m: i for m, i in io.items() if i} == {}


@pytest.mark.parametrize("name", JOBS)
def test_every_job_name_resolves_to_a_function(name: str) -> None:
    assert callable(import_attribute(name))


def test_the_cron_config_is_a_module_that_registers_jobs() -> None:
    importlib.import_module(CRON_CONFIG)
