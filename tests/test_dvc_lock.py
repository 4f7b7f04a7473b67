"""`plantad lock`: a dvc.lock damaged by a crash during DVC's in-place write is found the way DVC
finds it, and repaired without losing anything (real git and DVC on a two-stage project)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from plantad.cli import main
from plantad.dvc_lock import check_lock, lock_problem

BIN = Path(sys.executable).parent
DVC_YAML = """stages:
  first:
    cmd: python -c "open('a.txt', 'w').write('one')"
    outs: [a.txt]
  second:
    cmd: python -c "open('b.txt', 'w').write(open('a.txt').read() + ' two')"
    deps: [a.txt]
    outs: [b.txt]
"""


def run(project: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "DVC_NO_ANALYTICS": "1"}
    return subprocess.run(list(args), cwd=project, env=env, capture_output=True, text=True, timeout=120, check=check)


@pytest.fixture
def project(tmp_path: Path) -> Path:
    root = tmp_path / "project"
    root.mkdir()
    run(root, "git", "init", "-q")
    run(root, "git", "config", "user.email", "ci@example.com")
    run(root, "git", "config", "user.name", "ci")
    run(root, "dvc", "init", "-q")
    (root / "dvc.yaml").write_text(DVC_YAML)
    run(root, "dvc", "repro", "-q")
    return root


def commit(project: Path) -> None:
    run(project, "git", "add", "-A")
    run(project, "git", "commit", "-q", "-m", "pipeline ran")


def test_the_check_refuses_exactly_what_dvc_refuses(project: Path) -> None:
    good = (project / "dvc.lock").read_text()
    assert lock_problem(good) is None and check_lock(project).problem is None
    damaged = {
        "missing key": good.replace("    cmd: ", "    command: ", 1),
        "not yaml": good[: good.index("outs:")] + "outs: [\n",
        "empty": "",
    } | {f"cut at {n}": good[:n] for n in (40, len(good) // 2, len(good) - 30)}
    for what, text in damaged.items():
        (project / "dvc.lock").write_text(text)
        dvc_reads = run(project, "dvc", "status", check=False).returncode == 0
        assert (lock_problem(text) is None) == dvc_reads, (what, lock_problem(text), text)
    (project / "dvc.lock").write_text(damaged["missing key"])
    assert "fails DVC's lock-file schema" in (check_lock(project).problem or "")


def test_repair_restores_the_committed_lock_and_keeps_the_damaged_file(project: Path, capsys) -> None:
    commit(project)
    damaged = (project / "dvc.lock").read_text().replace("    cmd: ", "    command: ", 1)
    (project / "dvc.lock").write_text(damaged)
    assert run(project, "dvc", "status", check=False).returncode != 0  # DVC itself stops here

    assert main(["lock", "--project", str(project)]) == 1
    err = capsys.readouterr().err
    assert "dvc.lock is damaged: it fails DVC's lock-file schema" in err and "--repair" in err
    assert (project / "dvc.lock").read_text() == damaged  # a check alone changes nothing

    assert main(["lock", "--project", str(project), "--repair"]) == 0
    assert "restored from git HEAD" in capsys.readouterr().out
    kept = list(project.glob("dvc.lock.damaged-*"))
    assert len(kept) == 1 and kept[0].read_text() == damaged
    assert run(project, "dvc", "status").returncode == 0
    run(project, "dvc", "repro", "-q")
    assert (project / "b.txt").read_text() == "one two"


def test_without_a_commit_the_valid_stages_are_kept_and_the_others_rerun(project: Path) -> None:
    lock = (project / "dvc.lock").read_text()
    cut = lock[: lock.index("  second:") + len("  second:\n    cmd:")]  # the write ended mid-entry
    (project / "dvc.lock").write_text(cut)
    report = check_lock(project, repair=True)
    assert report.repaired_from == "the valid stage entries" and report.kept is not None
    assert report.kept.read_text() == cut
    repro = run(project, "dvc", "repro")
    assert "Stage 'first' didn't change, skipping" in repro.stdout
    # the entry that was lost is rebuilt: the stage runs again, or comes back from DVC's run cache
    assert "Running stage 'second'" in repro.stdout or "Stage 'second' is cached" in repro.stdout
    assert run(project, "dvc", "status").stdout.strip() == "Data and pipelines are up to date."
    assert (project / "b.txt").read_text() == "one two"
    assert check_lock(project).problem is None


def test_a_healthy_or_missing_lock_is_left_alone(project: Path, tmp_path: Path, capsys) -> None:
    before = (project / "dvc.lock").read_bytes()
    assert check_lock(project, repair=True).repaired_from is None
    assert main(["lock", "--project", str(project), "--repair", "--quiet"]) == 0
    assert capsys.readouterr().out == ""
    assert (project / "dvc.lock").read_bytes() == before and not list(project.glob("dvc.lock.damaged-*"))
    empty = tmp_path / "empty"
    empty.mkdir()
    assert check_lock(empty, repair=True).problem is None and not (empty / "dvc.lock").exists()
