"""Which process runs which test, and the Triton interpreter.

Triton reads TRITON_INTERPRET when it decorates a kernel (at import), so one process runs Triton
kernels either compiled (CUDA tensors) or interpreted (CPU tensors), never both. Two marks say
what a test needs:

- `interpreter`: it runs Triton kernels on CPU tensors through Triton's interpreter;
- `cuda`: it needs a CUDA GPU (skipped without one). A test with both marks is a `cuda` test.

How `python3 -m pytest -q tests` runs them:

- without CUDA (CI): the whole session runs with TRITON_INTERPRET=1; `cuda` tests are skipped;
- with CUDA: the `cuda` tests run on the GPU in child pytests that share it (one per 4 cores, 2
  to 6, or FASTLEGO_TEST_GPU_WORKERS=N; 1 runs them in this process), by files cut into even
  shares, so that their kernel compiles use several cores; the `interpreter` tests run in child
  pytests with TRITON_INTERPRET=1 and the GPU hidden (CUDA_VISIBLE_DEVICES=""), and the unmarked
  tests (CPU tests) in child pytests of their own with the GPU hidden and without the interpreter,
  as on a CPU machine (FASTLEGO_TEST_CPU_IN_PARENT=1 keeps them in this process, on a machine
  whose GPU they then see). The children start when the test loop starts and run alongside it:
  one child of each kind per 4 CPU cores, at most 4 (FASTLEGO_TEST_INTERPRETER_WORKERS=N sets the
  number), each taking whole test files, balanced by test count, the cores shared among them. A child sends back pytest's own reports of each test (setup, call, teardown; pytest's
  report serialization) and this process logs them as that test's result, so the counts, `-k`,
  `-m`, `-x` and the failure messages read as in one process;
- TRITON_INTERPRET=1 set by the caller: one process, every kernel interpreted (as without CUDA);
- FASTLEGO_TEST_INTERPRETER_CHILD=1: the CUDA layout on a machine without a GPU (the child runs the
  `interpreter` tests, this process the others without the interpreter; the unmarked tests stay in
  this process, which is what shows that they need no interpreter). It shows on a CPU machine
  that every test that needs the interpreter is marked, and tests/test_interpreter_child.py runs
  the machinery through it.
"""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

import pytest
import torch

_FORCE_CHILD_VAR = "FASTLEGO_TEST_INTERPRETER_CHILD"   # public: the CUDA layout without a GPU
_CHILD_DIR_VAR = "_FASTLEGO_INTERPRETER_CHILD_DIR"     # internal: set for the child (its ids, its reports)
_WORKERS_VAR = "FASTLEGO_TEST_INTERPRETER_WORKERS"      # public: how many child pytests share the tests
_CPU_IN_PARENT_VAR = "FASTLEGO_TEST_CPU_IN_PARENT"      # public: unmarked tests in this process on GPU machines
_CPU_CHILDREN_VAR = "FASTLEGO_TEST_CPU_CHILDREN"        # public: CPU children in the simulated layout too
_GPU_WORKERS_VAR = "FASTLEGO_TEST_GPU_WORKERS"          # public: how many child pytests share the `cuda` tests


def _truthy(value) -> bool:
    return (value or "0").strip() not in ("", "0")


# The child reads its selection from and writes its reports to this folder; its own children
# (tests that start processes) must not inherit the role.
_CHILD_DIR = os.environ.pop(_CHILD_DIR_VAR, None)

# Decided before any test module (hence any kernel module) is imported.
if _CHILD_DIR:
    SPLIT = False                                   # the child: TRITON_INTERPRET=1 set by the parent
elif _truthy(os.environ.get(_FORCE_CHILD_VAR)):
    os.environ.pop("TRITON_INTERPRET", None)        # this process runs as on a GPU machine
    SPLIT = True
elif _truthy(os.environ.get("TRITON_INTERPRET")):
    SPLIT = False                                   # the caller asked for the interpreter everywhere
