"""The docs stay true to the code: every command the README, recipes/README.md and docs/*.md show still runs as
written (the script or module exists, every --flag is one its parser accepts, concrete values are of the flag's
type and among its choices, JSON arguments and config files name real fields, `make` targets exist), every local
path and link they name exists, every documented default equals the code's, and the installed packages meet the
floors of pyproject.toml (which must not fall below what the code needs).

Parsers are read in this process, not by running `--help`: each script runs as `__main__` with no arguments until
its first `parse_known_args`, where it is stopped and its parser kept (once per script). Scripts that build no
parser are never run."""

from __future__ import annotations

import argparse
import ast
import dataclasses
import functools
import glob
import json
import os
import re
import runpy
import shlex
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ["README.md", "recipes/README.md", "model_cards/README.md"] + sorted(
    os.path.relpath(p, ROOT) for p in glob.glob(f"{ROOT}/docs/*.md"))
PLACEHOLDER = "PLACEHOLDER"  # what `<your model>`, `...` and `a|b` alternatives stand for
PROGRAMS = ("python", "python3", "hf-sparse", "make", "accelerate")
# backticked paths that must exist (relative to the repository)
REPO_PATH = re.compile(r"^(?:benchmarks|recipes|hf_sparse|tests|docs|model_cards|\.ci)/[\w./-]*\w/?$")


def _read(rel: str) -> str:
    with open(os.path.join(ROOT, rel), encoding="utf-8") as f:
        return f.read()


# --- the commands the docs show ---------------------------------------------------------------------------
@dataclasses.dataclass
class Command:
    doc: str
    text: str
    tokens: list[str]
    flags_only: bool = False  # a span like `--sparsity 0.75 --repeats 2`: flags of a command shown nearby


def _tokens(text: str) -> list[str]:
    text = re.sub(r"<[^<>]*>", PLACEHOLDER, text)
    try:
        return shlex.split(text, comments=True)
    except ValueError:  # an unbalanced quote in a prose span: plain words
        return text.split()


def _split_chain(tokens: list[str]) -> list[list[str]]:
    out, current = [], []
    for t in tokens:
        if t in ("&&", "||", ";", "|"):
            out.append(current)
            current = []
        else:
            current.append(t)
    return [c for c in out + [current] if c]


