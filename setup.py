"""The one compiled part: the byte-plane kernels of the ``planes`` codec (project metadata is in
pyproject.toml). ``optional``: where no C compiler is present the install still succeeds and the
codec runs the same transform with numpy, about 3-4x slower (docs/performance.md)."""

import sys

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "asyncckpt.codec._planes",
            ["src/asyncckpt/codec/_planes.c"],
            optional=True,
            extra_compile_args=[] if sys.platform == "win32" else ["-O3"],
        )
    ]
)
