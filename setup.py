"""Build the optional Cython codec (ext/*.pyx -> fastproxy.codec.<name>).

The package runs in pure Python where the extension cannot be compiled, so a failed build
is reported and skipped instead of failing the install.
"""

import os
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext


class OptionalBuildExt(build_ext):
    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # no compiler or no Python headers
            print(f"fastproxy: extension not built ({exc}); using pure Python", file=sys.stderr)

    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:
            print(f"fastproxy: {ext.name} not built ({exc}); using pure Python", file=sys.stderr)


def extensions() -> list[Extension]:
    if os.environ.get("FASTPROXY_NO_EXT") == "1":
        return []
    here = os.path.dirname(os.path.abspath(__file__))
    sources = sorted(n for n in os.listdir(os.path.join(here, "ext")) if n.endswith(".pyx"))
    if not sources:
        return []
    try:
        from Cython.Build import cythonize
    except ImportError:
        print("fastproxy: Cython not installed; using pure Python", file=sys.stderr)
        return []
    modules = [
        Extension(f"fastproxy.codec.{os.path.splitext(name)[0]}", [os.path.join("ext", name)])
        for name in sources
    ]
    try:
        return cythonize(
            modules,
            compiler_directives={"language_level": "3", "boundscheck": False, "wraparound": False},
            quiet=True,
        )
    except Exception as exc:
        print(f"fastproxy: cythonize failed ({exc}); using pure Python", file=sys.stderr)
        return []


setup(ext_modules=extensions(), cmdclass={"build_ext": OptionalBuildExt})