def _program(tokens: list[str]) -> list[str] | None:
    """The command without environment assignments, `time` and a venv prefix; None if it is no program we check."""
    i = 0
    while i < len(tokens) and (re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", tokens[i]) or tokens[i] == "time"):
        i += 1
    rest = tokens[i:]
    if not rest:
        return None
    head = re.sub(r"^(?:\.venv/bin/|\$\(BIN\)/)", "", rest[0])
    return [head] + rest[1:] if head in PROGRAMS else None


def doc_commands() -> list[Command]:
    commands = []
    for doc in DOCS:
        text = _read(doc)
        fences = re.findall(r"^[ \t]*```(\w*)\n(.*?)^[ \t]*```", text, re.DOTALL | re.MULTILINE)  # indented too
        for lang, body in fences:
            if lang not in ("bash", "sh", "shell", "console"):
                continue
            for line in body.replace("\\\n", " ").splitlines():
                for chain in _split_chain(_tokens(line.strip())):
                    if _program(chain):
                        commands.append(Command(doc, line.strip(), _program(chain)))
        prose = re.sub(r"^[ \t]*```.*?^[ \t]*```", "", text, flags=re.DOTALL | re.MULTILINE)
        for span in re.findall(r"`([^`]+)`", prose):
            span = " ".join(span.split())
            tokens = _tokens(span)
            if _program(tokens):
                commands.append(Command(doc, span, _program(tokens)))
            elif tokens and tokens[0].startswith("--") and re.fullmatch(r"--[a-z][\w-]*", tokens[0]):
                commands.append(Command(doc, span, tokens, flags_only=True))
    return commands


# --- the parsers of the programs ----------------------------------------------------------------------
class _Stop(Exception):
    def __init__(self, parser):
        super().__init__("parser captured")
        self.parser = parser


def _capture(run) -> argparse.ArgumentParser:
    """Run `run()` until the first `parse_known_args` (argparse and HfArgumentParser both go through it)."""
    import torch

    original = argparse.ArgumentParser.parse_known_args

    def stop(self, *args, **kwargs):
        raise _Stop(self)

    saved = (list(sys.path), list(sys.argv), dict(os.environ), torch.get_num_threads())
    argparse.ArgumentParser.parse_known_args = stop
    try:
        run()
    except _Stop as e:
        return e.parser
    finally:
        argparse.ArgumentParser.parse_known_args = original
        sys.path[:], sys.argv[:] = saved[0], saved[1]
        os.environ.clear()
        os.environ.update(saved[2])
        torch.set_num_threads(saved[3])
    raise AssertionError(f"{run} finished without parsing arguments")


@functools.cache
def script_parser(path: str) -> argparse.ArgumentParser | None:
    """The parser of a script (path relative to the repository), or None if it builds none (takes no flags)."""
    full = os.path.join(ROOT, path)
    source = _read(path)
    if not re.search(r"ArgumentParser|parse_args|import main\b", source):
        return None

    def run():
        sys.argv = [full]
        sys.path.insert(0, os.path.dirname(full))  # as `python path` puts the script's folder first
        runpy.run_path(full, run_name="__main__")

    return _capture(run)


@functools.cache
def hf_sparse_parser(subcommand: str) -> argparse.ArgumentParser:
    from hf_sparse import cli

    return _capture(lambda: cli.main([subcommand]))


@functools.cache
def accelerate_launch_parser() -> argparse.ArgumentParser:
    from accelerate.commands.launch import launch_command_parser

    return launch_command_parser()


@functools.cache
def make_targets() -> frozenset[str]:
    return frozenset(re.findall(r"^([\w.-]+)\s*:", _read("Makefile"), re.MULTILINE))


def _is_placeholder(value: str) -> bool:
    return value == PLACEHOLDER or "..." in value or "|" in value or value.isupper()


def _nargs_values(action: argparse.Action, rest: list[str]) -> int:
    """How many of the following tokens the flag takes."""
    following = 0
    while following < len(rest) and not rest[following].startswith("-"):
        following += 1
    if action.nargs == 0 or (action.nargs is None and isinstance(action.const, bool) and action.type is None
                            and not action.option_strings[0].startswith("--no")) and action.__class__.__name__ in (
            "_StoreTrueAction", "_StoreFalseAction", "_StoreConstAction", "_HelpAction", "_VersionAction",
            "_CountAction", "BooleanOptionalAction"):
        return 0
    if action.nargs is None:
        return min(1, following)
    if action.nargs == "?":
        return min(1, following)
    if action.nargs in ("+", "*", argparse.REMAINDER):
        return following
    return min(int(action.nargs), following)


SPARSE_JSON_FLAGS = ("--sparse_args", "--hf_sparse_args")


def _check_sparse_json(flag: str, value: str, where: str) -> list[str]:
    """A JSON of SparseTrainingArguments / SparseConfig fields (optionally per task: {"cls": {...}, "lm": {...}})."""
    from hf_sparse import SparseConfig, SparseTrainingArguments

    try:
        data = json.loads(value)
    except json.JSONDecodeError:
        return [] if "..." in value else [f"{where}: {flag} {value!r} is not valid JSON"]
    known = {f.name for cls in (SparseTrainingArguments, SparseConfig) for f in dataclasses.fields(cls)}
    errors = []
    for key, item in data.items():
        if isinstance(item, dict):  # per task
            errors += [f"{where}: {flag} names {k!r}, no field of SparseTrainingArguments or SparseConfig"
                       for k in item if k not in known]
        elif key not in known:
            errors.append(f"{where}: {flag} names {key!r}, no field of SparseTrainingArguments or SparseConfig")
    return errors


def check_args(parser: argparse.ArgumentParser, args: list[str], where: str, config_ok: bool = False) -> list[str]:
    """The documented arguments against the parser: flags exist (exactly: no abbreviations), concrete values parse
    and are among the choices, config files exist and name only the parser's fields."""
    errors = []
    options = parser._option_string_actions
    i = 0
    while i < len(args):
        token = args[i]
        if token.startswith("--"):
            flag, _, inline = token.partition("=")
            action = options.get(flag)
            if action is None:
                errors.append(f"{where}: {flag} is not an argument of this command")
                i += 1
                continue
            n = 0 if inline else _nargs_values(action, args[i + 1:])
            values = [inline] if inline else args[i + 1: i + 1 + n]
            for value in values:
                if _is_placeholder(value):
                    continue
                if flag in SPARSE_JSON_FLAGS:
                    errors += _check_sparse_json(flag, value, where)
                    continue
                try:
                    converted = action.type(value) if callable(action.type) else value
                except Exception as e:  # noqa: BLE001 - any failure of the flag's own type
                    errors.append(f"{where}: {flag} {value!r} is not a valid value ({e})")
                    continue
                if action.choices is not None and converted not in action.choices:
                    errors.append(f"{where}: {flag} {value!r} is not one of {list(action.choices)}")
            i += 1 + n
        elif token.endswith((".json", ".yaml", ".yml")) and config_ok:
            errors += check_config_file(parser, token, where)
            if len(args) > 1:  # recipe_utils.parse_args reads a config file only as the one argument
                errors.append(f"{where}: a config file is read only when it is the script's one argument")
            i += 1
        elif _is_placeholder(token):
            i += 1
        else:
            errors.append(f"{where}: unexpected argument {token!r}")
            i += 1
    return errors


def check_config_file(parser: argparse.ArgumentParser, path: str, where: str) -> list[str]:
    full = os.path.join(ROOT, path)
    if not os.path.isfile(full):
        return [f"{where}: config file {path} does not exist"]
    if path.endswith(".json"):
        data = json.loads(_read(path))
    else:
        import yaml

        data = yaml.safe_load(_read(path))
    dests = {a.dest for a in parser._actions}
    return [f"{where}: {path} sets {key!r}, which the script does not take" for key in data if key not in dests]


def check_command(cmd: Command) -> tuple[list[str], list[argparse.ArgumentParser]]:
    """(errors, the parsers the command uses)."""
    where = f"{cmd.doc}: `{cmd.text}`"
    tokens = cmd.tokens
    program = tokens[0]
    if program == "make":
        targets = [t for t in tokens[1:] if not t.startswith("-") and "=" not in t]
        return [f"{where}: make target {t!r} is not in the Makefile" for t in targets if t not in make_targets()], []
    if program == "hf-sparse":
        scripts = _read("pyproject.toml")
        if not re.search(r'^hf-sparse\s*=\s*"hf_sparse\.cli:main"', scripts, re.MULTILINE):
            return [f"{where}: pyproject.toml has no hf-sparse console script"], []
        if len(tokens) < 2 or tokens[1].startswith("-"):
            return [], []
        if tokens[1] not in ("bench", "prune"):
            return [f"{where}: hf-sparse has no subcommand {tokens[1]!r}"], []
        parser = hf_sparse_parser(tokens[1])
        return check_args(parser, tokens[2:], where), [parser]
    errors, parsers = [], []
    if program == "accelerate":
        if tokens[1:2] != ["launch"]:
            return [f"{where}: only `accelerate launch` is checked"], []
        launch = accelerate_launch_parser()
        parsers.append(launch)
        split = next((i for i, t in enumerate(tokens) if t.endswith(".py")), None)
        if split is None:
            return ([f"{where}: no script after `accelerate launch`"] if len(tokens) > 2 else []), parsers
        errors += check_args(launch, tokens[2:split], where)
        for i, t in enumerate(tokens[2:split]):
            if t == "--config_file" and not os.path.isfile(os.path.join(ROOT, tokens[2 + i + 1])):
                errors.append(f"{where}: {tokens[2 + i + 1]} does not exist")
        tokens = ["python"] + tokens[split:]
    # python ...
    if len(tokens) < 2:
        return errors, parsers
    if tokens[1] == "-c":
        return errors, parsers
    if tokens[1] == "-m":
        import importlib.util

        if importlib.util.find_spec(tokens[2]) is None:
            errors.append(f"{where}: module {tokens[2]} does not exist")
        return errors, parsers
    script = tokens[1]
    if not os.path.isfile(os.path.join(ROOT, script)):
        return errors + [f"{where}: {script} does not exist"], parsers
    parser = script_parser(script)
    if parser is None:
        args = [t for t in tokens[2:] if not _is_placeholder(t)]
        return errors + ([f"{where}: {script} takes no arguments, the docs pass {args}"] if args else []), parsers
    return errors + check_args(parser, tokens[2:], where, config_ok=True), parsers + [parser]


def test_every_documented_command_and_flag_exists():
    commands = doc_commands()
    assert len([c for c in commands if not c.flags_only]) > 50  # the parsing found the docs' commands
    errors, parsers_of_doc = [], {}
    for cmd in commands:
        if not cmd.flags_only:
            found, parsers = check_command(cmd)
            errors += found
            parsers_of_doc.setdefault(cmd.doc, []).extend(parsers)
    # a span of flags alone belongs to a command shown in the same document: one of its parsers takes them
    for cmd in commands:
        if cmd.flags_only:
            parsers = parsers_of_doc.get(cmd.doc) or [p for ps in parsers_of_doc.values() for p in ps]
            results = [check_args(p, cmd.tokens, f"{cmd.doc}: `{cmd.text}`") for p in parsers]
            if results and all(results):
                errors.append(min(results, key=len)[0] + " (of no command shown in this document)")
    assert not errors, "\n".join(errors)


def test_every_path_and_link_in_the_docs_exists():
    missing = []
    for doc in DOCS:
        text = _read(doc)
        for span in re.findall(r"`([^`\n]+)`", text):
            for token in span.split():
                token = token.strip("(),;:'\"")
                if REPO_PATH.match(token) and not os.path.exists(os.path.join(ROOT, token)):
                    missing.append(f"{doc}: `{token}`")
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target) or target.startswith("#"):
                continue
            path = os.path.normpath(os.path.join(ROOT, os.path.dirname(doc), target.split("#")[0]))
            if not os.path.exists(path):
                missing.append(f"{doc}: link {target}")
    assert not missing, "\n".join(missing)


