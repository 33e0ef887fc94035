"""What can be checked of the lock files, the Dockerfile, the Makefile and the Kubernetes manifests without docker or a
cluster: each test fails if the thing it guards were broken (a dependency missing from the lock the image installs,
the image installing something else than the lock, running as root, manifests deploying another image or a command
the entry point refuses, a grace period shorter than a job, `make install` not using the lock)."""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import shutil
import subprocess
import time
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
import redis
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from service.cli import parser as cli_parser
from service.config import Settings
from service.state.refresh import REFRESH_TIMEOUT, sync_timeout

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"
TEST_LOCK = ROOT / "requirements-test.lock"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
MANIFESTS = sorted((ROOT / "deploy" / "kubernetes").glob("*.yaml"))


def pins(path: Path) -> dict[str, str]:
    """name -> version of every `name==version` line; asserts each pin carries at least one hash."""
    text = path.read_text().replace("\\\n", " ")
    found = {}
    for line in text.splitlines():
        m = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+?)\s*(;|--hash|$)", line)
        if m:
            assert "--hash=sha256:" in line, f"{path.name}: {m.group(1)} has no hash"
            found[canonicalize_name(m.group(1))] = m.group(2)
    return found


def closure(requirements: list[str]) -> set[str]:
    """Every distribution these requirements pull in on this interpreter, extras and markers included, read from the
    installed metadata (which `make install` took from the lock)."""
    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue
        key = (canonicalize_name(req.name), frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        for raw in metadata.distribution(req.name).requires or []:
            sub = Requirement(raw)
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in {"", *req.extras}):
                todo.append(Requirement(str(sub).split(";")[0]))
    return {name for name, _ in seen}


