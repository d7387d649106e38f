"""tests/conftest.py's two layouts, run on a small sample suite in a fresh pytest process.

With CUDA, the `interpreter` tests run in one child pytest with TRITON_INTERPRET=1 and the GPU
hidden, and their reports come back as the parent's results. FASTLEGO_TEST_INTERPRETER_CHILD=1
takes that path on any machine, so these tests exercise it on the CPU (and on a GPU machine, where
the parent also runs the sample's `cuda` test). The sample suite uses this repository's conftest.
"""

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

CONFTEST = Path(__file__).resolve().parent / "conftest.py"
ON_GPU = torch.cuda.is_available()

INI = """\
[pytest]
markers =
    cuda: needs a CUDA GPU
    interpreter: runs Triton kernels through the interpreter
"""

# Each test appends "<name> <pid> <parent pid> <TRITON_INTERPRET> <cuda|nocuda>" to $SAMPLE_LOG.
SAMPLE = '''\
import os
import pytest
import torch


def log(name):
    with open(os.environ["SAMPLE_LOG"], "a") as f:
        cuda = "cuda" if torch.cuda.is_available() else "nocuda"
        f.write(f"{name} {os.getpid()} {os.getppid()} {os.environ.get('TRITON_INTERPRET', '-')} {cuda}\\n")


def test_plain():
    log("plain")
    assert "TRITON_INTERPRET" not in os.environ


@pytest.mark.interpreter
def test_kernel_on_cpu_tensors():
    import triton
    import triton.language as tl

    @triton.jit
    def add_one(x_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + 1, mask=offs < n)

    log("kernel")
    x = torch.arange(5, dtype=torch.float32)
    add_one[(1,)](x, 5, BLOCK=8)       # a CPU tensor: only Triton's interpreter can run this
    assert torch.equal(x, torch.arange(1, 6, dtype=torch.float32))


@pytest.mark.interpreter
def test_fails_in_child():
    log("fails")
    print("captured-child-stdout")
    assert 1 + 1 == 3, "distinct-child-failure"


@pytest.mark.interpreter
@pytest.mark.parametrize("n", [1, 2])
def test_param(n):
    log(f"param{n}")


@pytest.fixture
def broken_fixture():
    raise RuntimeError("distinct-setup-error")


@pytest.mark.interpreter
def test_setup_error(broken_fixture):
    log("setup_error")


@pytest.mark.interpreter
def test_skipped():
    log("skipped")
    pytest.skip("distinct-skip-reason")


@pytest.mark.interpreter
@pytest.mark.xfail(reason="distinct-xfail", strict=True)
def test_xfail():
    log("xfail")
    raise ValueError


@pytest.mark.interpreter
@pytest.mark.cuda
def test_cuda_wins():
    log("cuda")      # a `cuda` test stays in the parent, on the GPU


def test_plain_last():
    log("plain_last")
'''

CRASH = '''\
import os
import pytest


@pytest.mark.interpreter
def test_before_crash():
    pass


@pytest.mark.interpreter
def test_crash():
    os._exit(7)      # the child dies without a report


@pytest.mark.interpreter
def test_after_crash():
    pass
'''


@pytest.fixture
def sample(tmp_path):
    root = tmp_path / "sample"
    root.mkdir()
    shutil.copy(CONFTEST, root / "conftest.py")
    (root / "pytest.ini").write_text(INI)
    (root / "test_sample.py").write_text(SAMPLE)
    (root / "test_crash.py").write_text(CRASH)
    return root


def run_sample(root, *args, child=True, interpret=None, workers=1, cpu_children=False):
    env = {k: v for k, v in os.environ.items()
           if k not in ("TRITON_INTERPRET", "FASTLEGO_TEST_INTERPRETER_CHILD", "PYTEST_ADDOPTS",
                        "FASTLEGO_TEST_CPU_CHILDREN", "FASTLEGO_TEST_CPU_IN_PARENT")}
    env["SAMPLE_LOG"] = str(root / "log.txt")
    env["FASTLEGO_TEST_INTERPRETER_WORKERS"] = str(workers)
    if cpu_children:
        env["FASTLEGO_TEST_CPU_CHILDREN"] = "1"
    if child:
        env["FASTLEGO_TEST_INTERPRETER_CHILD"] = "1"
    if interpret:
        env["TRITON_INTERPRET"] = interpret
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "no:cacheprovider", *args], cwd=root, env=env,
                          capture_output=True, text=True, timeout=300)
    log = {}
    if (root / "log.txt").exists():
        for line in (root / "log.txt").read_text().splitlines():
            name, pid, ppid, interp, cuda = line.split()
            log[name] = (int(pid), int(ppid), interp, cuda)
    return proc, log


def counts(output):
    """{'passed': 3, 'failed': 1, ...} from pytest's last summary line."""
    last = output.strip().splitlines()[-1]
    return {word: int(n) for n, word in re.findall(r"(\d+) (\w+)", last)}


