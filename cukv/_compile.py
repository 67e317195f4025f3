"""The only place a ``cupy.RawModule`` is built.

A :class:`Family` is one ``cuda_src/<name>.cu`` file with every template instantiation it may be asked
for, declared up front. :func:`expression` builds both the ``name_expressions`` entry and the lookup
name, so the two always match. Modules compile lazily on first use and are memoized.

The source is prefixed with ``#line 1 "cukv/cuda_src/<file>"`` so compile errors name the real file,
and a digest of every file in ``cuda_src/`` goes into the options (``-DCUKV_SRC_DIGEST=...``) because
CuPy's disk cache does not hash headers reached through ``-I``.

:func:`compile_only` runs NVRTC without a GPU (CuPy's ``cupy_backends.cuda.libs.nvrtc``) for a given
architecture; CI uses it to compile every instantiation for sm_80 and sm_90 (``python -m
cukv._compile``).
"""
from __future__ import annotations

import functools
import hashlib
import threading
from pathlib import Path

import numpy as np

from . import _backend

SRC_DIR = Path(__file__).resolve().parent / "cuda_src"
_FAMILIES: dict[str, "Family"] = {}
_LOCK = threading.Lock()


def expression(name: str, *targs) -> str:
    """``expression("k", "float", 4) == "k<float, 4>"``; used to declare and to look up."""
    if not targs:
        return name
    return f"{name}<{', '.join(_targ(t) for t in targs)}>"


def _targ(t) -> str:
    if isinstance(t, bool):
        return "true" if t else "false"
    return str(t)


@functools.lru_cache(maxsize=1)
def source_digest() -> str:
    """sha256 (16 hex digits) over every file name and content in ``cuda_src/``."""
    h = hashlib.sha256()
    for p in sorted(SRC_DIR.iterdir()):
        if p.is_file() and p.suffix in (".cu", ".cuh"):
            h.update(p.name.encode())
            h.update(p.read_bytes())
    return h.hexdigest()[:16]


class Family:
    """One ``.cu`` file and its declared instantiations.

    Parameters
    ----------
    source : str
        File name in ``cuda_src/``.
    expressions : iterable of str
        Every instantiation, each built with :func:`expression`.
    exact : bool
        ``True`` for bit-exact paths (SPEC §1.1): compiled with ``--fmad=false`` so no ``a*b+c``
        is contracted. Attention kernels pass ``False``.

    Every family compiles with IEEE denormals (``-ftz=false``), correctly rounded division and square
    root: CuPy's own compile path appends ``-ftz=true``, which would flush e4m3 and bf16 subnormals, so
    cukv runs NVRTC itself and loads the cubin with ``cupy.RawModule(path=...)``.
    """

    def __init__(self, source: str, expressions, *, exact: bool = True):
        self.source = source
        self.expressions = tuple(dict.fromkeys(expressions))
        self.exact = exact
        self._modules: dict[tuple[str, int], tuple[object, str]] = {}
        _FAMILIES[source] = self

    def code(self) -> str:
        text = (SRC_DIR / self.source).read_text()
        return f'#line 1 "cukv/cuda_src/{self.source}"\n{text}'

    def options(self) -> tuple[str, ...]:
        opts = ["--std=c++17", f"-I{SRC_DIR}", f"-DCUKV_SRC_DIGEST=0x{source_digest()}ULL",
                "-ftz=false", "-prec-div=true", "-prec-sqrt=true"]
        if self.exact:
            opts.append("--fmad=false")
        return tuple(opts)

    def kernel(self, name: str, *targs):
        """The ``cupy.RawKernel`` for ``name<targs...>`` on the current device; it must be declared.

        Each instantiation compiles on first use into its own cubin (cached on disk under
        ``$CUKV_CACHE_DIR`` or ``~/.cache/cukv``), so a call pays only for the kernels it needs.
        """
        expr = expression(name, *targs)
        if expr not in self.expressions:
            raise RuntimeError(f"cukv internal error: {expr!r} is not declared in {self.source}")
        cp = _backend.cupy()
        arch = "sm_" + cp.cuda.Device().compute_capability
        key = (expr, arch)
        hit = self._modules.get(key)
        if hit is None:
            with _LOCK:
                hit = self._modules.get(key)
                if hit is None:
                    path, lowered = _cached_cubin(self, expr, arch)
                    hit = (cp.RawModule(path=str(path)), lowered)
                    self._modules[key] = hit
        mod, lowered = hit
        return mod.get_function(lowered)


def _cache_dir() -> Path:
    import os  # noqa: PLC0415

    d = os.environ.get("CUKV_CACHE_DIR")
    return Path(d) if d else Path.home() / ".cache" / "cukv"


