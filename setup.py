"""Packaging for Flask-Executor: one module, ``flask_executor.py``, needing only Flask."""

from pathlib import Path

from setuptools import setup

here = Path(__file__).parent

setup(
    name="Flask-Executor",
    version="2.0.0",
    description="Background tasks for Flask in a thread or process pool: no broker, no worker processes.",
    long_description=(here / "README.rst").read_text(encoding="utf-8"),
    long_description_content_type="text/x-rst",
    license="MIT",
    py_modules=["flask_executor"],
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
        ],
    },
    classifiers=[
        "Framework :: Flask",
        "License :: OSI Approved :: MIT License",
        "Programming Language :: Python :: 3",
        "Programming Language :: Python :: 3 :: Only",
        "Programming Language :: Python :: 3.10",
        "Programming Language :: Python :: 3.11",
        "Programming Language :: Python :: 3.12",
        "Programming Language :: Python :: 3.13",
        "Typing :: Typed",
    ],
)
