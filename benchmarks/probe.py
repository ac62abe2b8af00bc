"""One ``maxframes`` probe, run in a fresh child process: does T frames fit in the memory budget?

On CPU the budget bounds the process's resident memory: a watchdog thread ends the probe as soon as RSS
passes it, and an address-space limit stops single allocations far beyond it. On CUDA it bounds the
memory torch may allocate (set_per_process_memory_fraction), and running out is the answer.
"""

from __future__ import annotations

import multiprocessing
import os
import resource
import threading
import time
from dataclasses import dataclass
from typing import Any, Optional

from .measure import DeviceMemory, device_sync, peak_rss_bytes, reset_peak_rss, rss_bytes

_OOM_WORDS = ("out of memory", "can't allocate", "cannot allocate", "bad_alloc", "defaultcpuallocator")


@dataclass
class ProbeJob:
    """What to run: the token engine alone (``kind="tokens"``) or the whole runtime with a feature policy."""

    kind: str
    checkpoint: str
    device: str
    threads: int
    frames: int
    window: int
    ratio: float
    budget_bytes: int
    policy: str = "auto"
    size: tuple[int, int] = (360, 640)
    # tokens benchmark: untimed runs, then timed ones; the peak is measured over all of them
    warmup: int = 0
    repeats: int = 0


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


class _Watchdog(threading.Thread):
    """Ends the process (after reporting) when its RSS passes the budget."""

    def __init__(self, budget: int, report: Any) -> None:
        super().__init__(daemon=True)
        self.budget, self.report, self.stop = budget, report, False

    def run(self) -> None:
        page = os.sysconf("SC_PAGE_SIZE")
        with open("/proc/self/statm") as statm:
            while not self.stop:
                statm.seek(0)
                rss = int(statm.read().split()[1]) * page
                if rss > self.budget:
                    self.report({"ok": False, "reason": "over budget", "peak_bytes": rss})
                    os._exit(0)
                time.sleep(0.002)


def _limit_address_space(budget: int) -> None:
    """Address space = what is mapped now but not resident, plus the budget and 1 GiB of slack."""
    unresident = (_status_kb("VmSize") - _status_kb("VmRSS")) * 1024
    limit = unresident + budget + 2**30
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    if hard == resource.RLIM_INFINITY or limit < hard:
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _reset_peaks(device: str) -> None:
    """Peaks count from here: what is resident now (model, inputs) stays counted, the loading transient not."""
    DeviceMemory(device).reset()
    reset_peak_rss()


def _tokens(job: ProbeJob, n: int, c: int, frames: int) -> tuple[Any, Any]:
    """Random frame queries (frames, k, C) of the kept tokens and their slots (None when nothing is pruned)."""
    import torch

    from vita_train.inference.pruning import kept_per_frame

    k = kept_per_frame(n, job.ratio)
    gen = torch.Generator().manual_seed(0)
    queries = torch.randn(frames, k, c, generator=gen).to(job.device)
    index = None if k == n else torch.rand(frames, n, generator=gen).argsort(1)[:, :k].sort(1).values.to(job.device)
    return queries, index


def token_engine(checkpoint: str, device: str) -> Any:
    """The checkpoint's VitaModule alone, in eval mode: the process holds torch and the token engine, not the detector.

    A native checkpoint is memory-mapped and only its ``vita.*`` tensors are read; another layout goes
    through the full loader and everything but the VitaModule is dropped.
    """
    import gc

    import torch

    from vita_train.checkpoint.native import is_native
    from vita_train.config import ModelConfig
    from vita_train.modeling.vita_module import VitaModule

    raw = torch.load(checkpoint, map_location="cpu", weights_only=True, mmap=True)
    if is_native(raw):
        vita = VitaModule.from_config(ModelConfig.from_dict(raw["config"]))
        vita.load_state_dict({k[len("vita."):]: v for k, v in raw["model"].items() if k.startswith("vita.")})
        del raw
    else:
        from vita_train import load_model

        del raw
        vita = load_model(checkpoint).vita
    gc.collect()
    return vita.eval().to(device)


