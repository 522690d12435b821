"""Tests: the documentation (docs/) and the README cannot drift from the code.

- the configuration page documents every key of ``flask_executor._KEYS``, no other, and
  each with the default the code applies;
- one supported Python range everywhere: README, docs, setup.py's classifiers, noxfile;
- the README's quick start runs (its test-mode example included), and its stored-futures
  example answers an unknown key with a 404;
- the docs build with warnings as errors and every reference resolved, and every example
  of the guide pages runs (``sphinx-build -b doctest``); Sphinx and the Pallets theme come
  with the ``test`` extra. (The tested examples under docs/examples/ have their own tests,
  which pytest collects beside this file.)
"""

import ast
import dataclasses
import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

import flask_executor


def docs_find_repo():
    """The checkout: the first folder up from this file that holds setup.py and the module."""
    for folder in Path(__file__).resolve().parents:
        if (folder / "setup.py").exists() and (folder / "flask_executor.py").exists():
            return folder
    raise RuntimeError("no checkout of Flask-Executor above " + __file__)


DOCS_REPO = docs_find_repo()
DOCS = DOCS_REPO / "docs"
DOCS_PYTHON_RANGE = ("3.10", "3.13")
# Warnings are errors, every one reported, and every reference must resolve.
DOCS_STRICT = ("-W", "--keep-going", "-n", "-q")


def docs_configuration_entries():
    """Each ``.. confval::`` of the configuration page: name -> the text of its ``:default:``."""
    text = (DOCS / "configuration.rst").read_text(encoding="utf-8")
    entries = {}
    for match in re.finditer(r"^\.\. confval:: (\S+)\n((?:   :\w+:.*\n)*)", text, re.MULTILINE):
        name, options = match.groups()
        assert name not in entries, f"{name} is documented twice"
        default = re.search(r"^   :default: (.*)$", options, re.MULTILINE)
        entries[name] = default.group(1).strip() if default else None
    return entries


def docs_code_default(key):
    """What ``_read_config`` applies for an unset key (without its ``EXECUTOR_`` prefix)."""
    config = flask_executor._read_config({}, "")
    field = "kind" if key == "TYPE" else key.lower()
    return getattr(config, field)


def test_docs_configuration_page_documents_every_key_and_no_other():
    documented = set(docs_configuration_entries())
    known = {"EXECUTOR_" + key for key in flask_executor._KEYS}
    assert documented - known == set(), "documented, but not read by the code"
    assert known - documented == set(), "read by the code, but not documented"


@pytest.mark.parametrize("key", flask_executor._KEYS)
def test_docs_configuration_defaults_are_the_code_defaults(key):
    default = docs_configuration_entries().get("EXECUTOR_" + key)
    assert default is not None, f"EXECUTOR_{key} has no :default: on the configuration page"
    literal = re.fullmatch(r"``(.+)``", default)
    assert literal, f"the default of EXECUTOR_{key} must be one Python literal in ``...``: {default!r}"
    stated = ast.literal_eval(literal.group(1))
    actual = docs_code_default(key)
    assert stated == actual and type(stated) in (type(actual), int), (key, stated, actual)


@pytest.mark.parametrize("key", flask_executor._KEYS)
def test_docs_configuration_defaults_set_explicitly_change_nothing(key):
    """The stated default, set as a value, configures what leaving the key out does."""
    stated = ast.literal_eval(docs_configuration_entries()["EXECUTOR_" + key].strip("`"))
    unset = flask_executor._read_config({}, "")
    explicit = flask_executor._read_config({"EXECUTOR_" + key: stated}, "")
    assert dataclasses.replace(explicit, app_key="") == dataclasses.replace(unset, app_key="")


def test_docs_api_page_documents_every_public_name():
    text = (DOCS / "api.rst").read_text(encoding="utf-8")
    documented = re.findall(r"^\.\. auto(?:class|function|exception|data):: (\w+)", text, re.MULTILINE)
    assert sorted(documented) == sorted(flask_executor.__all__)


