"""The README's Python example runs unchanged, and its two set-up commands are the Makefile's targets."""

import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def readme():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        return f.read()


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    section = readme().split("## In Python", 1)[1]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace = {"__name__": "__readme__"}
    exec(compile(code, "README.md", "exec"), namespace)
    report = namespace["sparsity_report"](namespace["model"])
    assert abs(report.sparsity - 0.5) < 0.01
    assert "prunable parameters kept" in capsys.readouterr().out
    assert os.path.isfile(tmp_path / "outputs" / "example" / "model" / "config.json")


def test_readme_setup_commands_match_ci():
    text = readme()
    assert "make run" in text and "make test" in text
    with open(os.path.join(ROOT, ".ci", "run")) as f:
        assert "make test" in f.read()
    with open(os.path.join(ROOT, "Makefile")) as f:
        makefile = f.read()
    assert re.search(r"^run:", makefile, re.M) and re.search(r"^test:", makefile, re.M)
    assert "recipes/text_classification.py" in makefile
