"""The recipe pages (docs/recipes/) show code only by including it from the examples: every
inclusion must find its file, and in it the object or the lines it names."""

import ast
import os
import re

import pytest
from servers import HERE, REPO_ROOT

PAGES = os.path.join(REPO_ROOT, "docs", "recipes")
# The examples each page must show: every recipe module is on a page.
RECIPES = {
    "signup-email.rst": "signup_email.py",
    "upload-analysis.rst": "upload_analysis.py",
    "periodic-maintenance.rst": "maintenance.py",
    "long-task-progress.rst": "progress_report.py",
}


def inclusions(page):
    """(path, options) of each literalinclude of ``page``; path relative to the page."""
    with open(os.path.join(PAGES, page)) as file:
        text = file.read()
    found = []
    for match in re.finditer(r"^\.\. literalinclude:: (\S+)\n((?:   :[\w-]+:.*\n)*)", text, re.M):
        options = dict(re.findall(r"^   :([\w-]+):[ ]?(.*)$", match.group(2), re.M))
        found.append((match.group(1), options))
    return found


def test_index_lists_every_recipe_page():
    with open(os.path.join(PAGES, "index.rst")) as file:
        toctree = file.read().split(".. toctree::", 1)[1]
    listed = re.findall(r"^   ([\w-]+)$", toctree, re.M)
    assert sorted(f"{name}.rst" for name in listed) == sorted(RECIPES)
    assert sorted(name for name in os.listdir(PAGES) if name != "index.rst") == sorted(RECIPES)


@pytest.mark.parametrize("page", sorted(RECIPES))
def test_every_inclusion_of_a_page_finds_what_it_shows(page):
    shown = inclusions(page)
    paths = {os.path.normpath(os.path.join(PAGES, path)) for path, _ in shown}
    assert os.path.join(HERE, RECIPES[page]) in paths, f"{page} never shows {RECIPES[page]}"
    for path, options in shown:
        full = os.path.normpath(os.path.join(PAGES, path))
        assert full.startswith(os.path.join(REPO_ROOT, "examples") + os.sep), path
        with open(full) as file:
            text = file.read()
        if "pyobject" in options:
            names = {
                node.name
                for node in ast.parse(text).body
                if isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.AsyncFunctionDef))
            }
            assert options["pyobject"] in names, f"{page}: no {options['pyobject']} in {path}"
        for option in ("start-at", "start-after", "end-at", "end-before"):
            if option in options:
                assert options[option] in text, f"{page}: {option} {options[option]!r} not in {path}"
        if "start-at" in options and "end-before" in options:
            start = text.index(options["start-at"])
            assert text.index(options["end-before"], start) > start, f"{page}: empty excerpt of {path}"
        if "dedent" in options and "start-at" in options:
            line_start = text.rfind("\n", 0, text.index(options["start-at"])) + 1
            first_line = text[line_start:].splitlines()[0]
            assert not first_line[: int(options["dedent"])].strip(), f"{page}: dedent cuts {first_line!r}"


@pytest.mark.parametrize("page", sorted(RECIPES))
def test_every_page_names_the_test_that_runs_its_example(page):
    with open(os.path.join(PAGES, page)) as file:
        text = file.read()
    test = "test_" + RECIPES[page]
    assert f"examples/recipes/{test}" in text
    assert os.path.exists(os.path.join(HERE, test))
