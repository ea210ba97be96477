"""Build of the native core's CPython extension (stated.shm._native, the data plane layer);
everything else is in pyproject.toml.

The core is one C11 header (stated/native/stated_core.h, stb-style); _native.c compiles it with
STATED_IMPLEMENTATION. Building it is why a C compiler is needed at install.
"""
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "stated.shm._native",
            sources=["stated/native/_native.c"],
            include_dirs=["stated/native"],
            depends=["stated/native/stated_core.h", "stated/native/stated_format.h"],
            extra_compile_args=["-std=c11", "-O2", "-Wall", "-Wextra", "-fno-strict-aliasing"],
        )
    ],
)
