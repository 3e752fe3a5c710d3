"""Warm kernels: each run's Jupyter kernel is forked from a process that has the heavy imports done.

Why: a sweep executes every run as a fresh notebook kernel (papermill), which isolates a crash or
an OOM and saves an executed notebook per run, but a fresh interpreter pays ~5-10 s of imports
(torch, transformers, peft, our axes) before the first cell: on a 2-core machine that was half of
``make study``. So a sweep starts one *zygote* that imports all of that once and then only
forks: each kernel is still a new process that no earlier run touched, started in milliseconds.

How it fits Jupyter unchanged (``WarmKernelManager``): the kernel manager launches, instead of
``python -m ipykernel_launcher -f conn.json``, a stdlib-only *shim* (``python -m
effllm_helpers.warmkernel shim -- -f conn.json``) that hands the zygote its arguments, cwd,
environment and stdin/stdout/stderr, and then stands in for the kernel process:

* signals sent to the shim (interrupt, terminate) are forwarded to the kernel;
* the shim exits as the kernel did (its exit code, or killed by the same signal), so a kernel
  that died of OOM or a crash is seen by nbclient exactly as before;
* a shim that is killed (sweep timeout, sweep killed) closes its connection and the zygote
  SIGKILLs that kernel's process group: nothing is left computing in the background;
* a zygote that is absent or dead is not an error: the shim ``exec``s the ordinary
  ``ipykernel_launcher`` (a cold start), and the sweep starts a new zygote before the next run.

The zygote refuses to serve (the sweep then runs cold kernels) if its imports started a Python
thread or initialised CUDA, since neither survives a fork; it never touches a GPU itself.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SOCKET_ENV = "EFFLLM_ZYGOTE"  # the zygote's socket path, seen by runners and their shims
DISABLE_ENV = "EFFLLM_WARM_KERNELS"  # "0" = every run starts a cold kernel
KERNEL_ENV = "EFFLLM_KERNEL_START"  # in a kernel: "zygote" when forked, unset when cold
# what every kernel of ours imports, then what each axis' notebook adds (the axes pull in
# transformers and peft): a sweep's zygote preloads only the axes it will run
PRELOAD_BASE = ("ipykernel.kernelapp", "ipykernel.ipkernel", "matplotlib_inline.backend_inline",
                "matplotlib.pyplot", "torch", "pandas", "effllm_helpers.run")
PRELOAD_AXIS = {"smoke": ("effllm_helpers.smoke",)}
PRELOAD_NOTEBOOK = ("transformers", "peft", "effllm_helpers.notebook_view",
                    "effllm_helpers.launch", "effllm_helpers.report.figures")
PRELOAD = (*PRELOAD_BASE, *PRELOAD_NOTEBOOK, "effllm_helpers.axes.architecture",
           "effllm_helpers.axes.finetuning", "effllm_helpers.axes.inference",
           "effllm_helpers.axes.cross_modal")


def preload_for(axes: list[str] | set[str]) -> list[str]:
    """The modules a zygote imports for runs of these axes (base first, no duplicates)."""
    mods = list(PRELOAD_BASE)
    for axis in sorted(axes):
        mods += PRELOAD_AXIS.get(axis, (*PRELOAD_NOTEBOOK, f"effllm_helpers.axes.{axis}"))
    return list(dict.fromkeys(mods))
_HDR = struct.Struct("!I")
_FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1,
              signal.SIGUSR2)


def is_listening(path: str) -> bool:
    """Whether a zygote's socket is there (it appears only once the zygote is ready)."""
    import stat

    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def enabled() -> bool:
    return os.environ.get(DISABLE_ENV, "1").strip().lower() not in ("0", "false", "no", "off")


# ------------------------------------------------------------------------------ wire format
def _send(sock: socket.socket, obj: dict[str, Any], fds: list[int] | None = None) -> None:
    data = json.dumps(obj).encode()
    msg = _HDR.pack(len(data)) + data
    if fds:
        socket.send_fds(sock, [msg[:4096]], fds)
        sock.sendall(msg[4096:])
    else:
        sock.sendall(msg)


