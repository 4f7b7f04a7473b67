"""The documentation site builds with --strict, names no file outside the repository, and quotes the
set-up commands that CI and the main job really run."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
README = ROOT / "README.md"
GETTING_STARTED = DOCS / "getting-started" / "fresh-machine.md"
# top-level folders of the repository whose files the pages name in backticks
REPO_DIRS = ("src", "tests", "bench", "deploy", "pipelines", "scripts", "configs", "mlflow", "docs", ".ci")


def pages() -> list[Path]:
    return [README, ROOT / "mkdocs.yml", *sorted(p for p in DOCS.rglob("*.md"))]


def bash_blocks(path: Path) -> list[list[str]]:
    """The lines of each ```bash block, comments and blank lines dropped."""
    blocks = re.findall(r"```bash\n(.*?)```", path.read_text(), flags=re.S)
    return [[line.split(" #")[0].strip() for line in b.splitlines()
             if line.strip() and not line.lstrip().startswith("#")] for b in blocks]


def test_site_builds_strict_with_the_exported_openapi_schema(tmp_path):
    site = tmp_path / "site"
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "RAY_USAGE_STATS_ENABLED": "0"}
    built = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                            str(ROOT / "mkdocs.yml"), "--site-dir", str(site)],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert built.returncode == 0, built.stderr[-4000:]
    from plantad.serving.app import app

    assert json.loads((site / "reference" / "openapi.json").read_text()) == json.loads(json.dumps(app.openapi()))
    html = [p.read_text() for p in site.rglob("*.html")]
    assert len(html) >= len(list(DOCS.rglob("*.md")))
    assert not [h for h in html if "fonts.googleapis.com" in h or "fonts.gstatic.com" in h], \
        "the theme loads Google Fonts: the site must build and read offline (theme.font: false)"


def test_no_page_names_a_file_outside_the_repository():
    outside = re.compile(r"\.\./shared|/work/|\b(METHOD|STYLE|STACK)\.md\b")
    for page in pages():
        text = page.read_text()
        assert not outside.search(text), f"{page.relative_to(ROOT)} names a file outside the repository: " \
                                         f"{outside.search(text).group(0)}"
        for link in re.findall(r"\]\(([^)#\s]+)", text):
            if re.match(r"[a-z]+:", link):
                continue
            target = (page.parent / link).resolve()
            assert target.is_relative_to(ROOT), f"{page.relative_to(ROOT)} links outside the repository: {link}"


def test_every_repository_file_a_page_names_exists():
    token = re.compile(r"`((?:%s)/[\w./-]*)`" % "|".join(re.escape(d) for d in REPO_DIRS))
    missing = [(page.relative_to(ROOT), path) for page in pages() for path in token.findall(page.read_text())
               if not (ROOT / path.rstrip("/")).exists()]
    assert not missing, f"pages name repository files that do not exist: {missing}"


def test_readme_set_up_commands_are_what_ci_and_the_main_job_run():
    readme = bash_blocks(README)[0]
    assert readme == ["bash scripts/main.sh", "bash scripts/test.sh"]
    assert bash_blocks(GETTING_STARTED)[0] == readme, "the getting-started page quotes other set-up commands"
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.startswith("exec ")]
    assert ci == ["exec bash scripts/test.sh"], ".ci/run no longer runs the README's test command"
    assert "main job" in (ROOT / "scripts" / "main.sh").read_text().splitlines()[1].lower()
    for script in ("main.sh", "test.sh"):  # both create .venv the first time, as the README says
        assert "bash scripts/setup.sh" in (ROOT / "scripts" / script).read_text()


def test_commands_in_readme_and_getting_started_exist():
    """Every `bash scripts/...` names a script; every plantad command parses with the real CLI parser;
    the curl line is the one the main job prints."""
    from plantad.cli import build_parser

    main_sh = (ROOT / "scripts" / "main.sh").read_text()
    printed_curl = [re.escape(m).replace(r"\$", "$") for m in re.findall(r"echo \"\s*(curl [^\"]+)\"", main_sh)]
    printed_curl = [re.sub(r"\$(\w+|\{\w+\})", r"\\S+", p) for p in printed_curl]
    makefile = (ROOT / "Makefile").read_text()
    text = README.read_text() + GETTING_STARTED.read_text()
    for script in re.findall(r"bash (scripts/[\w.-]+\.sh)", text):
        assert (ROOT / script).is_file(), f"the docs run {script}, which does not exist"
    for target in re.findall(r"make ([\w-]+)", text):
        assert re.search(rf"^{re.escape(target)}:", makefile, flags=re.M), f"no make target {target}"
    for page in (README, GETTING_STARTED):
        for line in (line for block in bash_blocks(page) for line in block):
            argv = shlex.split(line)
            if argv[0] in ("plantad", ".venv/bin/plantad"):
                try:
                    build_parser().parse_args(argv[1:])
                except SystemExit:
                    raise AssertionError(f"{page.name}: `{line}` does not parse with plantad's CLI") from None
            if argv[0] == "curl" and "/score" in line:
                assert any(re.fullmatch(p, line) for p in printed_curl), \
                    f"{page.name}: `{line}` is not the curl line scripts/main.sh prints"
    for inline in re.findall(r"`(\.venv/bin/plantad [^`]+)`", text):
        try:
            build_parser().parse_args(shlex.split(inline)[1:])
        except SystemExit:
            raise AssertionError(f"`{inline}` does not parse with plantad's CLI") from None


def test_every_benchmark_table_names_its_command_machine_and_date():
    record = re.compile(r"^\*Command:\* .+ · \*Machine:\* .+ · \*Recorded:\* \d{4}-\d{2}-\d{2}.*, commits? \w+")
    for page in sorted((DOCS / "benchmarks").glob("*.md")):
        if page.name == "index.md":
            continue
        lines = page.read_text().splitlines()
        ends = [i for i, line in enumerate(lines) if line.startswith("|")
                and (i + 1 == len(lines) or not lines[i + 1].startswith("|"))]
        assert ends, f"{page.name} has no table"
        for end in ends:
            after = next((line for line in lines[end + 1:] if line.strip()), "")
            assert record.match(after), f"{page.name}: the table ending at line {end + 1} is not followed by " \
                                        f"its *Command:* · *Machine:* · *Recorded:* line"
