"""llama.cpp's own tools, taken from the llama-cpp-python source distribution and kept once per machine.

The installed llama-cpp-python wheel was built from an sdist that vendors a whole llama.cpp checkout.
Two of its tools are used here, both from that same checkout so they agree with the library bit for bit:

* `convert_hf_to_gguf.py` (06 converts non-Llama students with it: `deploy.gguf.ensure_llama_cpp_converter`);
* **llama-server**, llama.cpp's C++ OpenAI-compatible server, compiled once (`ensure_llama_server`). It
  serves the offline service LLM and 03's/06's GGUF student with *parallel slots and continuous
  batching*: concurrent requests are decoded together in one batch, which is where a CPU gets its
  throughput (a 135M model's decode step is memory-bound: eight sequences cost little more than one).
  llama-cpp-python's own Python server handles one request at a time.

`fetch_sdist` gets the sdist with pip (`pip download --no-binary`), which pip's cache usually serves without
a download. `llamaduo prepare` (run by `make install`) builds llama-server: ~15 min on a new 2-core machine,
then reused from `cache_home()` (keyed by llama-cpp-python's version and this CPU's instruction set, since
the build is native). `LLAMADUO_LLAMA_SERVER` may name another llama-server binary (e.g. a CUDA build).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from .runlayout import cache_home, cache_lock

SERVER_ENV = "LLAMADUO_LLAMA_SERVER"
# The server and what it links, nothing else (no tests, examples, web UI, HTTPS, downloads).
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",  # one self-contained binary
    "-DGGML_NATIVE=ON",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",  # would download the web UI
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_CURL=OFF",
)
# -march=native turns on llama.cpp's AMX kernels where the CPU has AMX (Intel Xeon since Sapphire Rapids): int8
# tiles for Q4_0/Q4_1/Q8_0 and the K-quants. With GCC 12 (Debian 12's compiler) they died with SIGSEGV in
# ggml_backend_amx_mul_mat on the first batch; `patch_sources` fixes the cause (below), so they stay on.
# Measured on a 2-core Sapphire Rapids VM (03's demo workload, 24 slots): Q8_0 215 tok/s with AMX, 70 without.
PATCHES = ("tile-config-operand-1",)  # part of the cache key: a change of the patches builds anew
_TILE_LOADCONFIG = re.compile(r"(?<!\) : \"memory\"\); )_tile_loadconfig\(\s*&\s*(\w+)\s*\)\s*;")


def patch_sources(source: Path) -> list[str]:
    """Patch llama.cpp's sources for the compilers this project builds with; returns the files changed.

    GCC 12's `_tile_loadconfig(const void *config)` (amxtileintrin.h) hands `ldtilecfg` its operand as
    `"m" (*(const void **)config)`: the compiler sees an 8-byte read, so the stores that fill the rest of the
    64-byte tile configuration are dead to it and dropped (checked with gdb: palette 1, then stack garbage for
    the rows and columns). `ldtilecfg` then faults (#GP on an invalid configuration, delivered as SIGSEGV).
    An empty asm statement that reads the whole configuration object before each `_tile_loadconfig(&obj)`
    keeps every store; with a compiler whose intrinsic is right it changes nothing.
    """
    changed = []
    for path in sorted((source / "ggml" / "src").rglob("*.cpp")):
        text = path.read_text(encoding="utf-8")
        if "_tile_loadconfig" not in text:
            continue
        patched = _TILE_LOADCONFIG.sub(
            lambda m: f'__asm__ volatile("" : : "m"({m.group(1)}) : "memory"); {m.group(0)}', text
        )
        if patched != text:
            path.write_text(patched, encoding="utf-8")
            changed.append(str(path.relative_to(source)))
    return changed


class LlamaCppBuildError(RuntimeError):
    """llama.cpp's sources could not be fetched or built; the message says what to do."""


def llama_cpp_python_version() -> str:
    from importlib.metadata import version

    return version("llama-cpp-python")


def fetch_sdist(dest: str | Path) -> Path:
    """The llama-cpp-python sdist the installed wheel was built from, downloaded by pip into `dest`."""
    spec = f"llama-cpp-python=={llama_cpp_python_version()}"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(dest)]
    cmd.append(spec)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    archives = sorted(Path(dest).glob("llama_cpp_python-*.tar.gz"))
    if proc.returncode != 0 or not archives:
        raise LlamaCppBuildError(
            f"could not fetch the {spec} sdist with pip ({' '.join(cmd)}):\n{proc.stderr[-2000:]}"
        )
    return archives[0]