def _recv_exact(sock: socket.socket, n: int, buf: bytes = b"") -> bytes:
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise ConnectionError("connection closed mid-message")
        buf += chunk
    return buf


def _recv(sock: socket.socket, with_fds: bool = False) -> tuple[dict[str, Any], list[int]]:
    fds: list[int] = []
    if with_fds:
        first, fds, _, _ = socket.recv_fds(sock, 4096, 3)
        if not first:
            raise ConnectionError("connection closed")
    else:
        first = b""
    head = _recv_exact(sock, _HDR.size, first)
    (n,) = _HDR.unpack(head[:_HDR.size])
    body = _recv_exact(sock, _HDR.size + n, head)[_HDR.size:]
    return json.loads(body), fds


# ------------------------------------------------------------------------------ the zygote
def _preload(modules: list[str] | tuple[str, ...] = PRELOAD) -> str | None:
    """Import what kernels need; None when forking is safe, else why not."""
    os.environ.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    for name in modules:
        try:
            __import__(name)
        except ImportError as exc:  # the kernel will meet (and report) it itself
            print(f"warm kernels: not preloaded {name}: {exc}", file=sys.stderr, flush=True)
    import threading

    # native pools (OpenBLAS, jemalloc) handle fork themselves; a Python thread would be lost
    if threading.active_count() > 1:
        names = ", ".join(t.name for t in threading.enumerate() if t is not threading.main_thread())
        return f"the imports started Python thread(s) ({names}); forking them is unsafe"
    try:
        maps = Path("/proc/self/maps").read_text()
    except OSError:
        maps = ""
    if "libcuda.so" in maps:
        return ("the imports loaded the CUDA driver (libcuda), which a forked process may not "
                "be able to use")
    return None


def _child(conn: socket.socket, req: dict[str, Any], fds: list[int],
           closing: list[socket.socket]) -> None:
    """In the forked kernel: become the process the shim describes, then run ipykernel."""
    code = 1
    try:
        for s in closing:
            s.close()
        conn.close()
        os.setsid()
        for sig in (*_FORWARDED, signal.SIGCHLD, signal.SIGPIPE):
            signal.signal(sig, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.set_wakeup_fd(-1)
        for target, fd in zip((0, 1, 2), fds, strict=False):
            os.dup2(fd, target)
            os.close(fd)
        if sys.path and sys.path[0] in ("", os.getcwd()):  # as ipykernel_launcher does
            del sys.path[0]
        os.chdir(req["cwd"])
        os.environ.clear()
        os.environ.update(req["env"])
        os.environ[KERNEL_ENV] = "zygote"
        sys.argv = ["ipykernel_launcher", *req["argv"]]
        import random

        random.seed()  # a fresh interpreter's seed, not the zygote's (runs seed their own)
        from ipykernel import kernelapp

        kernelapp.launch_new_instance(argv=req["argv"])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - reported on the kernel's stderr, then exit
        import traceback

        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def serve(path: str, parent: int | None = None,
          modules: list[str] | tuple[str, ...] = PRELOAD) -> int:
    """Preload ``modules``, then fork a kernel for every shim that connects to ``path``; exits
    when the process ``parent`` is gone or on SIGTERM (taking its kernels with it)."""
    why = _preload(modules)
    if why:
        print(f"warm kernels off: {why}", file=sys.stderr, flush=True)
        return 3
    rd, wr = os.pipe()
    os.set_blocking(wr, False)
    signal.set_wakeup_fd(wr)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    tmp = path + ".tmp"
    if os.path.exists(tmp):
        os.unlink(tmp)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(tmp)
    listener.listen(64)
    os.replace(tmp, path)  # the socket appears only once the zygote is ready
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ, "accept")
    sel.register(rd, selectors.EVENT_READ, "signal")
    kernels: dict[int, socket.socket] = {}  # kernel pid -> its shim's connection
    try:
        while not stop and (parent is None or os.getppid() == parent):
            for key, _ in sel.select(timeout=1.0):
                if key.data == "accept":
                    conn, _ = listener.accept()
                    _fork_one(conn, listener, kernels, sel)
                elif key.data == "signal":
                    os.read(rd, 512)
                else:  # a shim's connection: readable only when it closed (the shim died)
                    sel.unregister(key.fileobj)
                    _kill_group(key.data)
            _reap(kernels, sel)
    finally:
        for pid in list(kernels):
            _kill_group(pid)
        listener.close()
        with contextlib.suppress(OSError):
            os.unlink(path)
    return 0