def dockerfile() -> list[tuple[str, str]]:
    """(instruction, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    lines = [ln for ln in (ROOT / "Dockerfile").read_text().splitlines() if not ln.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [(ln.split(None, 1)[0].upper(), ln.split(None, 1)[1] if " " in ln.strip() else "")
            for ln in joined.splitlines() if ln.strip()]


def final_stage() -> list[tuple[str, str]]:
    steps = dockerfile()
    last_from = max(i for i, (ins, _) in enumerate(steps) if ins == "FROM")
    return steps[last_from:]


def build_stage() -> list[tuple[str, str]]:
    steps = dockerfile()
    last_from = max(i for i, (ins, _) in enumerate(steps) if ins == "FROM")
    return steps[:last_from]


def documented_image() -> str:
    m = re.search(r"docker build .*?-t (\S+) \.", (ROOT / "Dockerfile").read_text())
    assert m, "the Dockerfile documents no `docker build -t NAME .` command"
    return m.group(1)


def containers() -> list[tuple[str, dict, dict]]:
    """(file name, pod spec, container) of every container in the manifests."""
    out = []
    for path in MANIFESTS:
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc.get("kind") == "Deployment":
                spec = doc["spec"]["template"]["spec"]
                out += [(path.name, spec, c) for c in spec["containers"]]
    return out


# -- lock files ----------------------------------------------------------------------------------------------------

def test_runtime_lock_has_every_package_the_image_needs() -> None:
    """The image installs requirements.lock and then the package with --no-deps: whatever the runtime dependencies
    pull in must be pinned there, or the image starts without it."""
    locked = pins(LOCK)
    needed = closure(PYPROJECT["project"]["dependencies"])
    assert {"starlette", "uvicorn", "uvloop", "redis", "hiredis", "rq", "croniter"} <= needed  # the walk works
    assert needed - set(locked) == set()
    for raw in PYPROJECT["project"]["dependencies"]:  # pins inside the ranges: `make lock` ran after the last edit
        req = Requirement(raw)
        assert req.specifier.contains(locked[canonicalize_name(req.name)], prereleases=True), raw


def test_runtime_lock_leaves_the_test_tools_out_and_the_test_lock_agrees_with_it() -> None:
    runtime, full = pins(LOCK), pins(TEST_LOCK)
    assert not {"pytest", "hypothesis", "ruff", "segment-analytics-python"} & set(runtime)
    assert closure(PYPROJECT["project"]["optional-dependencies"]["test"]) - set(full) == set()
    assert {name: full.get(name) for name in runtime} == runtime  # make test runs what the image runs


# -- Dockerfile ------------------------------------------------------------------------------------------------------

def test_dockerfile_installs_the_lock_then_the_package_without_deps() -> None:
    build = build_stage()
    runs = [args for ins, args in build if ins == "RUN"]
    lock_installs = [i for i, a in enumerate(runs) if re.search(r"pip install .*-r (\S+)", a)]
    assert len(lock_installs) == 1, runs
    cmd = shlex.split(runs[lock_installs[0]])
    lock_name = cmd[cmd.index("-r") + 1]
    assert lock_name == LOCK.name and (ROOT / lock_name).is_file()
    assert "--require-hashes" in cmd and "--only-binary=:all:" in cmd
    copied = [a.split() for ins, a in build if ins == "COPY"]
    assert any(lock_name in c[:-1] for c in copied), "the lock is not copied into the build stage"
    package = [a for a in runs[lock_installs[0] + 1:] if re.search(r"pip install\b.*\s\.(\s|$)", a)]
    assert package and "--no-deps" in package[0].split(), runs


def test_dockerfile_copies_what_the_package_build_needs_and_dockerignore_keeps_it() -> None:
    sources = [src for ins, a in build_stage() if ins == "COPY" and not a.startswith("--")
               for src in a.split()[:-1]]
    for src in sources:
        assert (ROOT / src).exists(), src
    wanted = {"pyproject.toml", PYPROJECT["project"]["readme"]}
    wanted |= {p.rstrip("*") for p in PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]}
    assert wanted <= set(sources)
    ignored = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()
               if ln.strip() and not ln.startswith("#")]
    for src in sources:
        assert not any(fnmatch.fnmatch(src, pat) for pat in ignored), f".dockerignore drops {src}"


def test_final_image_is_slim_runs_as_non_root_and_starts_persona_sync() -> None:
    final = final_stage()
    assert final[0] == ("FROM", "python:3.11-slim")
    assert [a for ins, a in final if ins == "COPY"] == ["--from=build /opt/venv /opt/venv"]  # no source, no tools
    assert not any(ins == "RUN" and re.search(r"apt-get|apk|gcc|build-essential", a) for ins, a in final)
    users = [a for ins, a in final if ins == "USER"]
    assert users, "no USER: the image would run as root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and uid != "0", "USER must be a numeric non-root uid (runAsNonRoot checks it)"
    created = " ".join(a for ins, a in final if ins == "RUN")
    assert f"--uid {uid}" in created, "the USER is not created in the final stage"
    assert ("ENTRYPOINT", '["persona-sync"]') in final and ("CMD", '["web"]') in final
    assert any(ins == "ENV" and "HOST=0.0.0.0" in a for ins, a in final)


# -- Kubernetes ------------------------------------------------------------------------------------------------------

def test_manifests_deploy_the_image_the_dockerfile_builds() -> None:
    image = documented_image()
    assert image.rsplit(":", 1)[1] == PYPROJECT["project"]["version"]
    found = containers()
    assert {c["name"] for _, _, c in found} == {"web", "worker", "cron"}
    assert {c["image"] for _, _, c in found} == {image}
    assert image in (ROOT / "deploy" / "kubernetes" / "README.md").read_text()
    assert image in (ROOT / "deploy" / "DEPLOY.md").read_text()


def test_manifest_commands_are_what_the_entry_point_accepts() -> None:
    """The image's ENTRYPOINT is persona-sync, so args are the subcommand alone (["persona-sync", "web"] would run
    `persona-sync persona-sync web`); probes run full commands."""
    for name, spec, c in containers():
        assert "command" not in c, f"{name}: command would replace the ENTRYPOINT"
        assert c["args"] == [c["name"]], name
        args = cli_parser().parse_args(c["args"])
        assert args.func.__name__ == f"cmd_{c['name']}"
        assert spec["securityContext"]["runAsNonRoot"] is True
    worker = next(c for _, _, c in containers() if c["name"] == "worker")
    probe = worker["livenessProbe"]["exec"]["command"]
    assert probe[0] == "persona-sync" and cli_parser().parse_args(probe[1:]).func.__name__ == "cmd_worker_alive"


def test_worker_grace_outlasts_the_longest_job() -> None:
    """A SIGTERMed RQ worker finishes its job; Kubernetes kills it when the grace period ends."""
    from rq.cron import CronScheduler

    cron = CronScheduler(connection=redis.Redis(port=1))  # loads the config only, never connects
    cron.load_config_from_file(str(ROOT / "workers" / "cron.py"))
    timeouts = [j.job_options["job_timeout"] for j in cron.get_jobs()]
    assert timeouts, "no cron job read from workers/cron.py"
    longest = max(*timeouts, REFRESH_TIMEOUT, sync_timeout(Settings().mave_chat_timeout))
    assert longest >= 3600
    grace = {c["name"]: spec["terminationGracePeriodSeconds"] for _, spec, c in containers()}
    assert grace["worker"] > longest
    assert 10 < grace["web"] <= 60  # above uvicorn's 10 s drain, yet short


# -- Makefile --------------------------------------------------------------------------------------------------------

@pytest.fixture
def make_copy(tmp_path: Path) -> Path:
    if not shutil.which("make"):
        pytest.skip("make is not installed")
    for name in ("Makefile", "pyproject.toml", LOCK.name, TEST_LOCK.name):
        shutil.copy2(ROOT / name, tmp_path / name)
    return tmp_path


def make(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["make", "--no-print-directory", "VENV=venv", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=60)


def test_make_install_installs_the_lock_then_the_package_without_deps(make_copy: Path) -> None:
    out = make(make_copy, "-n", "install")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    lock = next(i for i, ln in enumerate(lines) if re.search(r"/pip install .*-r (\S+)", ln))
    assert lines[lock].split("-r ")[1].split()[0] == TEST_LOCK.name
    editable = next(i for i, ln in enumerate(lines) if "pip install" in ln and "-e ." in ln)
    assert editable > lock and "--no-deps" in lines[editable]
    assert not any(re.search(r"pip install .*'?\.\[test\]'?", ln) for ln in lines)  # nothing resolved afresh


@pytest.mark.parametrize("changed", ["pyproject.toml", LOCK.name, TEST_LOCK.name])
def test_make_reinstalls_when_a_lock_or_pyproject_changes(make_copy: Path, changed: str) -> None:
    stamp = make_copy / "venv" / ".installed"
    stamp.parent.mkdir()
    stamp.touch()
    past = time.time() - 3600
    for name in ("Makefile", "pyproject.toml", LOCK.name, TEST_LOCK.name):
        os.utime(make_copy / name, (past, past))
    assert make(make_copy, "-q", "venv/.installed").returncode == 0  # up to date: nothing to do
    os.utime(make_copy / changed, None)
    assert make(make_copy, "-q", "venv/.installed").returncode == 1  # out of date: make install reinstalls
