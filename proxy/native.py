"""The transaction pooler's hot modules, compiled with mypyc when a build of them is present.

A pooled transaction runs two callbacks in the proxy (the client's request: lend a backend and
forward; the backend's answer ending in ReadyForQuery ``I``: hand it over and return the backend).
Interpreted, they cost a few microseconds of CPU per transaction — what separated Lakelet's
pooler from PgBouncer's (C) on a saturated machine. mypyc compiles the same annotated Python to C
(native classes, typed integers and bytes), so the source stays the one truth and runs as it is
when no build is there.

``scripts/setup.sh`` runs ``build()``: the modules in ``MODULES`` are compiled
into ``proxy/_native/`` (ignored by git) with a stamp of their sources' SHA-256. On import of
``proxy``, ``install()`` loads them from there only if every stamp matches the source beside it,
so an edited module runs interpreted (all of them do, as one group) until the next build, and a
missing build, compiler or mypy just means the interpreted modules. ``install()`` runs when
``proxy`` is imported (this module is its first import); ``LAKELET_INTERPRETED=1`` forces the
interpreted ones. ``compiled()`` says which ran.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType

MODULES = ("proxy.pooled_server", "proxy.pooled_client", "proxy.pooler")
GROUP = "lakelet_pooler"  # mypyc's shared library for the group: lakelet_pooler__mypyc
HERE = Path(__file__).resolve().parent
NATIVE = HERE / "_native"
STAMP = NATIVE / "stamp.json"


def _source(module: str) -> Path:
    return HERE.parent.joinpath(*module.split(".")).with_suffix(".py")


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _suffix() -> str:
    return importlib.machinery.EXTENSION_SUFFIXES[0]


class _Finder:
    """Serves the compiled modules (and their group library) from ``proxy/_native``."""

    def __init__(self, files: dict[str, str]) -> None:
        self.files = files

    def find_spec(self, name: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        file = self.files.get(name)
        return importlib.util.spec_from_file_location(name, file) if file is not None else None


_installed: _Finder | None = None


def install() -> bool:
    """Load the compiled modules from now on if a build matching every source is present."""
    global _installed
    if _installed is not None:
        return True
    if os.environ.get("LAKELET_INTERPRETED") or any(m in sys.modules for m in MODULES):
        return False
    try:
        stamp = json.loads(STAMP.read_text())
        if stamp.get("suffix") != _suffix():
            return False
        files = {}
        for module in MODULES:
            if stamp["sources"].get(module) != _digest(_source(module)):
                return False
            files[module] = str(NATIVE / (module.rsplit(".", 1)[1] + _suffix()))
        files[GROUP + "__mypyc"] = str(NATIVE / (GROUP + "__mypyc" + _suffix()))
        if not all(os.path.exists(f) for f in files.values()):
            return False
    except (OSError, ValueError, KeyError, AttributeError):
        return False
    _installed = _Finder(files)
    sys.meta_path.insert(0, _installed)
    return True


def compiled() -> bool:
    """Whether the pooler's modules running in this process are the compiled ones."""
    module = sys.modules.get(MODULES[0])
    return module is not None and not str(getattr(module, "__file__", "")).endswith(".py")


def build() -> None:
    """Compile ``MODULES`` into ``proxy/_native`` (raises if mypyc or a C compiler is missing)."""
    from mypyc.build import mypycify  # the build needs mypy; running the result does not
    from setuptools import setup

    with tempfile.TemporaryDirectory(prefix="lakelet-mypyc-") as tmp:
        sources = [str(_source(m).relative_to(HERE.parent)) for m in MODULES]
        digests = {m: _digest(_source(m)) for m in MODULES}
        cwd = os.getcwd()
        os.chdir(HERE.parent)
        try:
            extensions = mypycify(sources, opt_level="3", group_name=GROUP, target_dir=os.path.join(tmp, "c"))
            setup(name="lakelet-pooler-native", ext_modules=extensions, script_args=[
                "-q", "build_ext", "--build-lib", os.path.join(tmp, "lib"), "--build-temp", os.path.join(tmp, "obj")])
        finally:
            os.chdir(cwd)
        lib = Path(tmp, "lib")
        staged = Path(tempfile.mkdtemp(prefix="_native.", dir=HERE))
        try:
            for module in MODULES:
                name = module.rsplit(".", 1)[1] + _suffix()
                shutil.copy2(lib / "proxy" / name, staged / name)
            shutil.copy2(lib / (GROUP + "__mypyc" + _suffix()), staged / (GROUP + "__mypyc" + _suffix()))
            (staged / "stamp.json").write_text(json.dumps({"suffix": _suffix(), "sources": digests}, indent=1))
            shutil.rmtree(NATIVE, ignore_errors=True)
            staged.rename(NATIVE)
        except BaseException:
            shutil.rmtree(staged, ignore_errors=True)
            raise


install()