def _run_tokens(job: ProbeJob) -> dict[str, Any]:
    """The token engine on T random frames' tokens; with ``repeats``, times, the memory it grew by and the
    process's peak (model loading included)."""
    import torch

    vita = token_engine(job.checkpoint, job.device)
    n, c = vita.fq_pos.num_embeddings, vita.fq_pos.embedding_dim
    sync = device_sync(job.device)

    def track(queries: Any, index: Any) -> None:
        # as the runtime calls it: the engine overwrites the tokens in place (its values do not change the cost)
        with torch.no_grad():
            vita(queries.unsqueeze(0), index, window=job.window, overwrite_input=True)
        sync()

    if not job.repeats:
        queries, index = _tokens(job, n, c, job.frames)
        _reset_peaks(job.device)
        track(queries, index)
        return {}
    # one frame first, so one-time library set-up (thread pools, kernel caches) is not counted; the peak
    # then counts from before the T frames' tokens exist (holding them is part of the cost of T) and
    # includes the warm-up, because later runs reuse memory the allocator kept from the first
    track(*_tokens(job, n, c, 1))
    loading_peak = peak_rss_bytes() or 0
    memory = DeviceMemory(job.device)
    memory.reset()
    reset_peak_rss()
    baseline = memory.peak() if memory.cuda else rss_bytes()
    queries, index = _tokens(job, n, c, job.frames)
    for _ in range(job.warmup):
        track(queries, index)
    times = []
    for _ in range(job.repeats):
        start = time.perf_counter()
        track(queries, index)
        times.append(time.perf_counter() - start)
    peak = memory.peak() if memory.cuda else peak_rss_bytes()
    process_peak = max(loading_peak, peak_rss_bytes() or 0)
    return {"times": times, "growth_bytes": peak - baseline, "baseline_bytes": baseline, "process_peak_bytes": process_peak}


def _run_runtime(job: ProbeJob) -> dict[str, Any]:
    import runtime
    from vita_train.data.synthetic import moving_shapes_clip

    segmenter = runtime.load(job.checkpoint, backend="torch", device=job.device)
    clip = moving_shapes_clip(8, *job.size, seed=0)
    frames = (clip[i % len(clip)] for i in range(job.frames))  # an iterator: nothing held for the whole video
    _reset_peaks(job.device)
    segmenter.segment(frames, window=job.window, prune_ratio=job.ratio, feature_policy=job.policy)
    return {}


def run_probe(job: ProbeJob, conn: Any) -> None:
    """Child process entry: run ``job`` and send {ok, reason, peak_bytes, seconds} through ``conn``."""
    import torch

    torch.set_num_threads(job.threads)
    lock = threading.Lock()
    sent = []

    def report(result: dict) -> None:
        with lock:  # the watchdog and the main thread may both answer; the first one counts
            if not sent:
                sent.append(True)
                conn.send(result)
                conn.close()

    cuda = job.device.startswith("cuda")
    watchdog: Optional[_Watchdog] = None
    if cuda:
        total = torch.cuda.get_device_properties(torch.device(job.device)).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, job.budget_bytes / total), torch.device(job.device))
    else:
        _limit_address_space(job.budget_bytes)
        watchdog = _Watchdog(job.budget_bytes, report)
        watchdog.start()
    start = time.perf_counter()
    try:
        extra = (_run_tokens if job.kind == "tokens" else _run_runtime)(job)
        if cuda:
            torch.cuda.synchronize()
    except (MemoryError, RuntimeError) as e:
        if watchdog is not None:
            watchdog.stop = True
        if isinstance(e, MemoryError) or any(w in str(e).lower() for w in _OOM_WORDS):
            peak = torch.cuda.max_memory_allocated() if cuda else peak_rss_bytes()
            report({"ok": False, "reason": "over budget", "peak_bytes": peak})
            return
        raise
    seconds = time.perf_counter() - start
    if watchdog is not None:
        watchdog.stop = True
    peak = torch.cuda.max_memory_allocated() if cuda else (peak_rss_bytes() or rss_bytes())
    report({"ok": peak <= job.budget_bytes, "reason": "" if peak <= job.budget_bytes else "over budget",
            "peak_bytes": peak, "seconds": seconds, **extra})


# ----- parent side ---------------------------------------------------------------------------------
def forkserver() -> Any:
    """A multiprocessing context whose children fork from a server that imported torch but ran nothing."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "benchmarks.probe", "runtime", "vita_train.checkpoint.loader"])
    return ctx


def probe(ctx: Any, job: ProbeJob, timeout: float) -> dict[str, Any]:
    """Run one probe in a child; {ok, reason, peak_bytes, seconds}."""
    receive, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=run_probe, args=(job, send), daemon=True)
    proc.start()
    send.close()
    try:
        if receive.poll(timeout):
            try:
                result = receive.recv()
            except EOFError:
                result = None
        else:
            result = {"ok": False, "reason": "time limit"}
    finally:
        proc.join(5)
        if proc.is_alive():
            proc.kill()
            proc.join()
        receive.close()
    if result is None:
        # killed by the kernel's OOM killer (SIGKILL) or crashed: treat as not fitting, say so
        reason = "killed (out of memory?)" if proc.exitcode == -9 else f"child exited with code {proc.exitcode}"
        result = {"ok": False, "reason": reason}
    return result