def _fork_one(conn: socket.socket, listener: socket.socket, kernels: dict[int, socket.socket],
              sel: selectors.BaseSelector) -> None:
    try:
        conn.settimeout(10)
        req, fds = _recv(conn, with_fds=True)
    except (OSError, ValueError, ConnectionError):
        conn.close()
        return
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        _child(conn, req, fds, [listener, *kernels.values()])
    for fd in fds:
        os.close(fd)
    try:
        _send(conn, {"pid": pid})
    except OSError:
        _kill_group(pid)
    kernels[pid] = conn
    sel.register(conn, selectors.EVENT_READ, pid)


def _reap(kernels: dict[int, socket.socket], sel: selectors.BaseSelector) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        conn = kernels.pop(pid, None)
        if conn is None:
            continue
        with contextlib.suppress(KeyError):
            sel.unregister(conn)
        msg = ({"signal": os.WTERMSIG(status)} if os.WIFSIGNALED(status)
               else {"exit": os.waitstatus_to_exitcode(status)})
        with contextlib.suppress(OSError):
            _send(conn, msg)
        conn.close()


def _kill_group(pid: int) -> None:
    for kill in (os.killpg, os.kill):
        with contextlib.suppress(OSError):
            kill(pid, signal.SIGKILL)


# ------------------------------------------------------------------------------ the shim
def shim(argv: list[str]) -> int:
    """Stand in for the kernel process: ask the zygote for a kernel, forward signals to it, exit
    as it exits. Without a zygote, become a cold ``ipykernel_launcher``."""
    _die_with_parent()  # a killed runner takes its shim along; the zygote then kills the kernel
    path = os.environ.get(SOCKET_ENV, "")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
        _send(sock, {"argv": argv, "cwd": os.getcwd(), "env": dict(os.environ)}, [0, 1, 2])
        pid = int(_recv(sock)[0]["pid"])
    except (OSError, ValueError, KeyError, ConnectionError):
        sock.close()
        os.execv(sys.executable, [sys.executable, "-m", "ipykernel_launcher", *argv])
    for sig in _FORWARDED:
        signal.signal(sig, lambda s, _f: _forward(pid, s))
    try:
        msg = _recv(sock)[0]
    except (OSError, ValueError, ConnectionError):
        msg = {"exit": 1}  # the zygote itself died; it killed (or will kill) the kernel
    if "signal" in msg:
        signal.signal(int(msg["signal"]), signal.SIG_DFL)
        os.kill(os.getpid(), int(msg["signal"]))
        time.sleep(1)
    return int(msg.get("exit", 1))


def _die_with_parent() -> None:
    import ctypes
    import ctypes.util

    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").prctl(1, signal.SIGKILL)


def _forward(pid: int, sig: int) -> None:
    with contextlib.suppress(OSError):
        os.kill(pid, sig)


# ------------------------------------------------------------------------------ Jupyter side
def _manager_class():
    from jupyter_client.manager import AsyncKernelManager

    class WarmKernelManager(AsyncKernelManager):
        """A kernel manager whose ipykernel is started through the zygote's shim."""

        def format_kernel_cmd(self, extra_arguments: list[str] | None = None) -> list[str]:
            cmd = super().format_kernel_cmd(extra_arguments)
            if "ipykernel_launcher" not in cmd or not os.environ.get(SOCKET_ENV):
                return cmd
            rest = cmd[cmd.index("ipykernel_launcher") + 1:]
            return [sys.executable, "-m", "effllm_helpers.warmkernel", "shim", "--", *rest]

    return WarmKernelManager


