"""The repository keeps its promises to a newcomer."""
import re
import subprocess
import sys

from tests.conftest import ROOT

SCRIPTS = ["model.py", "train.py", "calibrate.py", "inference_example.py", "bench.py", "demo.py",
           "scripts/card_recipe.py", "scripts/generated/evaluate.py"]


def test_ci_runs_exactly_the_readme_commands():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    test_command = "pip install -r requirements-test.txt && python -m pytest -q"
    assert f"    {test_command}\n" in readme
    assert test_command in ci and "pip install -r requirements.txt" in ci


def test_every_script_documents_how_to_run_it():
    # every --help at once: each is mostly interpreter and torch start-up
    helps = {name: subprocess.Popen([sys.executable, name, "--help"], cwd=ROOT, stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True) for name in SCRIPTS}
    for name, proc in helps.items():
        source = (ROOT / name).read_text(encoding="utf-8")
        docstring = re.match(r'\s*"""(.*?)"""', source, re.S)
        assert docstring and f"python {name}" in docstring.group(1), name
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0 and "usage:" in out, (name, err)


def test_readme_pictures_exist():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    pictures = re.findall(r"(docs/[\w.-]+\.png)", readme)
    assert len(pictures) >= 4
    for p in pictures:
        assert (ROOT / p).stat().st_size > 1000, p
