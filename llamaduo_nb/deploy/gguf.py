"""06 step 3: the GGUF files that ship (`deploy.gguf_types`), each checked for tokenizer agreement.

The student's own GGUF work (the built-in exporter, the tokenizer check, the per-cycle F16 cache) is
`student.gguf`; this module adds what only shipping needs: llama.cpp's `convert_hf_to_gguf.py` for students
the built-in exporter does not cover, llama.cpp's quantizer for the K-quants, and the set of files 06 writes.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from ..config import GGUF_QUANTIZED_TYPES, RunConfig
from ..jsonio import read_json
from ..llamacpp import LlamaCppBuildError, extract_vendored, fetch_sdist
from ..runlayout import RunLayout, cache_home, cache_lock
from ..student import (
    LLAMA_ARCHITECTURES,
    GGUFExport,
    GGUFExportError,
    base_licence,
    check_gguf_tokenizer,
    current_cycle_gguf,
    export_gguf,
    tensor_types,
    tokenizer_pre_for,
)

# Runs convert_hf_to_gguf.py unchanged, except that a byte-level BPE tokenizer whose pre-tokenizer the
# script does not recognise (it identifies them by hashing the real vocab's output on a probe text) gets
# the name the user gave in deploy.gguf_tokenizer_pre; check_gguf_tokenizer then verifies the choice.
_CONVERT_WITH_PRE = """
import runpy, sys
from pathlib import Path
script, pre = sys.argv[1], sys.argv[2]
sys.argv = [script, *sys.argv[3:]]
sys.path[:0] = [str(Path(script).parent), str(Path(script).parent / "gguf-py")]
import conversion.base as base
known = base.TextModel.get_vocab_base_pre
def get_vocab_base_pre(self, tokenizer):
    try:
        return known(self, tokenizer)
    except NotImplementedError:
        return pre
base.TextModel.get_vocab_base_pre = get_vocab_base_pre
runpy.run_path(script, run_name="__main__")
"""


def convert_with_llama_cpp(
    script: str | Path,
    model_dir: str | Path,
    out_path: str | Path,
    qtype: str,
    *,
    tokenizer_pre: str | None = None,
) -> GGUFExport:
    """Run llama.cpp's `convert_hf_to_gguf.py` (llama-cpp-python's sdist or a checkout) for one GGUF type.

    `tokenizer_pre` names llama.cpp's pre-tokenizer for BPE vocabularies the script does not recognise.
    """
    t0 = time.monotonic()
    script, out_path = Path(script), Path(out_path)
    if not script.is_file():
        raise GGUFExportError(f"deploy.convert_script: {script} does not exist")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    args = [str(model_dir), "--outfile", str(tmp), "--outtype", qtype]
    if tokenizer_pre:
        cmd = [sys.executable, "-c", _CONVERT_WITH_PRE, str(script), tokenizer_pre, *args]
    else:
        cmd = [sys.executable, str(script), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        tail = "\n".join((proc.stderr or proc.stdout).splitlines()[-20:])
        raise GGUFExportError(f"{script} {' '.join(args)} failed with code {proc.returncode}:\n{tail}")
    os.replace(tmp, out_path)
    return GGUFExport(
        qtype, out_path, out_path.stat().st_size, time.monotonic() - t0, f"llama.cpp:{script.name}"
    )


def _llama_ftype(qtype: str) -> int:
    import llama_cpp

    return int(getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{qtype.upper()}"))


def quantize_gguf(source: str | Path, out_path: str | Path, qtype: str, *, threads: int = 0) -> GGUFExport:
    """`qtype` (e.g. q4_k_m, q5_k_m) from an F16/BF16/F32 GGUF with llama.cpp's own quantizer
    (`llama_cpp.llama_model_quantize`, the library behind `llama-quantize`), written atomically.
    The quantizer's log (a line per tensor, a warning per fallback) goes to `<out>.quantize.log` beside the
    file, not into the notebook; one line says how many tensors fell back and where the log is.

    llama.cpp keeps its mixture rules (Q4_K_M: Q6_K for half of attn_v/ffn_down and the output tensor) and
    falls back to a legacy type for rows that do not split into 256-value K-blocks (Q4_K -> Q5_0, Q5_K ->
    Q5_1, Q6_K -> Q8_0); `tensor_types` shows what a file ended up holding.
    """
    import ctypes

    import llama_cpp

    t0 = time.monotonic()
    source, out_path = Path(source), Path(out_path)
    if qtype not in GGUF_QUANTIZED_TYPES:
        raise GGUFExportError(
            f"{qtype!r} is not a llama.cpp quantization type; use one of {GGUF_QUANTIZED_TYPES}"
        )
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = _llama_ftype(qtype)
    params.nthread = threads
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(f".{out_path.name}.tmp-{os.getpid()}")
    log = out_path.with_name(f"{out_path.name}.quantize.log")
    try:
        with _stderr_to(log):
            code = llama_cpp.llama_model_quantize(
                str(source).encode(), str(tmp).encode(), ctypes.byref(params)
            )
        if code != 0:
            raise GGUFExportError(
                f"llama_model_quantize({source} -> {qtype}) failed with code {code}; its log: {log}"
            )
        os.replace(tmp, out_path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    print(quantize_log_summary(log, qtype))
    return GGUFExport(
        qtype,
        out_path,
        out_path.stat().st_size,
        time.monotonic() - t0,
        f"llama_model_quantize({source.name})",
        sum(tensor_types(out_path).values()),
    )


@contextlib.contextmanager
def _stderr_to(path: Path):
    """Send what llama.cpp logs (through Python's sys.stderr, and C's stderr: file descriptor 2, which
    Jupyter also shows) to `path` for the duration."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "w", encoding="utf-8") as fh:
        try:
            os.dup2(fh.fileno(), 2)
            with contextlib.redirect_stderr(fh):
                yield
        finally:
            fh.flush()
            os.dup2(saved, 2)
            os.close(saved)