def manager_class():
    """The kernel manager class papermill should use (nbclient's ``kernel_manager_class``)."""
    return _manager_class()


class Zygote:
    """The sweep's handle on its zygote: started once, restarted if it died, stopped at the end.

    ``env`` is the environment the runs will see (thread counts above all), so that what the
    imports read from it matches a cold kernel's."""

    def __init__(self, env: dict[str, str] | None = None, start_timeout_s: float = 300,
                 modules: list[str] | tuple[str, ...] = PRELOAD) -> None:
        self._dir = tempfile.mkdtemp(prefix="effllm-zygote-")
        self.path = os.path.join(self._dir, "zygote.sock")
        self.env = dict(os.environ if env is None else env)
        self.start_timeout_s = start_timeout_s
        self.modules = list(modules)
        self.proc: subprocess.Popen | None = None
        self.starts = 0
        self.refused: str | None = None

    MAX_STARTS = 3  # a zygote that keeps dying is given up: the runs start cold

    def ensure(self) -> str | None:
        """Start (or restart) the zygote without waiting; the socket path to hand to runners,
        or None when warm kernels are off, refused or given up."""
        if self.refused or not enabled():
            return None
        if self.proc is None or self.proc.poll() is not None:
            if self._gave_up():
                return None
            with contextlib.suppress(OSError):
                os.unlink(self.path)
            log = open(os.path.join(self._dir, "zygote.log"), "ab")  # noqa: SIM115
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "effllm_helpers.warmkernel", "serve", self.path,
                 "--parent", str(os.getpid()), "--preload", ",".join(self.modules)],
                env=self.env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                start_new_session=True)
            log.close()
            self.starts += 1
        return self.path

    def _gave_up(self) -> bool:
        """After the zygote exited: whether to stop starting it (it refused to serve, or died
        ``MAX_STARTS`` times); ``refused`` then says why."""
        if self.proc is None or self.refused:
            return bool(self.refused)
        if self.proc.returncode == 3:
            self.refused = self._log_tail() or "the zygote refused to serve"
        elif self.starts >= self.MAX_STARTS:
            self.refused = (f"warm kernels off: the zygote died {self.starts} times (last exit "
                            f"{self.proc.returncode}; {self._log_tail() or 'no log'})")
        return bool(self.refused)

    def wait_ready(self, timeout_s: float | None = None) -> bool:
        """Block until the zygote listens (True) or has exited / timed out (False)."""
        deadline = time.monotonic() + (self.start_timeout_s if timeout_s is None else timeout_s)
        while time.monotonic() < deadline:
            if os.path.exists(self.path):
                return True
            if self.proc is None or self.proc.poll() is not None:
                self._gave_up()
                return False
            time.sleep(0.05)
        return False

    def _log_tail(self) -> str:
        try:
            return Path(self._dir, "zygote.log").read_text().strip().splitlines()[-1]
        except (OSError, IndexError):
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        import shutil

        shutil.rmtree(self._dir, ignore_errors=True)


def _main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["shim"]:
        rest = args[1:]
        return shim(rest[1:] if rest[:1] == ["--"] else rest)
    if args[:1] == ["serve"] and len(args) >= 2:
        parent = int(args[args.index("--parent") + 1]) if "--parent" in args else None
        mods = (args[args.index("--preload") + 1].split(",") if "--preload" in args
                else PRELOAD)
        return serve(args[1], parent, mods)
    print("usage: python -m effllm_helpers.warmkernel serve SOCKET [--parent PID] "
          "[--preload MOD,MOD] | shim -- KERNEL-ARGS", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main())