def extract_vendored(archive: Path, target: Path, wanted: tuple[str, ...] = ()) -> Path:
    """Extract the sdist's `vendor/llama.cpp/` (only paths starting with one of `wanted`, if given)."""
    with tarfile.open(archive) as tar:
        for member in tar.getmembers():
            parts = member.name.split("/vendor/llama.cpp/", 1)
            if len(parts) != 2 or not (member.isfile() or member.isdir()):
                continue
            if wanted and not parts[1].startswith(wanted):
                continue
            member.name = parts[1]
            tar.extract(member, target, filter="data")
    if not (target / "CMakeLists.txt").is_file() and not wanted:
        raise LlamaCppBuildError(f"{archive.name} holds no vendor/llama.cpp/")
    return target


def _cpu_tag() -> str:
    """A short digest of this CPU's instruction-set flags and the build's flags: a native build must not move
    to another CPU, and a change of CMAKE_FLAGS builds anew."""
    flags = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                flags = line.split(":", 1)[1].strip()
                break
    key = f"{os.uname().machine} {flags} {' '.join(CMAKE_FLAGS)} {' '.join(PATCHES)}"
    return hashlib.sha256(key.encode()).hexdigest()[:10]


def llama_server_home() -> Path:
    return cache_home() / f"llama-server-{llama_cpp_python_version()}-{_cpu_tag()}"


def llama_server_binary() -> Path | None:
    """The llama-server to use: `$LLAMADUO_LLAMA_SERVER`, else the one built by `ensure_llama_server`."""
    override = os.environ.get(SERVER_ENV)
    if override:
        path = Path(override)
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise LlamaCppBuildError(f"${SERVER_ENV}={override} is not an executable file")
        return path
    binary = llama_server_home() / "llama-server"
    return binary if binary.is_file() else None


def ensure_llama_server(quiet: bool = False) -> Path:
    """Path of llama-server, compiled from the vendored llama.cpp on first use (progress bar, log kept)."""
    found = llama_server_binary()
    if found is not None:
        return found
    home = llama_server_home()
    with cache_lock(home):
        binary = home / "llama-server"
        if binary.is_file():  # built by another process while this one waited
            return binary
        venv_cmake = Path(sys.executable).parent / "cmake"  # the `cmake` wheel, a project dependency
        cmake = str(venv_cmake) if venv_cmake.is_file() else shutil.which("cmake")
        if cmake is None:
            raise LlamaCppBuildError(
                "building llama-server needs cmake and a C++ compiler (the same toolchain llama-cpp-python "
                "compiled with): apt install cmake g++, or pip install cmake; "
                f"or point ${SERVER_ENV} at a llama-server binary"
            )
        log_path = cache_home() / f"{home.name}.build.log"
        if not quiet:
            print(
                f"building llama-server from llama-cpp-python {llama_cpp_python_version()}'s llama.cpp "
                f"(once per machine, ~15 min on 2 cores); log: {log_path}",
                flush=True,
            )
        with tempfile.TemporaryDirectory(prefix="llamaduo-llama-server-") as tmp:
            source = extract_vendored(fetch_sdist(tmp), Path(tmp) / "llama.cpp")
            build = Path(tmp) / "build"
            with open(log_path, "w") as log:
                log.write(f"patched: {patch_sources(source) or 'nothing'}\n")
                _run_logged([cmake, "-S", str(source), "-B", str(build), *CMAKE_FLAGS], log, log_path)
                jobs = str(os.cpu_count() or 2)
                cmd = [cmake, "--build", str(build), "--target", "llama-server", "-j", jobs]
                _run_logged(cmd, log, log_path, progress=not quiet)
            built = build / "bin" / "llama-server"
            if not built.is_file():
                raise LlamaCppBuildError(f"the build finished without {built}; log: {log_path}")
            staging = home.with_name(home.name + f".tmp-{os.getpid()}")
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
            shutil.copy2(built, staging / "llama-server")
            shutil.copy2(source / "LICENSE", staging / "LICENSE")
            os.replace(staging, home)
    return home / "llama-server"


def _run_logged(cmd: list[str], log, log_path: Path, progress: bool = False) -> None:
    """Run `cmd`, its output into `log`; with `progress`, CMake's `[ NN%]` lines drive a progress bar."""
    from tqdm.auto import tqdm

    log.write(f"$ {' '.join(cmd)}\n")
    log.flush()
    bar = tqdm(total=100, desc="build llama-server", unit="%", disable=not progress)
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        log.write(line)
        match = re.match(r"\[\s*(\d+)%\]", line)
        if match:
            bar.update(int(match.group(1)) - bar.n)
    code = proc.wait()
    bar.close()
    log.flush()
    if code != 0:
        tail = "".join(log_path.read_text(errors="replace").splitlines(keepends=True)[-25:])
        raise LlamaCppBuildError(f"{cmd[0]} failed (exit {code}); log: {log_path}\n{tail}")
