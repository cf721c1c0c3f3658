"""Fork-server mechanics of ``tests/interrupt_driver.py``: safe forks, kill points, deadlines, hang reports.

A fork copies the whole process but only the calling thread. A lock held at ``fork()`` by another thread,
or a lock shared with other processes (a ``multiprocessing`` semaphore lives in shared memory) that a
SIGKILLed child held, stays held forever in every later child. So, before the driver imports anything
else (:func:`prepare_process`):

- tqdm gets a thread-only ``threading.RLock`` as its write lock (its default lock contains a
  ``multiprocessing.RLock``, shared by all forks: a child killed inside a bar update left it held and the
  next child blocked forever on its futex) and no monitor thread;
- pyarrow's bundled jemalloc (imported through sae-lens → datasets) starts no background thread;

and :func:`fork_hazards` lists what could still deadlock a child (extra native threads, Python threads, a
multiprocessing lock in tqdm, live ``SemLock`` objects); the driver records it and the test requires none.

Kill points do not depend on the machine's speed: a child counts its file-system operations under the
trial's work directory, as reported by CPython's audit hooks (PEP 578: ``open``, ``os.rename`` (also
``os.replace``), ``os.mkdir``, ``os.remove``, ``os.scandir``, …; the operations of safetensors and FAISS
in native code are seen through the Python-level rename that publishes them), and SIGKILLs itself at the
k-th one, before the operation happens. Only file-system operations change what a resume sees, so these
are the points where the on-disk state differs; a kill at a rename of a temporary file may first cut the
file (a kill in the middle of writing it).

Every wait has a deadline (:func:`wait`): on expiry the child's threads (state, kernel wait channel,
kernel stack where readable), its Python stacks (faulthandler, on SIGUSR1) and, when ``py-spy`` is
installed, its native stacks are recorded, and its process group is SIGKILLed.
"""

from __future__ import annotations

import contextlib
import faulthandler
import gc
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

FS_EVENTS = frozenset({"open", "os.rename", "os.remove", "os.mkdir", "os.rmdir", "os.scandir", "os.listdir",
                       "os.truncate", "os.chmod", "os.utime", "os.link", "os.symlink", "shutil.rmtree",
                       "shutil.copyfile", "shutil.move"})
KILL_LINE = "KILL-POINT "  # the child writes this line (and a JSON record) to its log just before dying