def test_docs_python_range_is_the_same_everywhere():
    low, high = DOCS_PYTHON_RANGE
    stated = f"Python {low} to {high}"
    for page in ("README.rst", "docs/index.rst", "docs/quickstart.rst"):
        text = " ".join((DOCS_REPO / page).read_text(encoding="utf-8").split())
        assert stated in text, f"{page} does not say {stated!r}"
        for other in re.findall(r"Python 3\.\d+ to 3\.\d+", text):
            assert other == stated, f"{page} says {other!r}"
    setup = (DOCS_REPO / "setup.py").read_text(encoding="utf-8")
    classifiers = re.findall(r"Programming Language :: Python :: (3\.\d+)", setup)
    minors = [int(version.split(".")[1]) for version in classifiers]
    assert minors == list(range(int(low.split(".")[1]), int(high.split(".")[1]) + 1))
    assert f'python_requires=">={low}"' in setup
    noxfile = (DOCS_REPO / "noxfile.py").read_text(encoding="utf-8")
    assert f'PYTHONS = ["{low}", "3.11", "3.12", "{high}"]' in noxfile


def docs_readme_quick_start():
    """The literal blocks of the README's Quick start section, as one program."""
    readme = (DOCS_REPO / "README.rst").read_text(encoding="utf-8")
    section = readme.split("\nQuick start\n-----------\n", 1)[1].split("\n-----", 1)[0]
    blocks = re.findall(r"::\n\n((?:(?:    .*)?\n)+)", section)
    assert len(blocks) == 3, "the quick start, stored futures and test mode"
    return "\n".join("\n".join(line[4:] for line in block.splitlines()) for block in blocks)


def test_docs_readme_quick_start_runs():
    namespace = {"__name__": "readme_quick_start"}
    exec(compile(docs_readme_quick_start(), "README.rst (Quick start)", "exec"), namespace)
    app, executor = namespace["app"], namespace["executor"]
    client = app.test_client()

    key = client.post("/reports/2026-11").json["key"]
    executor.futures.result(key, timeout=10)
    assert client.get(f"/reports/{key}").json == {"state": "done", "report": "report for 2026-11"}
    assert client.get(f"/reports/{key}").status_code == 404  # popped
    assert client.get("/reports/no-such-key").status_code == 404

    # Its test-mode example: EXECUTOR_TYPE set before binding, so the task runs inline.
    namespace["test_signup_sends_the_welcome_mail"]()
    assert executor._config.kind == "sync"


def test_docs_readme_test_mode_sets_the_type_before_binding():
    program = docs_readme_quick_start()
    test = program[program.index("def test_signup") :]
    assert test.index('["EXECUTOR_TYPE"] = "sync"') < test.index("init_app(app)")


def docs_sphinx_build(builder, output):
    for module in ("sphinx", "pallets_sphinx_themes"):
        assert importlib.util.find_spec(module) is not None, f"{module} is missing: pip install -e '.[test]'"
    return subprocess.run(
        [sys.executable, "-m", "sphinx", *DOCS_STRICT, "-b", builder, str(DOCS), str(output)],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.mark.timeout(300)
def test_docs_build_without_warnings_or_broken_references(tmp_path):
    result = docs_sphinx_build("html", tmp_path / "html")
    assert result.returncode == 0, result.stdout + result.stderr
    assert (tmp_path / "html" / "index.html").exists()


@pytest.mark.timeout(300)
def test_docs_every_example_of_the_guide_runs(tmp_path):
    result = docs_sphinx_build("doctest", tmp_path / "doctest")
    report = (tmp_path / "doctest" / "output.txt").read_text(encoding="utf-8")
    assert result.returncode == 0, report + result.stderr
    assert re.search(r"^\s+0 failures in tests$", report, re.MULTILINE), report
