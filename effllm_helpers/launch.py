"""One study point on several processes (GPUs), from inside the notebook that runs it.

A params ``launch: {processes: N, strategy: ddp|fsdp}`` makes ``run_point`` start N processes,
each running the axis function on its own device. They are forked with accelerate's
``notebook_launcher`` while this process has not touched CUDA, and spawned otherwise (a forked
child cannot use a CUDA context it inherited; importing some libraries, e.g. torchao through
transformers, already initialises CUDA). Spawned ranks re-import the function, so it must be a
module-level function (the axis functions are); ``train.make_accelerator`` reads the strategy from
``$EFFLLM_LAUNCH_STRATEGY``. Every rank combines its Meter with the others' (the training
record is one run, not N), and rank 0's return value comes back to the notebook through a
pickle in a private temporary folder, since the launcher itself returns nothing.
"""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .train import STRATEGIES, STRATEGY_ENV

RESULT_NAME = "rank0.pkl"


def free_port() -> int:
    """A TCP port free on the loopback now, for the ranks' rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def launch_spec(params: Any) -> tuple[int, str]:
    """``(processes, strategy)`` of a params object or dict; ``(1, "ddp")`` without ``launch``."""
    spec = params.get("launch") if isinstance(params, dict) else getattr(params, "launch", None)
    if spec is None:
        return 1, "ddp"
    if not isinstance(spec, dict):
        spec = spec.model_dump()
    return int(spec.get("processes", 1)), str(spec.get("strategy", "ddp"))


def run_point(fn: Callable[..., Any], params: Any, *args: Any, **kwargs: Any) -> Any:
    """``fn(params, *args, **kwargs)``, on ``params.launch.processes`` processes when > 1."""
    processes, strategy = launch_spec(params)
    if processes <= 1:
        return fn(params, *args, **kwargs)
    return launch(fn, (params, *args), kwargs, processes=processes, strategy=strategy)


def _rank_entry(fn: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any],
                result: Path, strategy: str) -> Callable[[], None]:
    """What each launched process runs: the function, then rank 0 saves what it returned.

    A failure on any rank propagates (the launcher raises), so the notebook fails as a whole.
    A plain function: torch's elastic launcher names its workers after ``__qualname__``."""

    def effllm_point() -> None:
        os.environ[STRATEGY_ENV] = strategy
        _own_device()
        out = fn(*args, **kwargs)
        if int(os.environ.get("RANK", "0")) == 0:
            tmp = result.with_suffix(".tmp")
            with open(tmp, "wb") as f:
                pickle.dump(out, f)
            os.replace(tmp, result)

    return effllm_point


START_METHODS = ("auto", "fork", "spawn")


def start_method(requested: str = "auto") -> str:
    """``fork`` (accelerate's notebook launcher) unless CUDA is already initialised here, then
    ``spawn``: a forked rank cannot use its parent's CUDA context."""
    if requested not in START_METHODS:
        raise ValueError(f"start method {requested!r}: must be one of {', '.join(START_METHODS)}")
    if requested != "auto":
        return requested
    import torch

    return "spawn" if torch.cuda.is_initialized() else "fork"


def _spawned_rank(index: int, fn: Callable[..., Any], args: tuple[Any, ...],
                  kwargs: dict[str, Any], result: Path, strategy: str, world: int,
                  port: int) -> None:
    """One spawned rank: the rendezvous environment accelerate reads, then the function."""
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": str(index),
                       "LOCAL_RANK": str(index), "WORLD_SIZE": str(world),
                       "LOCAL_WORLD_SIZE": str(world)})
    _rank_entry(fn, args, kwargs, result, strategy)()


def _check_picklable(fn: Callable[..., Any], args: tuple[Any, ...],
                     kwargs: dict[str, Any]) -> None:
    """Spawned ranks receive the function and its arguments pickled: say so plainly up front
    rather than with a traceback from inside torch.multiprocessing."""
    try:
        pickle.dumps((fn, args, kwargs))
    except Exception as exc:
        raise RuntimeError(
            f"launch: the ranks are spawned (CUDA is already initialised in this process), so "
            f"{getattr(fn, '__qualname__', fn)!r} must be a module-level function (e.g. an "
            f"axis' run) and its arguments picklable: {type(exc).__name__}: {exc}") from exc


def _own_device() -> None:
    """Make this rank's GPU the current device before the axis builds its model: a model made
    on ``cuda`` would otherwise land on GPU 0 in every rank (FSDP refuses that outright)."""
    import torch

    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))


def launch(fn: Callable[..., Any], args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None,
           *, processes: int, strategy: str = "ddp", method: str = "auto") -> Any:
    """Run ``fn(*args, **kwargs)`` on ``processes`` ranks (one device each on GPU, gloo
    processes on a CPU) and return rank 0's result. ``method``: see :func:`start_method`."""
    if strategy not in STRATEGIES:
        raise ValueError(f"launch strategy {strategy!r}: must be one of {', '.join(STRATEGIES)}")
    if processes < 1:
        raise ValueError(f"launch processes must be >= 1, got {processes}")
    _check_devices(processes)
    how = start_method(method)
    from accelerate.state import AcceleratorState

    # an Accelerator made earlier in this process (a previous single-process run in the same
    # kernel) leaves shared state the launcher refuses to fork over; the ranks build their own
    AcceleratorState._reset_state(reset_partial_state=True)
    with tempfile.TemporaryDirectory(prefix="effllm-launch-") as tmp:
        result = Path(tmp) / RESULT_NAME
        if how == "fork":
            from accelerate import notebook_launcher

            notebook_launcher(_rank_entry(fn, args, kwargs or {}, result, strategy),
                              num_processes=processes, use_port=str(free_port()))
        else:
            import torch.multiprocessing as mp

            _check_picklable(fn, args, kwargs or {})

            mp.start_processes(_spawned_rank, nprocs=processes, join=True, start_method="spawn",
                               args=(fn, args, kwargs or {}, result, strategy, processes,
                                     free_port()))
        if not result.exists():
            raise RuntimeError(f"{processes} launched processes ended but rank 0 returned "
                               "nothing")
        with open(result, "rb") as f:
            return pickle.load(f)


def _check_devices(processes: int) -> None:
    """On a GPU machine one rank per GPU: more ranks than visible GPUs would share devices and
    mix their energy and memory. Counted without initialising CUDA (the launcher may fork)."""
    import torch

    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    n = (len([g for g in visible.split(",") if g.strip()]) if visible is not None
         else torch.cuda.device_count())
    if n and processes > n:
        raise ValueError(f"launch.processes={processes} but only {n} GPU(s) are visible")