def quantize_log_summary(log: Path, qtype: str) -> str:
    """One line about a quantizer log: the tensors that fell back to another type (llama.cpp's own count when
    it gives one), the other warnings, the log's length and path."""
    lines = log.read_text(encoding="utf-8", errors="replace").splitlines() if log.is_file() else []
    counted = next((m for line in lines if (m := _FALLBACK_TOTAL.search(line))), None)
    falling = sum("falling back" in line for line in lines)
    other = sum("warn" in line.casefold() and "falling back" not in line for line in lines) - bool(counted)
    fell = f"{counted['n']} of {counted['of']}" if counted else str(falling)
    return (
        f"{qtype}: {fell} tensors fell back to another type (rows that do not split into its blocks), "
        f"{other} other warnings; llama.cpp's quantizer log ({len(lines)} lines): {log}"
    )


_FALLBACK_TOTAL = re.compile(r"(?P<n>\d+) of (?P<of>\d+) tensor\(s\) required fallback")


# --------------------------------------------------------------------------- llama.cpp's converter


def converter_home() -> Path:
    """Where llama.cpp's convert_hf_to_gguf.py (+ its `conversion/` and `gguf-py/`) is kept, per version
    of llama-cpp-python (the sdist vendors the llama.cpp it was built from)."""
    from importlib.metadata import version

    return cache_home() / f"llama.cpp-convert-{version('llama-cpp-python')}"


def ensure_llama_cpp_converter(quiet: bool = False) -> Path:
    """convert_hf_to_gguf.py of the llama.cpp that the installed llama-cpp-python vendors.

    Taken from the llama-cpp-python source distribution on PyPI (`pip download --no-binary`), the same
    file pip built the installed wheel from (pip's cache usually serves it without a download); kept under
    `converter_home()`. `llamaduo prepare` (make install) calls this once.
    """
    home = converter_home()
    script = home / "convert_hf_to_gguf.py"
    if script.is_file():
        return script
    with cache_lock(home):
        if not script.is_file():  # another process may have extracted it while we waited
            _extract_converter(home)
    if not quiet:
        print(f"llama.cpp converter: {script}")
    return script


def _extract_converter(home: Path) -> None:
    wanted = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")
    with tempfile.TemporaryDirectory(prefix="llamaduo-sdist-") as tmp:
        try:
            archive = fetch_sdist(tmp)
        except LlamaCppBuildError as exc:
            raise GGUFExportError(
                f"{exc}\nalternatively set deploy.convert_script to a llama.cpp checkout's convert_hf_to_gguf.py"
            ) from exc
        staging = home.with_name(home.name + f".tmp-{os.getpid()}")
        extract_vendored(archive, staging, wanted)
        if not (staging / "convert_hf_to_gguf.py").is_file():
            raise GGUFExportError(f"{archive.name} holds no vendor/llama.cpp/convert_hf_to_gguf.py")
        os.replace(staging, home)


