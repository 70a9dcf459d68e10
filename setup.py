"""The C record decoder, optional: without a compiler the install goes on and the client decodes
in Python (metadata lives in pyproject.toml)."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "logbroker.storage._records",
            sources=["logbroker/storage/_records.c"],
            optional=True,
        )
    ]
)
