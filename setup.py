"""Packaging for Flask-Executor: one module, ``flask_executor.py``, needing only Flask."""

from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

here = Path(__file__).parent


class build_py_with_stubs(build_py):
    """Also builds ``flask_executor-stubs/__init__.pyi``, a copy of the module.

    A distribution of a single module cannot carry a ``py.typed`` marker (PEP 561),
    so type checkers would treat the installed module as untyped; a stub-only
    package beside it they do read. An editable install gets no copy, which could
    only go stale: there the checker reads the module itself.
    """

    def run(self) -> None:
        super().run()
        stubs = Path(self.build_lib, "flask_executor-stubs")
        self.mkpath(str(stubs))
        self.copy_file(str(here / "flask_executor.py"), str(stubs / "__init__.pyi"))

    def get_outputs(self, include_bytecode: bool = True) -> list[str]:
        stub = str(Path(self.build_lib, "flask_executor-stubs", "__init__.pyi"))
        return [*super().get_outputs(include_bytecode), stub]


setup(
    name="Flask-Executor",
    version="2.0.0",
    description="Background tasks for Flask in a thread or process pool: no broker, no worker processes.",
    long_description=(here / "README.rst").read_text(encoding="utf-8"),
    long_description_content_type="text/x-rst",
    license="MIT",
    py_modules=["flask_executor"],
    cmdclass={"build_py": build_py_with_stubs},
    python_requires=">=3.10",
    install_requires=["Flask>=2.2"],
    extras_require={
        "test": [
            "pytest>=8",
            "pytest-timeout>=2.3",
            "gunicorn>=22",
            "distributed>=2024.1",
            "mypy>=1.11",
            "ruff>=0.6",
            "playwright>=1.45",
            "Flask-SQLAlchemy>=3.1",
            "aiosmtpd>=1.4",
            "docutils>=0.20",
            "pyperf>=2.6",
            "APScheduler>=3.10,<4",
            "redis>=5",
            "pyuwsgi>=2.0.28",
            "waitress>=3",
            "flask-shell2http>=1.9",
            "blinker>=1.6",
            "sphinx>=8.1,<10",
            "pallets-sphinx-themes>=2.5,<3",
        ],
    },
    classifiers=[
        "Framework :: Flask",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Programming Language :: Python :: 3.13",
        "Typing :: Typed",
    ],
)