def nvrtc_compile(fam: Family, expressions, arch: str, *, cubin: bool = True):
    """Compile ``expressions`` of ``fam`` for ``arch`` with NVRTC (no GPU needed).

    Returns ``(cubin bytes or None, {expression: lowered name})``; raises ``RuntimeError`` with the
    NVRTC log on failure.
    """
    from cupy_backends.cuda.libs import nvrtc  # noqa: PLC0415

    prog = nvrtc.createProgram(fam.code(), fam.source, [], [])
    try:
        for e in expressions:
            nvrtc.addNameExpression(prog, e)
        opts = [f"-arch={arch}", *fam.options(), *(f"-I{d}" for d in _cuda_include_dirs())]
        try:
            nvrtc.compileProgram(prog, opts)
        except Exception as exc:
            log = nvrtc.getProgramLog(prog)
            raise RuntimeError(f"NVRTC failed on {fam.source} for {arch}: {exc}\n{log}") from None
        lowered = {}
        for e in expressions:
            name = nvrtc.getLoweredName(prog, e)
            if not name:
                raise RuntimeError(f"{fam.source}: no lowered name for {e!r} on {arch}")
            lowered[e] = name
        return (nvrtc.getCUBIN(prog) if cubin else None), lowered
    finally:
        nvrtc.destroyProgram(prog)


def _cached_cubin(fam: Family, expr: str, arch: str) -> tuple[Path, str]:
    """Path of the cubin holding ``expr`` for ``arch`` (compiled now if not cached) and its lowered name."""
    import json  # noqa: PLC0415
    import os  # noqa: PLC0415

    from cupy_backends.cuda.libs import nvrtc  # noqa: PLC0415

    h = hashlib.sha256("\0".join([fam.code(), expr, arch, *fam.options(),
                                   str(nvrtc.getVersion())]).encode()).hexdigest()[:32]
    d = _cache_dir()
    cub, meta = d / f"{h}.cubin", d / f"{h}.json"
    if cub.is_file() and meta.is_file():
        return cub, json.loads(meta.read_text())["lowered"]
    data, lowered = nvrtc_compile(fam, [expr], arch)
    d.mkdir(parents=True, exist_ok=True)
    for path, blob in ((cub, bytes(data)), (meta, json.dumps({"expr": expr, "lowered": lowered[expr]}).encode())):
        tmp = path.with_suffix(path.suffix + f".{os.getpid()}.tmp")
        tmp.write_bytes(blob)
        os.replace(tmp, path)
    return cub, lowered[expr]


def launch(kernel, grid, block, args, shared_mem: int = 0, *, pdl: bool = False) -> None:
    """Launch on CuPy's current stream. Scalars must be NumPy scalars (``np.int32(...)``):
    a Python float passed to a ``float`` parameter would arrive as 0.0.

    ``pdl``: a programmatic dependent launch (``cuLaunchKernelEx``, sm_90+): the kernel may start
    while the kernel before it on the stream still runs, once that one triggers (or ends), and must
    ``griddepcontrol.wait`` before reading what it wrote. Falls back to a plain launch where the driver
    refuses it (older GPUs or drivers). Arguments: CuPy arrays, NumPy scalars and by-value structs
    (``np.void``, e.g. a CUtensorMap)."""
    for a in args:
        if isinstance(a, (int, float, bool)) and not isinstance(a, np.generic):  # np.float64 is a float
            raise TypeError(f"cukv internal error: kernel scalar {a!r} must be a numpy scalar")
    args = tuple(np.uint64(0) if a is None else a for a in args)   # None: a null pointer
    grid = tuple(int(g) for g in (grid if isinstance(grid, tuple) else (grid,)))
    block = tuple(int(b) for b in (block if isinstance(block, tuple) else (block,)))
    if min(grid) <= 0:
        return
    if shared_mem > 48 * 1024:
        kernel.max_dynamic_shared_size_bytes = int(shared_mem)
    if pdl and _launch_pdl(kernel, grid, block, args, int(shared_mem)):
        return
    kernel(grid, block, tuple(args), shared_mem=int(shared_mem))


_PDL: list = []   # [(cuLaunchKernelEx, LaunchAttr, LaunchConfig) or None], loaded on first use


def _pdl_api():
    if not _PDL:
        import ctypes  # noqa: PLC0415

        api = None
        try:
            fn = ctypes.CDLL("libcuda.so.1").cuLaunchKernelEx
            fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
            fn.restype = ctypes.c_int

            class Attr(ctypes.Structure):      # CUlaunchAttribute
                _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int * 16)]

            class Config(ctypes.Structure):    # CUlaunchConfig
                _fields_ = [("dims", ctypes.c_uint * 6), ("shared_mem", ctypes.c_uint), ("stream", ctypes.c_void_p),
                            ("attrs", ctypes.POINTER(Attr)), ("n_attrs", ctypes.c_uint)]

            api = (fn, Attr, Config)
        except (OSError, AttributeError):
            api = None
        _PDL.append(api)
    return _PDL[0]


