"""The README as a new user reads it: CI runs exactly its test command, and the names it and docs/*.md
write resolve."""

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _command_after(lines: list[str], marker: str) -> str:
    index = next(i for i, line in enumerate(lines) if marker in line)
    return lines[index + 1].strip()


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text().splitlines()
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    readme_command = _command_after(readme, "# 2. install the test extras and run the full test suite")
    assert readme_command.endswith("python -m pytest -n 2 --dist loadscope")  # two pytest-xdist workers
    assert _command_after(ci, "# README test command:") == readme_command


def test_every_dotted_name_the_docs_write_resolves_after_a_plain_import():
    """``subspace_ops.peft.accelerate(model)`` and the like, as README.md and docs/*.md write them,
    work after nothing but ``import subspace_ops`` (submodules load on first access)."""
    import re
    import subprocess
    import sys

    docs = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    names = sorted({m for doc in docs for m in re.findall(r"\bsubspace_ops(?:\.[A-Za-z_][A-Za-z0-9_]*)+",
                                                        doc.read_text())})
    assert len(names) > 20
    # Resolve each as attribute accesses from the top-level module, in a fresh interpreter; a module
    # the docs name as such (`python -m subspace_ops.bench.reproduction`, the extension `_C`) may
    # need its own import, but a name inside one may not.
    code = ("import functools, importlib.util, sys, subspace_ops\n"
            "def is_module(name):\n"
            "    try:\n"
            "        return importlib.util.find_spec(name) is not None\n"
            "    except ImportError:  # a parent that is not a package\n"
            "        return False\n"
            "for name in sys.argv[1:]:\n"
            "    try:\n"
            "        functools.reduce(getattr, name.split('.')[1:], subspace_ops)\n"
            "    except AttributeError as error:\n"
            "        if not is_module(name):\n"
            "            print(name, '->', error)\n")
    done = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout == "", f"names in the docs that do not resolve:\n{done.stdout}"