def test_interpreter_tests_run_in_one_child_and_report_back(sample):
    proc, log = run_sample(sample, "-q", "test_sample.py", "test_crash.py")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    # test_crash.py: one passes, then the child dies in test_crash (a failure) and cannot run
    # test_after_crash (an error)
    want = {"passed": 7 if ON_GPU else 6, "failed": 2, "errors": 2, "skipped": 1 if ON_GPU else 2, "xfailed": 1}
    assert counts(proc.stdout) == want, out
    parent = log["plain"][0]
    assert log["plain_last"][0] == parent and log["plain"][2] == "-"          # unmarked: the parent, compiled
    child = {name: v for name, v in log.items() if name not in ("plain", "plain_last", "cuda")}
    assert set(child) == {"kernel", "fails", "param1", "param2", "skipped", "xfail"}
    assert len({pid for pid, *_ in child.values()}) == 1, "one child runs every interpreter test"
    assert all(pid != parent and ppid == parent and interp == "1" and cuda == "nocuda"
               for pid, ppid, interp, cuda in child.values()), child
    if ON_GPU:
        assert log["cuda"][0] == parent
    else:
        assert "cuda" not in log
    # the child's failure, its captured output and the setup error read as the parent's own
    assert "FAILED test_sample.py::test_fails_in_child" in out and "AssertionError: distinct-child-failure" in out
    assert "assert 1 + 1 == 3" in out and "captured-child-stdout" in out
    assert "ERROR test_sample.py::test_setup_error" in out and "RuntimeError: distinct-setup-error" in out
    assert "exited with code 7 before reporting test_crash.py::test_crash" in out
    assert "exited with code 7 before reporting test_crash.py::test_after_crash" in out
    assert "fastlego: 10 `interpreter` tests ran in one child pytest (TRITON_INTERPRET=1, CUDA hidden): exit code 7" in out


def test_several_children_share_the_files(sample):
    (sample / "test_more.py").write_text(
        "import os\nimport pytest\n\n\n@pytest.mark.interpreter\ndef test_more():\n"
        "    with open(os.environ['SAMPLE_LOG'], 'a') as f:\n"
        "        f.write(f\"more {os.getpid()} {os.getppid()} {os.environ.get('TRITON_INTERPRET', '-')} nocuda\\n\")\n")
    proc, log = run_sample(sample, "-q", "-k", "not crash", "test_sample.py", "test_more.py", workers=2)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out                                  # test_fails_in_child and the setup error
    assert counts(proc.stdout) == {"passed": 7 if ON_GPU else 6, "failed": 1, "error": 1,
                                   "skipped": 1 if ON_GPU else 2, "xfailed": 1}, out
    parent = log["plain"][0]
    sample_children = {log[n][0] for n in ("kernel", "fails", "param1", "param2", "skipped", "xfail")}
    assert len(sample_children) == 1, "a file's tests run in one child"
    assert log["more"][0] not in sample_children and log["more"][0] != parent, "the other file ran in another child"
    assert all(log[n][1] == parent and log[n][2] == "1" for n in ("kernel", "more"))
    assert "fastlego: 8 `interpreter` tests ran in 2 child pytests" in out, out
    assert "FAILED test_sample.py::test_fails_in_child" in out and "distinct-child-failure" in out


def test_cpu_tests_run_in_children_of_their_own_on_gpu_machines(sample):
    """The GPU machines' layout (FASTLEGO_TEST_CPU_CHILDREN=1 takes it on any machine): the unmarked
    tests run in a child with the GPU hidden and no interpreter, the `interpreter` tests in another
    with it, the `cuda` tests in this process; the counts and failures read as in one process."""
    proc, log = run_sample(sample, "-q", "-k", "not crash", "test_sample.py", cpu_children=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out                                  # test_fails_in_child and the setup error
    assert counts(proc.stdout) == {"passed": 6 if ON_GPU else 5, "failed": 1, "error": 1,
                                   "skipped": 1 if ON_GPU else 2, "xfailed": 1}, out
    plain, last, kernel = log["plain"], log["plain_last"], log["kernel"]
    assert plain[0] == last[0] and plain[0] != kernel[0], "the CPU tests share a child, not the interpreter's"
    assert plain[1] == kernel[1] and plain[2] == "-" and plain[3] == "nocuda" and kernel[2] == "1"
    if ON_GPU:
        assert log["cuda"][0] == plain[1], "the cuda test runs in the parent"
    assert "CPU tests ran in one child pytest (CUDA hidden, no interpreter)" in out, out
    assert "FAILED test_sample.py::test_fails_in_child" in out


def test_worker_count_must_be_a_whole_number(sample):
    proc, _ = run_sample(sample, "-q", "test_sample.py", workers="two")
    assert proc.returncode != 0
    assert "FASTLEGO_TEST_INTERPRETER_WORKERS must be a whole number >= 1" in proc.stdout + proc.stderr


def test_selection_and_skip_reasons_follow_the_parent(sample):
    proc, log = run_sample(sample, "-q", "-rs", "-k", "param or skipped", "test_sample.py")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert counts(proc.stdout) == {"passed": 2, "skipped": 1, "deselected": 7}, out
    assert set(log) == {"param1", "param2", "skipped"}           # the child ran only the selection
    assert "distinct-skip-reason" in out


def test_exitfirst_stops_both(sample):
    proc, log = run_sample(sample, "-x", "-q", "test_sample.py")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 1, out
    assert counts(proc.stdout) == {"passed": 2, "failed": 1}, out  # plain, kernel, then the failure
    assert "stopping after 1 failures" in out
    assert "param1" not in log and "plain_last" not in log


def test_interpreter_set_by_the_caller_runs_everything_in_one_process(sample):
    proc, log = run_sample(sample, "-q", "-k", "kernel or param", "test_sample.py", child=False, interpret="1")
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert set(log) == {"kernel", "param1", "param2"}
    assert len({pid for pid, *_ in log.values()}) == 1 and {i for _, _, i, _ in log.values()} == {"1"}
    assert "child pytest" not in out
