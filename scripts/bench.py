#!/usr/bin/env python3
"""cukv benchmark driver (run on a GPU machine): ``python scripts/bench.py [--only NAME ...]``.

It measures a large device-to-device copy first (bytes read + written), then runs the benchmark
*sections*. A section is a function ``bench_<name>(ctx)`` in ``scripts/bench_<name>.py``; every such
file in ``scripts/`` is found automatically, ``--only NAME`` (repeatable) selects sections, and a
section named with ``--only`` whose file is missing is skipped with a note. A section that raises is
reported as failed and the others still run.

For each kernel a section reports the median time (CUDA events around back-to-back launches, after
warm-up, queued behind a short spin kernel so host overhead is not timed), GB/s over the *minimal*
bytes (inputs read once + outputs written once), % of the copy measured in the same run, and a peer
(``torch.compile`` of the same math, with torch eager in ``extra`` where useful) with its time.

Outputs (merged: records of the sections run now replace that section's old records):
  * ``benchmarks/latest.json``: a list of ``{op, shape, ms, gbps, pct_copy, peer, peer_ms, extra}``;
    ``extra`` holds ``section``, ``device``, ``copy_gbps`` and section-specific figures;
  * ``BENCHMARKS.md``: device, command, copy bandwidth and one table per section;
  * ``benchmarks/meta.json``: per section, the device, versions, command, date, copy GB/s and notes
    of the run that produced its records (so merged runs keep their own baselines).

Writing a section::

    def bench_mything(ctx):
        x = ctx.cp.random.standard_normal((1 << 26,), dtype=ctx.cp.float32)
        ms = ctx.time(lambda: cukv.mything(x))
        peer_ms = ctx.time_peer(lambda t: t * 2, ctx.to_torch(x))   # torch.compile, or None
        ctx.record("mything", x.shape, ms, nbytes=2 * x.nbytes, peer="torch.compile", peer_ms=peer_ms)
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for p in (str(ROOT), str(HERE)):
    if p not in sys.path:
        sys.path.insert(0, p)

DEFAULT_SECTIONS = ("codec", "norm")      # listed first, in this order; others follow alphabetically

_SPIN_SRC = r"""
extern "C" __global__ void cukv_bench_spin(long long cycles) {
  const long long t0 = clock64();
  while (clock64() - t0 < cycles) { }
}
"""


class Ctx:
    """What a section gets: CuPy, torch (or None), timing, peers and recording.

    Attributes
    ----------
    cp : module
        CuPy.
    torch : module or None
        torch when importable with CUDA, else None (peers are then skipped).
    device : str
        GPU name.
    copy_gbps : float
        Device-to-device copy bandwidth of this run, bytes read + written per second / 1e9.
    l2_bytes : int
        L2 cache size; inputs smaller than ``3 * l2_bytes`` should be rotated (:meth:`rotation`).
    """

    def __init__(self, *, copy_bytes: int = 1 << 30, reps: int = 10, batches: int = 7):
        self.last_host_us = 0.0   # host microseconds of one call in the last time()
        import cupy as cp  # noqa: PLC0415

        self.cp = cp
        self.reps = reps
        self.batches = batches
        dev = cp.cuda.Device()
        props = cp.cuda.runtime.getDeviceProperties(dev.id)
        name = props["name"]
        self.device = name.decode() if isinstance(name, bytes) else str(name)
        self.cc = dev.compute_capability
        self.l2_bytes = int(props.get("l2CacheSize", 50 << 20))
        self.clock_khz = int(props.get("clockRate", 1_500_000))
        self._spin = cp.RawKernel(_SPIN_SRC, "cukv_bench_spin")
        self.records: list[dict] = []
        self.notes: list[str] = []
        self.section: str | None = None
        self.torch = self._import_torch()
        self.copy_gbps = self._measure_copy(copy_bytes)

    # ----------------------------------------------------------------------------- environment
    def _import_torch(self):
        try:
            import torch  # noqa: PLC0415

            if not torch.cuda.is_available():
                self.notes.append("torch has no CUDA device: peers skipped")
                return None
            return torch
        except Exception as e:  # noqa: BLE001
            self.notes.append(f"torch not importable ({type(e).__name__}: {e}): peers skipped")
            return None

    def versions(self) -> str:
        cp = self.cp
        parts = [f"CuPy {cp.__version__}", f"CUDA runtime {cp.cuda.runtime.runtimeGetVersion()}"]
        if self.torch is not None:
            parts.append(f"torch {self.torch.__version__}")
        parts.append(f"Python {platform.python_version()}")
        return ", ".join(parts)

    # ----------------------------------------------------------------------------- timing
    def _queue_ahead(self, us: float = 300.0) -> None:
        """Occupy the GPU with a spin kernel so the launches that follow queue up behind it."""
        cycles = int(us * self.clock_khz / 1000.0)
        self._spin((1,), (1,), (self.cp.int64(cycles),))

    def time(self, fn, *, inputs=None, reps: int | None = None, batches: int | None = None,
             warmup: int = 2) -> float:
        """Median milliseconds of one call of ``fn``.

        ``inputs``: optional list of argument tuples, cycled through call by call (rotate small inputs
        out of L2); otherwise ``fn()`` is called. Each batch is ``reps`` back-to-back calls between two
        CUDA events on the current stream, queued behind a spin kernel; the result is the median over
        ``batches`` of (batch time / reps). Works for anything that launches on the current CUDA
        stream (CuPy and, on the legacy default stream, torch).
        """
        cp = self.cp
        reps = reps or self.reps
        batches = batches or self.batches
        if inputs:
            k = [0]

            def call():
                args = inputs[k[0] % len(inputs)]
                k[0] += 1
                return fn(*args)
        else:
            call = fn
        for _ in range(warmup):
            call()
        cp.cuda.Device().synchronize()
        # host time of one call, measured behind a long spin so no call waits for the GPU; the spin
        # before each timed batch then covers the whole batch's host time, so the figure is GPU time
        # (cukv's Python per call, 0.1-0.5 ms, would otherwise be what is timed for small kernels)
        n_host = min(reps, 10)
        self._queue_ahead(3000.0 * n_host)
        t0 = time.perf_counter()
        for _ in range(n_host):
            call()
        self.last_host_us = (time.perf_counter() - t0) / n_host * 1e6
        cp.cuda.Device().synchronize()
        out = []
        for _ in range(batches):
            start, end = cp.cuda.Event(), cp.cuda.Event()
            self._queue_ahead(min(50000.0, max(300.0, 2.0 * self.last_host_us * reps + 300.0)))
            start.record()
            for _ in range(reps):
                call()
            end.record()
            end.synchronize()
            out.append(cp.cuda.get_elapsed_time(start, end) / reps)
        return statistics.median(out)

    def rotation(self, nbytes: int, cap: int = 64) -> int:
        """How many input copies of ``nbytes`` to cycle through so each call misses L2 (>= 3x L2)."""
        return max(1, min(cap, math.ceil(3 * self.l2_bytes / max(1, int(nbytes)))))

    def _measure_copy(self, nbytes: int) -> float:
        cp = self.cp
        src = cp.empty(nbytes, dtype=cp.uint8)
        dst = cp.empty(nbytes, dtype=cp.uint8)
        src.fill(1)
        kind = cp.cuda.runtime.memcpyDeviceToDevice

        def copy():
            cp.cuda.runtime.memcpyAsync(dst.data.ptr, src.data.ptr, nbytes, kind,
                                        cp.cuda.get_current_stream().ptr)

        ms = self.time(copy)
        gbps = 2 * nbytes / ms / 1e6
        self.section = "copy"
        self.records.append(self._row("copy (device to device, cudaMemcpyAsync)", (nbytes,), ms,
                                      2 * nbytes, gbps_ref=gbps))
        self.section = None
        del src, dst
        cp.get_default_memory_pool().free_all_blocks()
        return gbps

    # ----------------------------------------------------------------------------- torch peers
    def to_torch(self, a):
        """A torch tensor sharing ``a``'s memory (DLPack), or None without torch."""
        if self.torch is None:
            return None
        return self.torch.from_dlpack(a)

    def from_torch(self, t):
        return self.cp.from_dlpack(t)

    def compile(self, fn, **kw):
        """``torch.compile(fn)`` (None without torch)."""
        if self.torch is None:
            return None
        return self.torch.compile(fn, **kw)

    def time_peer(self, fn, *args, compiled: bool = True, **kw):
        """Median ms of torch ``fn(*args)`` (``torch.compile``d unless ``compiled=False``), or None when
        torch is missing or the peer fails (the failure goes to the notes)."""
        if self.torch is None or any(a is None for a in args):
            return None
        try:
            f = self.compile(fn) if compiled else fn
            with self.torch.no_grad():
                f(*args)                       # compile outside the timing
                self.torch.cuda.synchronize()
                return self.time(lambda: f(*args), **kw)
        except Exception as e:  # noqa: BLE001
            what = "torch.compile" if compiled else "torch eager"
            self.notes.append(f"[{self.section}] {what} peer {getattr(fn, '__name__', fn)} failed: "
                              f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
            return None

    # ----------------------------------------------------------------------------- recording
    def _row(self, op, shape, ms, nbytes, *, peer=None, peer_ms=None, extra=None, gbps_ref=None):
        gbps = nbytes / ms / 1e6
        ref = gbps_ref if gbps_ref is not None else self.copy_gbps
        ex = {"section": self.section, "device": self.device, "copy_gbps": round(ref, 1),
              "bytes": int(nbytes)}
        ex.update(extra or {})
        return {"op": op, "shape": [int(s) for s in shape], "ms": round(ms, 5), "gbps": round(gbps, 1),
                "pct_copy": round(100.0 * gbps / ref, 1), "peer": peer,
                "peer_ms": None if peer_ms is None else round(peer_ms, 5), "extra": ex}

    def record(self, op: str, shape, ms: float, nbytes: int, *, peer: str | None = None,
               peer_ms: float | None = None, extra: dict | None = None) -> dict:
        """Record one kernel: ``nbytes`` is the minimal traffic (inputs read + outputs written once)."""
        row = self._row(op, shape, ms, nbytes, peer=peer, peer_ms=peer_ms, extra=extra)
        self.records.append(row)
        vs = ""
        if peer_ms:
            vs = f"  {peer} {peer_ms:.4f} ms ({peer_ms / ms:.2f}x)"
        print(f"  {op:<34} {str(tuple(row['shape'])):<22} {ms:9.4f} ms {row['gbps']:8.1f} GB/s "
              f"{row['pct_copy']:6.1f}% copy{vs}", flush=True)
        return row

    def note(self, msg: str) -> None:
        self.notes.append(f"[{self.section}] {msg}" if self.section else msg)
        print(f"  note: {msg}", flush=True)


# --------------------------------------------------------------------------------- sections
def available_sections() -> list[str]:
    found = sorted(p.stem[len("bench_"):] for p in HERE.glob("bench_*.py"))
    return [s for s in DEFAULT_SECTIONS if s in found] + [s for s in found if s not in DEFAULT_SECTIONS]


def run_section(ctx: Ctx, name: str) -> str:
    """Import ``bench_<name>`` and run ``bench_<name>(ctx)``; returns "ok", "missing" or "failed"."""
    ctx.section = name
    try:
        mod = importlib.import_module(f"bench_{name}")
    except ModuleNotFoundError as e:
        if e.name == f"bench_{name}":
            ctx.note(f"section skipped: scripts/bench_{name}.py not found")
            return "missing"
        ctx.note(f"section failed to import: {type(e).__name__}: {e}")
        return "failed"
    fn = getattr(mod, f"bench_{name}", None)
    if fn is None:
        ctx.note(f"section skipped: scripts/bench_{name}.py has no bench_{name}(ctx)")
        return "missing"
    print(f"\n== {name}", flush=True)
    try:
        fn(ctx)
    except Exception as e:  # noqa: BLE001
        traceback.print_exc()
        ctx.note(f"section failed: {type(e).__name__}: {str(e).splitlines()[0][:300] if str(e) else ''}")
        return "failed"
    finally:
        ctx.cp.get_default_memory_pool().free_all_blocks()
        if ctx.torch is not None:
            ctx.torch.cuda.empty_cache()
    return "ok"


# --------------------------------------------------------------------------------- output
def merge(old: list[dict], new: list[dict], sections: set[str]) -> list[dict]:
    """Old records of sections not run now, then the new records."""
    keep = [r for r in old if (r.get("extra") or {}).get("section") not in sections]
    return keep + new


def _fmt(v, nd=4):
    return "" if v is None else f"{v:.{nd}f}"


def render_md(records: list[dict], meta: dict) -> str:
    lines = ["# cukv benchmarks", "",
             "Generated by `scripts/bench.py`; do not edit by hand. GB/s counts the minimal bytes "
             "(inputs read once, outputs written once); % copy is against a device-to-device copy "
             "(bytes read + written) measured in the same run as the section. Times are medians of "
             "CUDA-event timings of back-to-back launches after warm-up. `vs peer` is peer ms / cukv ms "
             "(> 1: cukv is faster).", ""]
    by_sec: dict[str, list[dict]] = {}
    for r in records:
        by_sec.setdefault((r.get("extra") or {}).get("section") or "?", []).append(r)
    for sec, rows in by_sec.items():
        m = meta.get(sec, {})
        lines += [f"## {sec}", ""]
        if m:
            lines += [f"- device: {m.get('device')} ({m.get('versions', '')})",
                      f"- command: `{m.get('command')}`  ({m.get('date')})",
                      f"- copy: {m.get('copy_gbps')} GB/s", ""]
        lines += ["| op | shape | ms | GB/s | % copy | peer | peer ms | vs peer | notes |",
                  "|---|---|---:|---:|---:|---|---:|---:|---|"]
        for r in rows:
            ex = {k: v for k, v in (r.get("extra") or {}).items()
                  if k not in ("section", "device", "copy_gbps", "bytes")}
            vs = f"{r['peer_ms'] / r['ms']:.2f}x" if r.get("peer_ms") and r.get("ms") else ""
            note = ", ".join(f"{k}={v}" for k, v in ex.items())
            lines.append(f"| {r['op']} | {'x'.join(map(str, r['shape']))} | {_fmt(r['ms'])} | "
                         f"{r['gbps']:.0f} | {r['pct_copy']:.1f} | {r.get('peer') or ''} | "
                         f"{_fmt(r.get('peer_ms'))} | {vs} | {note} |")
        notes = m.get("notes") or []
        if notes:
            lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
        lines.append("")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", action="append", default=None, metavar="NAME",
                    help="run only this section (repeatable); sections: scripts/bench_<NAME>.py")
    ap.add_argument("--list", action="store_true", help="list the sections found and exit")
    ap.add_argument("--json", default=str(ROOT / "benchmarks" / "latest.json"))
    ap.add_argument("--md", default=str(ROOT / "BENCHMARKS.md"))
    ap.add_argument("--no-write", action="store_true", help="print only")
    ap.add_argument("--reps", type=int, default=10, help="launches per timed batch")
    ap.add_argument("--batches", type=int, default=7, help="timed batches (median)")
    ns = ap.parse_args(argv)
    found = available_sections()
    if ns.list:
        print("\n".join(found))
        return 0
    names = ns.only or found
    cmd = "python scripts/bench.py" + "".join(f" --only {n}" for n in (ns.only or []))
    ctx = Ctx(reps=ns.reps, batches=ns.batches)
    print(f"device: {ctx.device} (sm_{ctx.cc}), {ctx.versions()}")
    print(f"copy: {ctx.copy_gbps:.1f} GB/s (read + write)", flush=True)
    status = {}
    for name in names:
        n0 = len(ctx.notes)
        status[name] = run_section(ctx, name)
        status[name + ".notes"] = ctx.notes[n0:]
    ran = {n for n in names if status[n] != "missing"}
    print("\nsections: " + ", ".join(f"{n}: {status[n]}" for n in names))
    for n in ctx.notes:
        print(f"note: {n}")
    if ns.no_write:
        return 0 if all(status[n] != "failed" for n in names) else 1
    jpath, mpath = Path(ns.json), Path(ns.md)
    old, meta = [], {}
    if jpath.is_file():
        try:
            old = json.loads(jpath.read_text())
        except ValueError:
            old = []
    meta_path = jpath.with_name("meta.json")
    if meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError:
            meta = {}
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    new = [r for r in ctx.records if r["extra"]["section"] in ran or r["extra"]["section"] == "copy"]
    for n in ran | {"copy"}:
        meta[n] = {"device": ctx.device, "versions": ctx.versions(), "command": cmd, "date": date,
                   "copy_gbps": round(ctx.copy_gbps, 1), "status": status.get(n, "ok"),
                   "notes": status.get(n + ".notes", [])}
    records = merge(old, new, ran | {"copy"})
    jpath.parent.mkdir(parents=True, exist_ok=True)
    jpath.write_text(json.dumps(records, indent=1) + "\n")
    meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    order = ["copy"] + [n for n in available_sections()]
    records.sort(key=lambda r: order.index(r["extra"]["section"]) if r["extra"]["section"] in order else 99)
    mpath.write_text(render_md(records, meta))
    print(f"wrote {jpath} and {mpath}")
    return 0 if all(status[n] != "failed" for n in names) else 1


if __name__ == "__main__":
    raise SystemExit(main())
