"""Sphinx configuration of Flask-Executor's documentation.

Build it from the repository root, warnings as errors, every reference checked::

    sphinx-build -W --keep-going -n -b html docs docs/_build/html
    sphinx-build -W --keep-going -n -b doctest docs docs/_build/doctest

The second command runs every example of the guide pages (``make html doctest``
in this folder does both).
"""

from __future__ import annotations

import sys
from pathlib import Path

from pallets_sphinx_themes import ProjectLink

HERE = Path(__file__).resolve().parent
# The examples that pages include and run. Flask-Executor itself is imported as installed
# (``pip install -e ".[docs]"`` installs this checkout).
sys.path.insert(0, str(HERE / "examples"))

import flask_executor  # noqa: E402

project = "Flask-Executor"
author = "The Flask-Executor developers"
copyright = "2026 The Flask-Executor developers"
release = flask_executor.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.doctest",
    "sphinx.ext.intersphinx",
    "pallets_sphinx_themes",
]
exclude_patterns = ["_build", "examples", "_inventories"]
nitpicky = True  # every reference must resolve

# API pages: autodoc renders the module's docstrings, which are its reference.
autodoc_member_order = "bysource"
# Signatures without annotations: the overloads that type checkers read render poorly
# (ParamSpecs and Callables), and the prose of each docstring says what it takes. The
# API page gives the call form of each overloaded method explicitly.
autodoc_typehints = "none"
autodoc_preserve_defaults = True
autodoc_inherit_docstrings = False

# Links to Python's and Flask's documentation. This machine and CI reach no site but
# the package registries, so the inventories are read from docs/_inventories/ (see
# the README there for where each comes from and how to refresh it); with a file
# missing, Sphinx fetches the site's own.
INVENTORIES = HERE / "_inventories"
intersphinx_mapping = {
    "python": ("https://docs.python.org/3/", (str(INVENTORIES / "python.inv"), None)),
    "flask": ("https://flask.palletsprojects.com/en/stable/", (str(INVENTORIES / "flask.inv"), None)),
    "werkzeug": (
        "https://werkzeug.palletsprojects.com/en/stable/",
        (str(INVENTORIES / "werkzeug.inv"), None),
    ),
}
intersphinx_timeout = 10

# Examples run by ``sphinx-build -b doctest``: every page's examples start from this.
# The Redis example runs where a redis-server and redis-py are installed (CI has both).
doctest_global_setup = f"""
__name__ = "__main__"  # as in a script, so that Flask(__name__) finds a root path
import importlib.util, shutil
from pathlib import Path
EXAMPLES = Path({str(HERE / "examples")!r})  # docs/examples, wherever the build runs from
NO_REDIS = shutil.which("redis-server") is None or importlib.util.find_spec("redis") is None
"""
doctest_test_doctest_blocks = ""  # docstrings' examples are prose; pages use doctest directives

html_theme = "flask"
html_theme_options = {"index_sidebar_logo": False}
html_title = f"Flask-Executor {release}"
html_short_title = "Flask-Executor"
html_context = {
    "project_links": [
        ProjectLink("PyPI releases", "https://pypi.org/project/Flask-Executor/"),
    ]
}
html_sidebars = {
    "index": ["project.html", "localtoc.html", "searchbox.html"],
    "**": ["localtoc.html", "relations.html", "searchbox.html"],
}
html_static_path: list[str] = []
html_show_sourcelink = False
# The theme's banner compares this version with PyPI's from the reader's browser; 2.0
# is not on PyPI yet, so it would call this release a development version.
version_banner = False