elif not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"            # CPU machine: Triton kernels run interpreted
    SPLIT = False
else:
    SPLIT = True



def _mend_old_triton_interpreter() -> None:
    """Triton 3.6's interpreter turns a scalar (a runtime loop bound, say) into a Python index
    with int() on a one-element array, which NumPy 2.4 refuses ("only 0-dimensional arrays can
    be converted to Python scalars"): every kernel with a runtime-bounded loop then fails under
    the interpreter. Later Triton squeezes the array first; do the same for such a Triton."""
    import inspect

    try:
        import triton.runtime.interpreter as interpreter
    except ImportError:
        return
    patch = getattr(interpreter, "_patch_lang_tensor", None)
    if patch is None or getattr(patch, "mended", False):
        return
    try:
        old = "int(self.handle.data))" in inspect.getsource(patch)
    except (OSError, TypeError):
        return
    if not old:
        return

    def mended(tensor, scope):
        patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.squeeze()))

    mended.mended = True
    interpreter._patch_lang_tensor = mended


if os.environ.get("TRITON_INTERPRET") == "1":
    _mend_old_triton_interpreter()

_CHILD_KEY = pytest.StashKey()
_CHILD_EXIT_CODES = (0, 1, 5)   # all passed, some failed, none collected (pytest.ExitCode)


def _runs_in_child(item) -> bool:
    return item.get_closest_marker("interpreter") is not None and item.get_closest_marker("cuda") is None


def _cpu_children() -> bool:
    """Whether the unmarked tests run in CPU children: on a real GPU machine (not the simulated
    layout, whose parent runs them to show that they need no interpreter), unless asked not to;
    FASTLEGO_TEST_CPU_CHILDREN=1 asks for them in the simulated layout too (tests of this file)."""
    if not SPLIT or _truthy(os.environ.get(_CPU_IN_PARENT_VAR)):
        return False
    if _truthy(os.environ.get(_CPU_CHILDREN_VAR)):
        return True
    return torch.cuda.is_available() and not _truthy(os.environ.get(_FORCE_CHILD_VAR))


def _runs_in_cpu_child(item) -> bool:
    return item.get_closest_marker("interpreter") is None and item.get_closest_marker("cuda") is None


@pytest.hookimpl(trylast=True)   # after -k/-m deselection
def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device machine)")
        for item in items:
            if item.get_closest_marker("cuda") is not None:
                item.add_marker(skip)
    if _CHILD_DIR:
        # the child runs exactly the parent's delegated tests, in the parent's order
        with open(os.path.join(_CHILD_DIR, "ids.txt"), encoding="utf-8") as f:
            order = {nodeid: i for i, nodeid in enumerate(f.read().splitlines())}
        keep = sorted((it for it in items if it.nodeid in order), key=lambda it: order[it.nodeid])
        dropped = [it for it in items if it.nodeid not in order]
        if dropped:
            config.hook.pytest_deselected(items=dropped)
        items[:] = keep


# --------------------------------------------------------------------------------------------
# The child: one JSON line per report
# --------------------------------------------------------------------------------------------

_CHILD_CONFIG = []   # the child's config (the report hooks take no config argument)


def pytest_configure(config):
    if _CHILD_DIR:
        _CHILD_CONFIG.append(config)


def _write_child_line(record: dict) -> None:
    with open(os.path.join(_CHILD_DIR, "reports.jsonl"), "a", encoding="utf-8") as f:
        f.write(json.dumps(record, default=str) + "\n")


def pytest_runtest_logreport(report):
    if _CHILD_DIR:
        hook = _CHILD_CONFIG[0].hook
        _write_child_line({"report": hook.pytest_report_to_serializable(config=_CHILD_CONFIG[0], report=report)})


def pytest_collectreport(report):
    if _CHILD_DIR and report.failed:
        _write_child_line({"collect_error": report.nodeid, "text": str(report.longrepr)})


