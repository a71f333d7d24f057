"""Every command of README.md and docs/*.md, run as written, in the order shown, in a fresh copy of the repository.

Each page gets its own copy (the files a fresh clone has), and its fenced blocks run there one after the other:
```bash blocks through `bash -e`, ```python blocks as a script. A block whose first line is a comment saying "not
run by CI" needs what CI has not (SD's weights, a GPU, a server that runs until Ctrl-C): skipped, with that line as
the reason. Three changes, the same for every block: `pip install` is left out (CI installed every extra with
`.[test]`), so is `pytest` (the suite that runs this test), and trainings stop after 2 steps (`max_steps=2` appended
to `python train_unet.py` and `python train_vae.py` lines). Blocks that train or evaluate take a minute or more
on 2 CPU cores: marked `slow`.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"^```(bash|python)\n(.*?)^```", re.S | re.M)
NOT_RUN = "not run by CI"
TRAINING = re.compile(r"^python (train_unet|train_vae)\.py ")
SHORT_TRAINING = "max_steps=2"
SLOW = re.compile(r"^python (train_unet\.py|train_vae\.py|-m ldm\.eval|-m ldm\.eval_vae) ", re.M)


def blocks():
    """(page, language, text) of every fenced block, in page order: the marked ones skipped with their reason,
    trainings and evaluations slow."""
    for page in PAGES:
        for n, (language, text) in enumerate(BLOCK.findall(page.read_text(encoding="utf-8"))):
            first = text.splitlines()[0]
            marks = [pytest.mark.skip(reason=first.lstrip("# "))] if first.startswith("#") and NOT_RUN in first else []
            marks += [pytest.mark.slow] if SLOW.search(text) else []
            yield pytest.param(page, language, text, id=f"{page.relative_to(ROOT)}-{n}", marks=marks)


def as_run(script: str) -> str:
    """A shell block as the test runs it: continuation lines joined, `pip install` and `pytest` left out of each
    `&&` chain, `max_steps=2` added to trainings (before a trailing comment)."""
    lines = []
    for line in script.replace("\\\n", " ").splitlines():
        kept = [c for c in line.split(" && ") if not c.lstrip().startswith("pip install") and c.strip() != "pytest"]
        line = " && ".join(kept)
        if TRAINING.match(line):
            line = re.sub(r"(\s+#.*)?$", rf" {SHORT_TRAINING}\1", line, count=1)
        lines.append(line)
    return "\n".join(lines)


def fresh_copy(dest: Path) -> Path:
    """The repository's files as a fresh clone has them (git's tracked files and those it does not ignore)."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    )
    for name in filter(None, listed.stdout.decode().split("\0")):
        if (ROOT / name).is_file():  # a tracked file deleted in the work tree is not copied
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    return dest


@pytest.fixture(scope="module")
def copies(tmp_path_factory):
    """One fresh copy per page, made when its first block runs."""
    made = {}

    def copy_for(page: Path) -> Path:
        if page not in made:
            made[page] = fresh_copy(tmp_path_factory.mktemp(page.stem))
        return made[page]

    return copy_for


@pytest.mark.parametrize("page, language, text", blocks())
def test_the_command_runs_as_written(page, language, text, copies):
    cwd = copies(page)
    command = ["bash", "-euo", "pipefail", "-c", as_run(text)] if language == "bash" else [sys.executable, "-c", text]
    env = {
        **os.environ,
        "PYTHONPATH": str(cwd),  # `python docs/x.py` and snippets import this copy's ldm
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",  # `python` is this interpreter
    }
    r = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, f"{page.name}:\n{text}\nexit code {r.returncode}\n{(r.stdout + r.stderr)[-3000:]}"