def _use_builtin(model_dir: Path) -> bool:
    """The built-in exporter handles Llama-architecture folders with a byte-level BPE tokenizer."""
    config = read_json(model_dir / "config.json")
    arch = (config.get("architectures") or ["?"])[0]
    tok_file = model_dir / "tokenizer.json"
    if arch not in LLAMA_ARCHITECTURES or not tok_file.is_file():
        return False
    spec = read_json(tok_file)
    return spec.get("model", {}).get("type") == "BPE" and "ByteLevel" in json.dumps(spec.get("pre_tokenizer"))


def export_all(
    cfg: RunConfig, layout: RunLayout, merged_dir: str | Path | None = None, cycle: int | None = None
) -> list[GGUFExport]:
    """Every `deploy.gguf_types` file of the merged model, each checked for tokenizer agreement.

    f32/f16/bf16/q8_0 come from the converter (`deploy.converter`: the built-in one for Llama-architecture
    students, llama.cpp's convert_hf_to_gguf.py for the rest); the K-quants and q4_0/q5_0 are made from the
    F16 file by llama.cpp's quantizer (an F16 file is written for it when f16 is not listed, then removed).
    With `cycle` (the shipped one), the type 03 answered with (`inference.llamacpp_gguf`) is 03's own file of
    that cycle when it is current, hard-linked (copied across file systems) rather than exported again:
    the same merge and the same built-in exporter made it, so only its `general.name` says "cycle N".
    """
    merged_dir = Path(merged_dir or layout.merged_dir)
    licence, upstream, _ = base_licence(cfg.student.model_id)
    dep = cfg.deploy
    builtin = dep.converter == "builtin" or (
        dep.converter == "auto" and not dep.convert_script and _use_builtin(merged_dir)
    )
    pre = tokenizer_pre_for(cfg) if builtin else ""
    quantized = [q for q in dep.gguf_types if q in GGUF_QUANTIZED_TYPES]
    converted = [q for q in dep.gguf_types if q not in GGUF_QUANTIZED_TYPES]
    temporary_f16 = bool(quantized) and "f16" not in converted
    exports: dict[str, GGUFExport] = {}
    for qtype in converted + (["f16"] if temporary_f16 else []):
        out = layout.gguf_file(qtype)
        made_by_03 = (
            current_cycle_gguf(layout, cycle, qtype)
            if builtin and cycle is not None and qtype == cfg.inference.llamacpp_gguf
            else None
        )
        if made_by_03 is not None:
            result = _link(made_by_03, out, qtype, f"builtin (03's {made_by_03.parent.name}, linked)")
        elif builtin:
            result = export_gguf(
                merged_dir,
                out,
                qtype,
                tokenizer_pre=pre,
                name=f"{cfg.run_name} ({upstream})",
                licence=licence,
            )
        else:
            script = dep.convert_script or ensure_llama_cpp_converter(quiet=True)
            result = convert_with_llama_cpp(
                script, merged_dir, out, qtype, tokenizer_pre=dep.gguf_tokenizer_pre
            )
        exports[qtype] = result
    for qtype in quantized:
        exports[qtype] = quantize_gguf(exports["f16"].path, layout.gguf_file(qtype), qtype)
    if temporary_f16:
        exports.pop("f16").path.unlink()
    for result in exports.values():
        check = check_gguf_tokenizer(result.path, merged_dir)
        if not check["ok"]:
            raise GGUFExportError(
                f"{result.path}: llama.cpp tokenizes {len(check['mismatches'])} of {check['probes']} probe texts "
                f"differently from the HF tokenizer (first: {check['mismatches'][0]}); the pre-tokenizer "
                f"'{pre}' is probably wrong: set deploy.gguf_tokenizer_pre or deploy.converter: llama.cpp"
            )
    return [exports[q] for q in dep.gguf_types]


def _link(source: Path, out: Path, qtype: str, exporter: str) -> GGUFExport:
    """`out` as a hard link of `source` (a copy when they are on different file systems), atomically."""
    t0 = time.monotonic()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copy2(source, tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return GGUFExport(
        qtype,
        out,
        out.stat().st_size,
        time.monotonic() - t0,
        exporter,
        sum(tensor_types(out).values()),
    )


def exports_table(exports: Sequence[GGUFExport]) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "type": e.qtype,
                "file": e.path.name,
                "MiB": round(e.mib, 1),
                "seconds": round(e.seconds, 1),
                "tensors": e.n_tensors,
                "exporter": e.exporter,
            }
            for e in exports
        ]
    )
