"""The tests test this copy of fastlego: `fastlego.kernels` is the kernels folder that comes with the
imported fastlego (kernels/ beside fastlego/ in a source checkout, fastlego/kernels/ in an installed
wheel), even when another copy is installed in editable mode."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import fastlego

REPO = Path(__file__).resolve().parent.parent


def _kernels_dirs(package_dir: Path):
    """Where the kernels of the fastlego in package_dir may lie: inside it (installed) or beside it
    (source checkout)."""
    return {package_dir / "kernels", package_dir.parent / "kernels"}


def test_kernels_lie_with_the_imported_fastlego():
    from fastlego import kernels
    package_dir = Path(fastlego.__file__).resolve().parent
    kernels_dir = Path(kernels.__file__).resolve().parent
    assert kernels_dir in _kernels_dirs(package_dir), (fastlego.__file__, kernels.__file__)
    assert [str(kernels_dir)] == [str(Path(p).resolve()) for p in kernels.__path__]
    assert fastlego.kernels is kernels
    pytest.importorskip("triton")
    from fastlego.kernels import window_attention
    assert Path(window_attention.__file__).resolve().parent == kernels_dir


def test_tests_import_this_checkout():
    """In a source checkout the tests import its own fastlego (pyproject's pytest `pythonpath`),
    never another installed copy."""
    if not (REPO / "fastlego" / "__init__.py").is_file():
        pytest.skip("the tests do not lie in a source checkout")
    from fastlego import kernels
    assert Path(fastlego.__file__).resolve() == REPO / "fastlego" / "__init__.py"
    assert Path(kernels.__file__).resolve() == REPO / "kernels" / "__init__.py"


# Another copy of fastlego, installed in editable mode the way setuptools does it: a finder after
# the path finder in sys.meta_path that maps `fastlego` and `fastlego.kernels` to that copy's folders (and
# their submodules to files there). The import system asks it only when the path finder finds
# nothing: `fastlego` itself then comes from sys.path, but `fastlego.kernels` of a source checkout
# is not inside the fastlego package, so without fastlego's own mapping the other copy's kernels load.
SCRIPT = """\
import json, sys
from importlib.machinery import PathFinder
from importlib.util import spec_from_file_location

OTHER = {other!r}
MAPPING = {{"fastlego": OTHER + "/fastlego", "fastlego.kernels": OTHER + "/kernels"}}


class OtherCopyFinder:
    @classmethod
    def find_spec(cls, fullname, path=None, target=None):
        if fullname in MAPPING:
            root = MAPPING[fullname]
            return spec_from_file_location(fullname, root + "/__init__.py", submodule_search_locations=[root])
        parent = fullname.rpartition(".")[0]
        if parent in MAPPING:
            return PathFinder.find_spec(fullname, [MAPPING[parent]])
        return None


# right after the path finder: ahead of any editable finder already installed (this checkout's own)
sys.meta_path.insert(sys.meta_path.index(PathFinder) + 1, OtherCopyFinder)
sys.path.insert(0, {first!r})
import fastlego
import fastlego.kernels
from fastlego.kernels import window_attention
print(json.dumps(dict(fastlego=fastlego.__file__, kernels=fastlego.kernels.__file__,
                      window_attention=window_attention.__file__,
                      other=[hasattr(m, "OTHER_COPY") for m in (fastlego.kernels, window_attention)])))
"""


def _other_copy(tmp_path: Path) -> Path:
    """A second fastlego whose kernels say they are the other copy's."""
    other = tmp_path / "other"
    (other / "fastlego").mkdir(parents=True)
    (other / "kernels").mkdir()
    (other / "fastlego" / "__init__.py").write_text("raise ImportError('the other copy of fastlego was imported')\n")
    for name in ("__init__.py", "window_attention.py"):
        (other / "kernels" / name).write_text("OTHER_COPY = True\n")
    return other


def _import_with_other_copy(tmp_path: Path, first: Path) -> dict:
    script = SCRIPT.format(other=str(_other_copy(tmp_path)), first=str(first))
    proc = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_source_checkout_kernels_win_over_another_editable_install(tmp_path):
    pytest.importorskip("triton")
    got = _import_with_other_copy(tmp_path, REPO)
    assert got["other"] == [False, False], got
    assert Path(got["fastlego"]) == REPO / "fastlego" / "__init__.py"
    assert Path(got["kernels"]) == REPO / "kernels" / "__init__.py"
    assert Path(got["window_attention"]) == REPO / "kernels" / "window_attention.py"


def test_installed_package_uses_the_kernels_inside_it(tmp_path):
    """The wheel's layout (kernels/ shipped as fastlego/kernels/): those kernels, not the other copy's."""
    pytest.importorskip("triton")
    site = tmp_path / "site"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "fastlego", site / "fastlego", ignore=ignore)
    shutil.copytree(REPO / "kernels", site / "fastlego" / "kernels", ignore=ignore)
    got = _import_with_other_copy(tmp_path, site)
    assert got["other"] == [False, False], got
    assert Path(got["fastlego"]) == site / "fastlego" / "__init__.py"
    assert Path(got["kernels"]) == site / "fastlego" / "kernels" / "__init__.py"
    assert Path(got["window_attention"]) == site / "fastlego" / "kernels" / "window_attention.py"