# ----- the process before any fork ---------------------------------------------------------------------------
def prepare_process() -> None:
    """Make the (not yet threaded) driver safe to fork from; call before importing torch, tqdm or sae-lens."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["JE_ARROW_MALLOC_CONF"] = "background_thread:false"  # pyarrow's jemalloc: no background thread
    import tqdm

    tqdm.tqdm.monitor_interval = 0  # no tqdm monitor thread
    thread_only_tqdm_lock()


def thread_only_tqdm_lock() -> None:
    """tqdm and its subclasses write under one ``threading.RLock`` (never a multiprocessing one)."""
    from tqdm import std

    lock = getattr(std.tqdm, "_lock", None)
    if not isinstance(lock, type(threading.RLock())):
        lock = threading.RLock()
    todo = [std.tqdm]
    while todo:
        cls = todo.pop()
        todo += cls.__subclasses__()
        if cls is std.tqdm or "_lock" in cls.__dict__:
            cls.set_lock(lock)


def _native_threads() -> list[str]:
    names = []
    for tid in sorted(os.listdir("/proc/self/task")):
        try:
            names.append(Path(f"/proc/self/task/{tid}/comm").read_text().strip())
        except OSError:
            continue
    return names


def fork_hazards(full: bool = False) -> list[str]:
    """What could leave a forked child waiting on a lock nobody will release (empty: nothing found).

    ``full`` also scans the heap for multiprocessing semaphores (tens of ms; not before every fork)."""
    from tqdm import std

    out = []
    threads = _native_threads()
    if len(threads) > 1:
        out.append(f"{len(threads) - 1} extra native thread(s): {', '.join(threads[1:])}")
    if threading.active_count() > 1:
        out.append("Python threads: " + ", ".join(t.name for t in threading.enumerate()
                                                  if t is not threading.main_thread()))
    if getattr(std.TqdmDefaultWriteLock, "mp_lock", None) is not None:
        out.append("tqdm created its multiprocessing lock")
    if not isinstance(getattr(std.tqdm, "_lock", None), type(threading.RLock())):
        out.append(f"tqdm write lock is {type(getattr(std.tqdm, '_lock', None)).__name__}, not a thread-only RLock")
    if full and "multiprocessing.synchronize" in sys.modules:
        semlock = sys.modules["multiprocessing.synchronize"].SemLock
        n = sum(1 for o in gc.get_objects() if issubclass(type(o), semlock))  # no __class__ lookups
        if n:
            out.append(f"{n} live multiprocessing SemLock object(s)")
    return out


# ----- the child ------------------------------------------------------------------------------------------------
def fork_child(body: Callable[[], None], log: Path, setup: Callable[[], None] | None = None) -> int:
    """Fork a child in its own process group that runs ``setup`` then ``body`` with stdout/stderr in ``log``.

    The child exits 0 when ``body`` returns and 1 (traceback in the log) when it raises; SIGUSR1 makes it
    dump every thread's Python stack into the log (faulthandler, which also reports fatal signals)."""
    sys.stdout.flush()
    sys.stderr.flush()
    gc.freeze()  # the child's collector leaves the parent's objects alone: fewer copy-on-write page copies
    pid = os.fork()
    if pid:
        gc.unfreeze()
        with contextlib.suppress(OSError):
            os.setpgid(pid, pid)  # also done by the child; whichever runs first wins
        return pid
    code = 1
    try:
        os.setpgid(0, 0)
        fd = os.open(str(log), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        os.close(fd)
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # noqa: SIM115 - the child's own streams,
        sys.stderr = open(2, "w", buffering=1, closefd=False)  # noqa: SIM115 - whatever the parent's were
        faulthandler.enable(file=2, all_threads=True)
        faulthandler.register(signal.SIGUSR1, file=2, all_threads=True)
        if setup is not None:
            setup()
        body()
        code = 0
    except BaseException:  # noqa: BLE001 - report and exit the child whatever happened
        traceback.print_exc()
    finally:
        os._exit(code)


def count_fs_events(prefix: Path) -> list[int]:
    """In a child: count the file-system audit events under ``prefix``; returns the live one-item counter."""
    counter = [0]
    pre = _prefix(prefix)

    def hook(event: str, args: tuple) -> None:
        if event in FS_EVENTS and args and _under(args[0], pre):
            counter[0] += 1

    sys.addaudithook(hook)
    return counter


def kill_at_fs_event(prefix: Path, k: int, cut: float | None) -> None:
    """In a child: SIGKILL this process at the ``k``-th file-system audit event under ``prefix`` (1-based).

    With ``cut`` (0..1), when that event renames a temporary file into place (``os.replace`` of a
    ``.<name>.tmp*``/``.<name>.part`` file), the file is first cut to ``cut`` of its size: a kill in the middle
    of writing it. The event is written to the log (``KILL-POINT {json}``) before the kill."""
    from sae_cafe.artifacts import is_partial_file

    pre, seen = _prefix(prefix), [0]

    def hook(event: str, args: tuple) -> None:
        if event not in FS_EVENTS or not args or not _under(args[0], pre):
            return
        seen[0] += 1
        if seen[0] != k:
            return
        path = os.fsdecode(args[0])
        rec = {"event": event, "path": os.path.relpath(path, pre), "cut_to": None}
        if cut is not None and event == "os.rename" and os.path.isfile(path) and is_partial_file(
                os.path.basename(path)):
            size = os.path.getsize(path)
            os.truncate(path, int(size * cut))
            rec["cut_to"] = f"{int(size * cut)}/{size} bytes"
        os.write(2, f"\n{KILL_LINE}{json.dumps(rec)}\n".encode())
        os.kill(os.getpid(), signal.SIGKILL)

    sys.addaudithook(hook)


def deadlock() -> None:
    """In a child: block forever on a futex (a lock this thread already holds), like a child that inherited
    a lock held at fork time. The driver's self-test of its deadline uses it."""
    lock = threading.Lock()
    lock.acquire()
    lock.acquire()


def _prefix(p: Path) -> str:
    return str(Path(p).resolve()).rstrip(os.sep) + os.sep


def _under(p, prefix: str) -> bool:
    if not isinstance(p, (str, bytes, os.PathLike)):
        return False  # a file descriptor
    try:
        return os.fsdecode(p).startswith(prefix)
    except (TypeError, ValueError):
        return False


def count_replaces() -> list[int]:
    """In a child: count ``os.replace`` calls (the renames that publish files); returns the live counter."""
    counter, orig = [0], os.replace

    def replace(src, dst, *a, **kw):
        counter[0] += 1
        return orig(src, dst, *a, **kw)

    os.replace = replace
    return counter


def kill_at_replace(k: int, mode: str) -> None:
    """In a child: SIGKILL this process at the ``k``-th ``os.replace`` call (1-based): ``mode="mid-write"``
    cuts the temporary file to half its size and kills before the rename, ``"after"`` right after it."""
    seen, orig = [0], os.replace

    def replace(src, dst, *a, **kw):
        seen[0] += 1
        hit = seen[0] == k
        if hit and mode == "mid-write":
            if os.path.isfile(src):
                os.truncate(src, os.path.getsize(src) // 2)
            os.kill(os.getpid(), signal.SIGKILL)
        out = orig(src, dst, *a, **kw)
        if hit:
            os.kill(os.getpid(), signal.SIGKILL)
        return out

    os.replace = replace


def kill_point(log: Path) -> dict | None:
    """The ``KILL-POINT`` record a child wrote to ``log`` before killing itself (None: none written)."""
    if not log.exists():
        return None
    lines = [x for x in log.read_text(errors="replace").splitlines() if x.startswith(KILL_LINE)]
    return json.loads(lines[-1][len(KILL_LINE):]) if lines else None


# ----- the parent -----------------------------------------------------------------------------------------------
def status_name(status: int) -> str:
    if os.WIFSIGNALED(status):
        return "killed" if os.WTERMSIG(status) == signal.SIGKILL else f"signal {os.WTERMSIG(status)}"
    return "ok" if os.WEXITSTATUS(status) == 0 else f"exit {os.WEXITSTATUS(status)}"


def wait(pid: int, deadline_s: float, log: Path) -> tuple[str, float, dict | None]:
    """Wait for ``pid`` at most ``deadline_s`` seconds: ``(status, seconds, hang)``.

    ``status`` is ``ok``, ``killed``, ``exit N``, ``signal N`` or ``hung``; for ``hung`` the child's
    process group was SIGKILLed after :func:`diagnose` and ``hang`` holds what it found."""
    t0 = time.perf_counter()
    pause = 0.001
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status_name(status), time.perf_counter() - t0, None
        if time.perf_counter() - t0 > deadline_s:
            break
        time.sleep(pause)
        pause = min(pause * 2, 0.01)
    hang = diagnose(pid, log)
    hang["deadline_s"] = round(deadline_s, 1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    hang["after_kill"] = status_name(status)
    return "hung", time.perf_counter() - t0, hang


def _read(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace").strip()
    except OSError as e:
        return f"<unreadable: {e.strerror}>"


def diagnose(pid: int, log: Path) -> dict:
    """What a hung child is doing: per thread its state, kernel wait channel and kernel stack; the Python
    stacks of all threads (faulthandler on SIGUSR1, appended to its log); py-spy's native stacks if the
    ``py-spy`` tool is installed (else recorded as not available)."""
    threads = []
    for tid in sorted(os.listdir(f"/proc/{pid}/task")) if os.path.isdir(f"/proc/{pid}/task") else []:
        base = f"/proc/{pid}/task/{tid}"
        stat = _read(f"{base}/stat")
        threads.append({"tid": int(tid), "comm": _read(f"{base}/comm"),
                        "state": stat.rsplit(")", 1)[-1].split()[0] if ")" in stat else stat,
                        "wchan": _read(f"{base}/wchan"), "kernel_stack": _read(f"{base}/stack")[-1500:]})
    offset = log.stat().st_size if log.exists() else 0
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGUSR1)
    time.sleep(1.0)
    py_stack = log.read_bytes()[offset:].decode(errors="replace")[-4000:] if log.exists() else ""
    spy = shutil.which("py-spy")
    if spy:
        try:
            p = subprocess.run([spy, "dump", "--native", "--pid", str(pid)], capture_output=True, text=True,
                               timeout=30)
            native = (p.stdout + p.stderr)[-4000:]
        except subprocess.TimeoutExpired:
            native = "py-spy dump timed out"
    else:
        native = "py-spy not installed"
    return {"threads": threads, "python_stack": py_stack, "native_stack": native}
