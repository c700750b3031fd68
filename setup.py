"""Builds nibble's C library (libnibble_c.so) with CMake and ships it inside the Python package.

NIBBLE_BUILD_DIR names a CMake build folder to build in (and reuse: `scripts/test` points it at
build/, so the tests install the package without compiling the library twice); otherwise a
folder under build/python is configured. The CMake build needs the packages scripts/setup
installs; the CUDA backend is compiled when nvcc is found, as for the rest of nibble."""
import os
import shutil
import subprocess
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py
from setuptools.dist import Distribution

ROOT = Path(__file__).resolve().parent


class BuildWithLibrary(build_py):
    def run(self) -> None:
        super().run()
        build_dir = Path(os.environ.get("NIBBLE_BUILD_DIR", ROOT / "build" / "python")).resolve()
        if not (build_dir / "CMakeCache.txt").exists():
            generator = ["-G", "Ninja"] if shutil.which("ninja") else []
            subprocess.check_call(["cmake", "-S", str(ROOT), "-B", str(build_dir), "-DCMAKE_BUILD_TYPE=Release",
                                   "-DNIBBLE_TESTS=OFF", "-DNIBBLE_BENCHMARKS=OFF", *generator])
        subprocess.check_call(["cmake", "--build", str(build_dir), "--target", "nibble_c"])
        target = Path(self.build_lib) / "nibble"
        target.mkdir(parents=True, exist_ok=True)
        shutil.copy2(build_dir / "libnibble_c.so", target / "libnibble_c.so")


class BinaryDistribution(Distribution):
    """The package holds a compiled library: its wheel is for this platform only."""

    def has_ext_modules(self) -> bool:
        return True


# setuptools keeps its own files apart from the CMake build folder.
setup(cmdclass={"build_py": BuildWithLibrary}, distclass=BinaryDistribution,
      options={"build": {"build_base": str(ROOT / "build" / "setuptools")}})
