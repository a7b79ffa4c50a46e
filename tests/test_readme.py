"""The README's quickstart, checked. `.ci/run` runs its code block as written in a fresh venv (this
file prints the block: `python tests/test_readme.py`, stdlib only); here, the block has the promised
shape (install lines, then one sample command and the test command), and the sample command, run as
written, prints what the README says it prints."""
import os
import re
import shlex
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")


def quickstart_block(kind="bash", path=README):
    """-> the text of the first ```kind code block under the README's "## Quickstart" heading."""
    with open(path, encoding="utf-8") as f:
        section = f.read().split("\n## Quickstart", 1)[1]
    return section.split(f"```{kind}\n", 1)[1].split("\n```", 1)[0]


def quickstart_commands():
    """-> [installs, other commands], each command a token list (comments dropped)."""
    cmds = [c for c in (shlex.split(line, comments=True) for line in quickstart_block().splitlines()) if c]
    installs = [c for c in cmds if c[:2] == ["pip", "install"]]
    return installs, cmds[len(installs):]


def test_quickstart_is_install_then_sample_then_tests():
    installs, rest = quickstart_commands()
    assert installs and installs[0][2].startswith("torch==")  # torch pinned first
    assert "requirements.txt" in installs[-1] and "requirements-dev.txt" in installs[-1]
    assert len(rest) == 2, rest
    assert rest[0][:2] == ["python", "sample.py"] and rest[1] == ["python", "-m", "pytest", "-q", "tests"]


def test_quickstart_sample_prints_what_the_readme_says(tmp_path):
    sample = quickstart_commands()[1][0]
    if not os.path.isdir(os.path.join(ROOT, "checkpoints", "shapes")):
        import pytest
        pytest.skip("no shipped checkpoint in this checkout")
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}  # sample.py's own default
    # as written, from a directory of its own so samples/ lands there
    r = subprocess.run([sys.executable, os.path.join(ROOT, sample[1]), *sample[2:]], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    got, want = r.stdout.strip().splitlines(), quickstart_block("text").splitlines()
    # the first line holds timings: compare it with its numbers blanked
    def blank(s):
        return re.sub(r"\d+\.\d+ s|\d+\.\d+ positions/s", "#", s)
    assert blank(got[0]) == blank(want[0]) and got[1:] == want[1:], r.stdout
    assert (tmp_path / "samples" / "grid.png").is_file()


def test_readme_stays_a_users_guide():
    with open(README, encoding="utf-8") as f:
        text = f.read()
    assert text.count("\n") <= 250
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        assert os.path.getsize(os.path.join(ROOT, image)) < 300_000, image


if __name__ == "__main__":
    print(quickstart_block())