# --------------------------------------------------------------------------------------------
# The parent: start the child, then log its reports as the delegated tests' results
# --------------------------------------------------------------------------------------------

_KINDS = {"interpreter": "`interpreter` tests (TRITON_INTERPRET=1, CUDA hidden)",
          "cpu": "CPU tests (CUDA hidden, no interpreter)",
          "gpu": "`cuda` tests (on the GPU)"}


class _Child:
    """One child pytest that runs `items` and the reports it sends back. `role`: "interpreter"
    (TRITON_INTERPRET=1, GPU hidden), "cpu" (GPU hidden, no interpreter) or "gpu" (the `cuda`
    tests, the GPU shared with the other GPU children)."""

    def __init__(self, config, items, threads=None, role="interpreter"):
        self.config = config
        self.threads = threads
        self.role = role
        self.kind = _KINDS[role]
        self.ids = [it.nodeid for it in items]
        self.id_set = set(self.ids)
        self.files = list(dict.fromkeys(str(it.path) for it in items))
        self.reports = {}            # nodeid -> [TestReport]
        self.finished = set()        # nodeids whose teardown report came
        self.collect_errors = []     # (nodeid, text)
        self.returncode = None
        self.terminated = False      # stopped by this process (session over or interrupted)
        self.started = self.seconds = None
        self._pending = b""
        self._offset = 0

    def command(self):
        opt = self.config.option
        cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "--continue-on-collection-errors",
               f"--rootdir={self.config.rootpath}", f"--tb={opt.tbstyle}"]
        if self.config.inipath is not None:
            cmd += ["-c", str(self.config.inipath)]
        if opt.verbose:
            cmd.append("-" + ("v" if opt.verbose > 0 else "q") * abs(opt.verbose))
        if opt.maxfail:
            cmd.append(f"--maxfail={opt.maxfail}")
        if opt.showlocals:
            cmd.append("--showlocals")
        cmd += [f"-W{w}" for w in (opt.pythonwarnings or [])]
        cmd.append(f"--import-mode={opt.importmode}")
        return cmd + self.files

    def start(self):
        self.dir = tempfile.mkdtemp(prefix="fastlego-interpreter-tests-")
        with open(os.path.join(self.dir, "ids.txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(self.ids) + "\n")
        open(os.path.join(self.dir, "reports.jsonl"), "w").close()
        env = {k: v for k, v in os.environ.items() if k not in (_FORCE_CHILD_VAR, "PYTEST_ADDOPTS", "TRITON_INTERPRET")}
        env[_CHILD_DIR_VAR] = self.dir
        if self.role != "gpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        if self.role == "interpreter":
            env["TRITON_INTERPRET"] = "1"
        if self.threads is not None:   # children share the cores: no oversubscribed thread pools
            env.setdefault("OMP_NUM_THREADS", str(self.threads))
        self.log = open(os.path.join(self.dir, "output.log"), "wb")
        self.started = time.monotonic()
        self.proc = subprocess.Popen(self.command(), cwd=str(self.config.invocation_params.dir), env=env,
                                     stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)

    def _read(self) -> bool:
        """Take the complete lines the child has written since the last read; True if any."""
        with open(os.path.join(self.dir, "reports.jsonl"), "rb") as f:
            f.seek(self._offset)
            chunk = f.read()
        self._offset += len(chunk)
        *lines, self._pending = (self._pending + chunk).split(b"\n")
        for line in lines:
            record = json.loads(line)
            if "collect_error" in record:
                self.collect_errors.append((record["collect_error"], record["text"]))
                continue
            report = self.config.hook.pytest_report_from_serializable(config=self.config, data=record["report"])
            # JSON turned tuples into lists; the terminal reporter wants the tuples back
            report.location = tuple(report.location)
            if isinstance(report.longrepr, list):
                report.longrepr = tuple(report.longrepr)
            report.sections = [tuple(s) for s in report.sections]
            report.user_properties = [tuple(p) for p in report.user_properties]
            self.reports.setdefault(report.nodeid, []).append(report)
            if report.when == "teardown":
                self.finished.add(report.nodeid)
        return bool(lines)

    def reports_of(self, item):
        """The child's reports of item, waiting for them; a failed report of ours if none came."""
        while item.nodeid not in self.finished:
            if self._read():
                continue
            if self.proc.poll() is not None:
                self._read()
                self._note_exit()
                break
            time.sleep(0.02)
        reports = list(self.reports.get(item.nodeid, []))
        if item.nodeid not in self.finished and not any(r.failed for r in reports):
            when = "call" if any(r.when == "setup" and r.passed for r in reports) else "setup"
            reports.append(pytest.TestReport(item.nodeid, item.location, {k: 1 for k in item.keywords}, "failed",
                                             self.missing_message(item), when))
        return reports

    def _note_exit(self):
        if self.returncode is None:
            self.returncode = self.proc.wait()
            self.seconds = time.monotonic() - self.started

    def output_tail(self, lines=60) -> str:
        self.log.flush()
        with open(os.path.join(self.dir, "output.log"), "rb") as f:
            text = f.read().decode("utf-8", "replace")
        return "\n".join(text.splitlines()[-lines:])

    def missing_message(self, item) -> str:
        parts = [f"the child pytest that runs the {self.kind} exited "
                 f"with code {self.returncode} before reporting {item.nodeid}"]
        for nodeid, text in self.collect_errors:
            if item.nodeid.startswith(nodeid):
                parts.append(f"it could not collect {nodeid}:\n{text}")
        parts.append("the end of its output:\n" + self.output_tail())
        return "\n".join(parts)

    def stop(self):
        """Let the child finish its session once every test has reported; otherwise (the parent
        stopped early, e.g. -x or Ctrl-C) end it."""
        if self.proc.poll() is None and self.finished >= self.id_set:
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                pass
        if self.proc.poll() is None:
            self.terminated = True
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._note_exit()
        self.tail = self.output_tail(30)
        self.log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


def _count_from_env(var: str, default: int, what: str) -> int:
    value = os.environ.get(var)
    if value is None:
        return default
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise pytest.UsageError(f"{var} must be a whole number >= 1 ({what}), got {value!r}")
    return n


def _worker_count() -> int:
    return _count_from_env(_WORKERS_VAR, max(1, min(4, (os.cpu_count() or 1) // 4)),
                           "child pytests for the `interpreter` tests")


def _gpu_worker_count() -> int:
    """Child pytests sharing the `cuda` tests and the GPU (their kernel compiles run in parallel on
    the host's cores): FASTLEGO_TEST_GPU_WORKERS, by default one per 4 CPU cores (at least 2, at
    most 6) on a GPU machine; 1 (and always without a GPU) runs them in this process."""
    if not torch.cuda.is_available() or _truthy(os.environ.get(_FORCE_CHILD_VAR)):
        return 1
    return _count_from_env(_GPU_WORKERS_VAR, max(2, min(6, (os.cpu_count() or 1) // 4)),
                           "child pytests for the `cuda` tests; 1 runs them in this process")


def _shard_by_file(items, workers: int, split_files: bool = False):
    """Whole files to `workers` shards, the largest file first to the emptiest shard; each shard
    keeps the session's order. Fewer shards when there are fewer files. `split_files`: a file of
    more than an even share of the tests is cut into pieces of that share first (the `cuda`
    tests: one file holds a fifth of them, and the GPU children share the kernel cache on disk)."""
    files = {}
    for it in items:
        files.setdefault(str(it.path), []).append(it)
    groups = list(files.values())
    if split_files:
        share = max(1, -(-len(items) // workers))
        groups = [g[k:k + share] for g in groups for k in range(0, len(g), share)]
    shards = [[] for _ in range(min(workers, len(groups)))]
    for group in sorted(groups, key=len, reverse=True):
        min(shards, key=len).extend(group)
    order = {id(it): i for i, it in enumerate(items)}
    return [sorted(shard, key=lambda it: order[id(it)]) for shard in shards]


class _Children:
    """The child pytests that share the `interpreter` tests (and, on GPU machines, the CPU tests);
    each test's reports come from its child."""

    def __init__(self, config, items, workers: int, cpu_items=(), gpu_items=(), gpu_workers: int = 1):
        shards = {"interpreter": _shard_by_file(list(items), workers) if items else [],
                  "cpu": _shard_by_file(list(cpu_items), workers) if cpu_items else [],
                  "gpu": _shard_by_file(list(gpu_items), gpu_workers, split_files=True) if gpu_items else []}
        n = sum(len(v) for v in shards.values())
        threads = max(1, (os.cpu_count() or 1) // n) if n > 1 else None
        self.children = [_Child(config, shard, threads, role) for role, group in shards.items() for shard in group]
        self.owner = {nodeid: child for child in self.children for nodeid in child.ids}
        self.ids = list(self.owner)
        self.id_set = set(self.owner)

    def start(self):
        for child in self.children:
            child.start()

    def reports_of(self, item):
        return self.owner[item.nodeid].reports_of(item)

    def stop(self):
        for child in self.children:
            child.stop()

    @property
    def terminated(self) -> bool:
        return any(child.terminated for child in self.children)

    def failed_on_its_own(self) -> bool:
        return any(not c.terminated and c.returncode not in _CHILD_EXIT_CODES for c in self.children)

    def summary(self) -> str:
        lines = []
        for role in _KINDS:
            group = [c for c in self.children if c.role == role]
            if not group:
                continue
            n = len(group)
            where = "one child pytest" if n == 1 else f"{n} child pytests"
            hows = ["stopped early" if c.terminated else f"exit code {c.returncode}" for c in group]
            how = hows[0] if len(set(hows)) == 1 else ", ".join(hows)
            seconds = max(c.seconds or 0 for c in group)
            tests = sum(len(c.ids) for c in group)
            kind, _, how_run = _KINDS[role].partition(" (")
            lines.append(f"fastlego: {tests} {kind} ran in {where} ({how_run}: {how}, {seconds:.0f} s")
        return "\n".join(lines)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtestloop(session):
    # session.items is final here (after every plugin's reordering and deselection)
    children = None
    if SPLIT and not session.config.option.collectonly:
        items = [it for it in session.items if _runs_in_child(it)]
        cpu_items = [it for it in session.items if _runs_in_cpu_child(it)] if _cpu_children() else []
        gpu_workers = _gpu_worker_count()
        gpu_items = [it for it in session.items if it.get_closest_marker("cuda") is not None] if gpu_workers > 1 else []
        if items or cpu_items or gpu_items:
            children = _Children(session.config, items, _worker_count(), cpu_items, gpu_items, gpu_workers)
            session.config.stash[_CHILD_KEY] = children
            children.start()
    yield
    if children is not None:
        children.stop()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_protocol(item, nextitem):
    children = item.config.stash.get(_CHILD_KEY, None)
    if children is None or item.nodeid not in children.id_set:
        return None
    item.ihook.pytest_runtest_logstart(nodeid=item.nodeid, location=item.location)
    for report in children.reports_of(item):
        item.ihook.pytest_runtest_logreport(report=report)
    item.ihook.pytest_runtest_logfinish(nodeid=item.nodeid, location=item.location)
    return True


def pytest_sessionfinish(session, exitstatus):
    children = session.config.stash.get(_CHILD_KEY, None)
    # a child that failed on its own (not stopped by us) fails the session even if every test passed
    if children is not None and children.failed_on_its_own() and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    children = config.stash.get(_CHILD_KEY, None)
    if children is None:
        return
    terminalreporter.write_line(children.summary())
    for child in children.children:
        if not child.terminated and child.returncode not in _CHILD_EXIT_CODES:
            terminalreporter.write_line("the end of the child's output:\n" + child.tail)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