def _launch_pdl(kernel, grid, block, args, shared_mem: int) -> bool:
    """``launch(..., pdl=True)``; False (nothing launched) where it cannot be done."""
    import ctypes  # noqa: PLC0415

    api = _pdl_api()
    func = getattr(getattr(kernel, "kernel", None), "ptr", None)
    if api is None or not func:
        return False
    cp = _backend.cupy()
    vals = []
    for a in args:
        if isinstance(a, cp.ndarray):
            vals.append(ctypes.c_uint64(a.data.ptr))
        elif isinstance(a, np.generic) and a.dtype.kind in "iuf" and a.dtype.itemsize in (4, 8):
            vals.append(ctypes.create_string_buffer(a.tobytes(), a.dtype.itemsize))
        elif isinstance(a, np.void):   # a by-value struct (e.g. a CUtensorMap), its bytes
            vals.append(ctypes.create_string_buffer(a.tobytes(), a.dtype.itemsize))
        else:
            return False
    fn, Attr, Config = api
    attr = Attr(id=6)                 # CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION
    attr.value[0] = 1
    cfg = Config(dims=(ctypes.c_uint * 6)(*(grid + (1,) * (3 - len(grid))), *(block + (1,) * (3 - len(block)))),
                 shared_mem=shared_mem, stream=ctypes.c_void_p(cp.cuda.get_current_stream().ptr),
                 attrs=ctypes.pointer(attr), n_attrs=1)
    params = (ctypes.c_void_p * len(vals))(*(ctypes.addressof(v) for v in vals))
    if fn(ctypes.byref(cfg), ctypes.c_void_p(func), params, None) != 0:
        _PDL[0] = None                # refused (device or driver): plain launches from now on
        return False
    return True


def families() -> dict[str, Family]:
    """Every family, after importing the op modules that declare them."""
    from . import _registry  # noqa: F401,PLC0415  (imports every op module)

    return dict(_FAMILIES)


def _cuda_include_dirs() -> list[str]:
    dirs = []
    try:
        import nvidia.cuda_runtime as rt  # noqa: PLC0415

        for p in rt.__path__:
            inc = Path(p) / "include"
            if inc.is_dir():
                dirs.append(str(inc))
    except ImportError:
        pass
    return dirs


def compile_only(arch: str, names=None) -> dict[str, int]:
    """Compile every declared instantiation with NVRTC for ``arch`` (e.g. ``"sm_90"``), no GPU needed.

    Returns ``{source: number of resolved lookup names}``. Raises ``RuntimeError`` with the NVRTC log
    on a compile error or an unresolvable name.
    """
    out = {}
    for src, fam in sorted(families().items()):
        if names is not None and src not in names:
            continue
        _, lowered = nvrtc_compile(fam, fam.expressions, arch, cubin=False)
        out[src] = len(lowered)
    return out


def _main(argv=None) -> int:
    import argparse  # noqa: PLC0415

    ap = argparse.ArgumentParser(description="Compile every cukv kernel instantiation with NVRTC (no GPU).")
    ap.add_argument("--arch", action="append", default=None, help="e.g. sm_80 (repeatable)")
    ns = ap.parse_args(argv)
    for arch in ns.arch or ["sm_80", "sm_90"]:
        res = compile_only(arch)
        total = sum(res.values())
        print(f"{arch}: {total} instantiations in {len(res)} files: "
              + ", ".join(f"{k} ({v})" for k, v in res.items()))
    return 0


if __name__ == "__main__":
    # Run through the package's module object, where the op modules register their families.
    from cukv._compile import _main as _package_main  # noqa: PLC0415

    raise SystemExit(_package_main())


def team_shape(D: int) -> tuple[int, int]:
    """``(W, V)`` for a row of ``D`` elements (``D % 8 == 0``): W lanes, V chunks of 8 per lane.

    Up to 32 chunks, one chunk per lane on the smallest power-of-two team; beyond, a full warp with a
    power-of-two number of chunks per lane. Rows of up to ``32 * 8 * MAX_V`` elements.
    """
    n = max(1, D // 8)
    if n <= 32:
        return 1 << (n - 1).bit_length(), 1
    v = -(-n // 32)
    v = 1 << (v - 1).bit_length()
    if v > MAX_V:
        raise ValueError(f"row of {D} elements exceeds the GPU row limit of {32 * 8 * MAX_V}")
    return 32, v


MAX_V = 32
TEAM_SHAPES = tuple([(1 << i, 1) for i in range(6)] + [(32, 1 << i) for i in range(1, 6)])

# Kernel scalars: the only spellings ops should use.
i32 = np.int32
i64 = np.int64
f32 = np.float32