# --- documented defaults ----------------------------------------------------------------------------------
def _field_defaults(cls) -> dict:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def _value(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def test_the_training_arguments_docstring_states_the_code_defaults():
    """`name (`type`, defaults to `X`)` in SparseTrainingArguments' docstring: every such name is a field with
    that default, and every structure field of the class is documented."""
    from transformers import TrainingArguments

    from hf_sparse import SparseTrainingArguments

    defaults = _field_defaults(SparseTrainingArguments)
    documented = {}
    pattern = r"^\s*([\w /]+?) \(`[^`]+`, defaults to (`[^)]*`)\):"
    for names, values in re.findall(pattern, SparseTrainingArguments.__doc__,
                                    re.MULTILINE):
        names = [n.strip() for n in names.split("/")]
        values = [v.strip().strip("`") for v in values.split("/")]
        assert len(names) == len(values), (names, values)
        documented.update(zip(names, values))
    errors = [f"{n}: documented default {v}, not a field" if n not in defaults else
              f"{n}: documented default {v}, the code's {defaults[n]!r}" for n, v in documented.items()
              if n not in defaults or _value(v) != defaults[n]]
    own = set(defaults) - {f.name for f in dataclasses.fields(TrainingArguments)}
    errors += [f"{n}: a field of SparseTrainingArguments with no documented default"
               for n in sorted(own - set(documented))]
    assert len(documented) > 15 and not errors, "\n".join(errors)


def _defaults_tables(doc: str) -> list[tuple[str, str]]:
    """Rows `| `name` | `value` | ...` of the tables whose header starts `| argument | default |`."""
    rows, inside = [], False
    for line in _read(doc).splitlines():
        if re.match(r"\|\s*argument\s*\|\s*default\s*\|", line, re.IGNORECASE):
            inside = True
        elif inside and line.startswith("|"):
            m = re.match(r"\|\s*`([^`]+)`\s*\|\s*`([^`]+)`\s*\|", line)
            if m:
                rows.append((m.group(1), m.group(2)))
        else:
            inside = False
    return rows


@pytest.mark.parametrize("doc", ["README.md", "recipes/README.md"])
def test_the_defaults_tables_state_the_code_defaults(doc):
    """README: `SparseConfig.x` / `SparseTrainingArguments.x`; recipes/README.md: `script.py --flag` (the parser's
    default, the recipe's own dataclass defaults included)."""
    from hf_sparse import SparseConfig, SparseTrainingArguments

    classes = {cls.__name__: _field_defaults(cls) for cls in (SparseConfig, SparseTrainingArguments)}
    rows = _defaults_tables(doc)
    assert len(rows) >= 5, f"{doc} has no defaults table"
    errors = []
    for name, value in rows:
        if " --" in name:
            script, flag = name.split(" --")
            path = script if os.path.isfile(os.path.join(ROOT, script)) else os.path.join("recipes", script)
            parser = script_parser(path)
            action = parser._option_string_actions.get(f"--{flag}") if parser else None
            if action is None:
                errors.append(f"{doc}: {name}: no such flag")
                continue
            code = action.default
        else:
            cls, _, field = name.partition(".")
            if cls not in classes or field not in classes[cls]:
                errors.append(f"{doc}: {name}: no such field")
                continue
            code = classes[cls][field]
        if _value(value) != code:
            errors.append(f"{doc}: {name} documented as {value}, the code's default is {code!r}")
    assert not errors, "\n".join(errors)


# --- versions ---------------------------------------------------------------------------------------------
def _dependencies() -> list[str]:
    try:
        import tomllib
    except ImportError:  # Python 3.10: the list itself, read plainly
        block = re.search(r"^dependencies = \[(.*?)^\]", _read("pyproject.toml"), re.DOTALL | re.MULTILINE).group(1)
        return re.findall(r'"([^"]+)"', block)
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)["project"]["dependencies"]


def test_installed_packages_meet_the_floors_and_the_floors_what_the_code_needs():
    from importlib.metadata import version

    from packaging.requirements import Requirement
    from packaging.version import Version

    floors, errors = {}, []
    for line in _dependencies():
        req = Requirement(line)
        floor = [s.version for s in req.specifier if s.operator == ">="]
        if not floor:
            errors.append(f"{req.name}: no floor (>=) in pyproject.toml")
            continue
        floors[req.name.lower().replace("_", "-")] = Version(floor[0])
        installed = Version(version(req.name))
        if not req.specifier.contains(installed, prereleases=True):
            errors.append(f"{req.name} {installed} is installed (tested) but pyproject.toml asks {req.specifier}")
    assert not errors, "\n".join(errors)
    # SparseTrainer reads Trainer.loss_is_scaled_for_ga (hf_sparse/trainer.py, _forward_loss), which transformers
    # first shipped in 5.19: below that the no-grad losses of a search step are normalised wrongly or it fails.
    import transformers

    assert hasattr(transformers.Trainer, "loss_is_scaled_for_ga")
    assert floors["transformers"] >= Version("5.19"), (
        f"transformers>={floors['transformers']} allows versions without Trainer.loss_is_scaled_for_ga")
