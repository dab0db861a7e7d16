"""Pack onnxruntime-gpu for the H200 into parts small enough to carry, one per device call.

    python benchmarks/device/pack_ort_gpu.py --wheel onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl \
        --ort-include .carry/ort-include

The wheel is 255 MB, almost all of it libonnxruntime_providers_cuda.so, whose `.nv_fatbin` section
holds one cubin per GPU architecture (sm_75 ... sm_120a) of every CUDA kernel. The H200 loads only
sm_90 code, so the payloads of every other architecture are overwritten in place: the file keeps
its size and layout, every fatbin header stays as it was (the driver still parses the section),
the kept cubins are byte-identical, and xz compresses the filler away. The filler is zeros, except
where a payload is zstd-compressed (the CUDA 13 wheels compress every cubin; the entry header
then gives the decompressed size): there an all-zero payload is not a zstd stream (cuobjdump
stops with "Uncompress failed"), so the filler is a valid zstd frame that decompresses to that
many zero bytes (RLE blocks), padded with a zstd skippable frame and the original padding. Kept besides: the
pybind module (it holds the whole runtime), libonnxruntime_providers_shared.so, the Python files,
the licence texts; left out: libonnxruntime.so (the C API library, unused from Python), the
TensorRT provider (TensorRT is absent there), the dist-info (so the machine's own onnxruntime
install is not reported as a second package). Optionally the C API headers go in as
`ort-include/` for `python -m lasad_tools.ort_op build --ort-include /tmp/ortsite/ort-include`.

Checks before writing: the pruned file parses, kept payloads equal the wheel's, pruned ones are
all zeros, nothing outside the pruned payloads changed, and (when cuobjdump is given or found)
`cuobjdump --list-elf` on the wheel's file counts the same sm_90 cubins, sampled ones it extracts
equal the kept payloads decompressed, and sampled pruned payloads decompress to zeros (zstd CLI). Output: `.carry/ort.part0`, `.part1`, ... (at most --part-mib MiB each) of one
`tar.xz` whose top level is `onnxruntime/`, as benchmarks/device/gpu_call.sh unpacks it; a JSON summary
on stdout.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import struct
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

FATBIN_MAGIC = 0xBA55ED50
CONTAINER = struct.Struct("<IHHQ")       # magic, version, header size, size of the entries that follow
ENTRY = struct.Struct("<HHIQIIHHI")       # kind, ?, header size, payload size, compressed size, ?, minor, major, arch
DECOMPRESSED_SIZE = 56                    # offset of the uint64 decompressed size in an entry header
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
ZSTD_SKIPPABLE = 0x184D2A50
ZSTD_BLOCK = 1 << 17                      # largest zstd block (128 KiB)
CUDA_PROVIDER = "onnxruntime/capi/libonnxruntime_providers_cuda.so"
LEAVE_OUT = ("onnxruntime/capi/libonnxruntime.so", "onnxruntime/capi/libonnxruntime_providers_tensorrt.so",
             "onnxruntime/datasets/")


def bundled_cuobjdump() -> Path | None:
    """The cuobjdump that Triton's wheel ships (triton/backends/nvidia/bin), if triton is installed."""
    import importlib.util
    spec = importlib.util.find_spec("triton")
    path = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump" if spec and spec.origin else None
    return path if path is not None and path.is_file() else None


@dataclass(frozen=True)
class Entry:
    """One fatbin entry: kind (1 PTX, 2 ELF), arch (e.g. 90), payload [start, start + size) in the
    file; `compressed` bytes of zstd in it that decompress to `decompressed` bytes (0, 0: plain)."""
    kind: int
    arch: int
    start: int
    size: int
    compressed: int = 0
    decompressed: int = 0


def zstd_zeros(n: int, length: int) -> bytes:
    """Exactly `length` bytes of zstd that decompress to `n` zero bytes: one frame of RLE blocks
    (RFC 8878, 3.1.1), then a skippable frame (RFC 8878, 3.1.2) over what is left."""
    def frame(blocks: int) -> bytes:
        base, extra = divmod(n, blocks)
        out = ZSTD_MAGIC + bytes([0xA0]) + struct.pack("<I", n)  # single segment, 4-byte content size
        for i in range(blocks):
            size = base + (i < extra)
            header = (size << 3) | (1 << 1) | (i == blocks - 1)  # Block_Size, Block_Type RLE, Last_Block
            out += struct.pack("<I", header)[:3] + b"\0"
        return out

    blocks = max(1, -(-n // ZSTD_BLOCK))
    out = frame(blocks)
    while 0 < length - len(out) < 8 and blocks < n:  # too short for a skippable frame: one more block
        blocks += 1
        out = frame(blocks)
    rest = length - len(out)
    if rest < 0 or 0 < rest < 8:
        raise ValueError(f"cannot write {n} zstd zeros in {length} bytes")
    return out + (struct.pack("<II", ZSTD_SKIPPABLE, rest - 8) + bytes(rest - 8) if rest else b"")


def filler(e: Entry) -> bytes:
    """What replaces a pruned payload: zeros, or for a zstd payload a zstd stream of zeros."""
    if not e.compressed:
        return bytes(e.size)
    return zstd_zeros(e.decompressed, e.compressed) + bytes(e.size - e.compressed)


def elf_section(data: bytes | bytearray, name: str) -> tuple[int, int]:
    """(file offset, size) of section `name` of a 64-bit little-endian ELF file."""
    if data[:4] != b"\x7fELF" or data[4] != 2 or data[5] != 1:
        raise ValueError("not a 64-bit little-endian ELF file")
    shoff, = struct.unpack_from("<Q", data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x3A)
    sections = [struct.unpack_from("<IIQQQQ", data, shoff + i * shentsize) for i in range(shnum)]
    strtab = sections[shstrndx][4]
    for sh_name, _, _, _, offset, size in sections:
        end = data.index(b"\0", strtab + sh_name)
        if data[strtab + sh_name:end].decode() == name:
            return offset, size
    raise ValueError(f"no {name} section")


def fatbin_entries(data: bytes | bytearray, offset: int, size: int) -> list[Entry]:
    """Every entry of the fatbin containers in data[offset:offset + size]."""
    entries, p, end = [], offset, offset + size
    while p + CONTAINER.size <= end:
        magic, _, header, length = CONTAINER.unpack_from(data, p)
        if magic != FATBIN_MAGIC:  # alignment padding between containers
            if any(data[p:p + 8]):
                raise ValueError(f"bad fatbin container at {p:#x}")
            p += 8
            continue
        e, stop = p + header, p + header + length
        while e < stop:
            kind, _, eheader, esize, csize, *_, arch = ENTRY.unpack_from(data, e)
            start = e + eheader
            zstd = data[start:start + 4] == ZSTD_MAGIC and eheader >= DECOMPRESSED_SIZE + 8
            dsize, = struct.unpack_from("<Q", data, e + DECOMPRESSED_SIZE) if zstd else (0,)
            entries.append(Entry(kind, arch, start, esize, csize if zstd else 0, dsize))
            e += eheader + esize
        if e != stop:
            raise ValueError(f"fatbin container at {p:#x}: entries overrun its size")
        p = stop
    return entries


def prune(data: bytes, keep_arch: int) -> tuple[bytearray, list[Entry], list[Entry]]:
    """A copy of `data` with the payload of every fatbin entry of another arch zeroed; (copy, kept, pruned)."""
    out = bytearray(data)
    entries = fatbin_entries(out, *elf_section(out, ".nv_fatbin"))
    kept = [e for e in entries if e.arch == keep_arch]
    pruned = [e for e in entries if e.arch != keep_arch]
    for e in pruned:
        out[e.start:e.start + e.size] = filler(e)
    return out, kept, pruned


def verify(original: bytes, new: bytes, kept: list[Entry], pruned: list[Entry]) -> None:
    """The pruned file equals the original except for the filler over the pruned payloads."""
    if len(new) != len(original):
        raise AssertionError("the file size changed")
    again = [(e.kind, e.arch, e.start, e.size) for e in fatbin_entries(new, *elf_section(new, ".nv_fatbin"))]
    if sorted(again, key=lambda e: e[2]) != sorted([(e.kind, e.arch, e.start, e.size) for e in kept + pruned],
                                                   key=lambda e: e[2]):
        raise AssertionError("the fatbin headers changed")
    for e in kept:
        if new[e.start:e.start + e.size] != original[e.start:e.start + e.size]:
            raise AssertionError(f"kept sm_{e.arch} entry at {e.start:#x} differs")
    cursor = 0
    for e in sorted(pruned, key=lambda e: e.start):
        if new[e.start:e.start + e.size] != filler(e):
            raise AssertionError(f"pruned sm_{e.arch} entry at {e.start:#x} is not the filler")
        if new[cursor:e.start] != original[cursor:e.start]:
            raise AssertionError(f"bytes before {e.start:#x} changed")
        cursor = e.start + e.size
    if new[cursor:] != original[cursor:]:
        raise AssertionError("bytes after the last pruned entry changed")


def _elf_names(cuobjdump: str, path: Path) -> list[str]:
    listing = subprocess.run([cuobjdump, "--list-elf", str(path)], capture_output=True, text=True, timeout=600)
    if listing.returncode != 0:
        raise AssertionError(f"cuobjdump --list-elf {path.name} failed: {listing.stderr.strip()[:200]}")
    return [ln.split(":", 1)[1].strip() for ln in listing.stdout.splitlines() if ln.startswith("ELF file")]


def _extract(cuobjdump: str, path: Path, name: str) -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run([cuobjdump, "-xelf", name, str(path.resolve())], cwd=tmp, capture_output=True,
                              text=True, timeout=600)
        files = list(Path(tmp).iterdir())
        if done.returncode != 0 or not files:
            raise AssertionError(f"cuobjdump -xelf {name} {path.name} failed: {done.stderr.strip()[:200]}")
        return files[0].read_bytes()


def _zstd_decompress(blob: bytes) -> bytes:
    return subprocess.run(["zstd", "-d", "-c"], input=blob, capture_output=True, check=True).stdout


def cuobjdump_check(cuobjdump: str, original: Path, new: bytes, kept: list[Entry], pruned: list[Entry],
                    keep_arch: int, samples: int = 4) -> dict:
    """Cross-check with NVIDIA's cuobjdump on the wheel's file: it lists as many sm_{keep_arch}
    cubins as the parser keeps, and sampled ones it extracts equal the kept payloads of the pruned
    file (decompressed with zstd). Sampled pruned payloads decompress to zeros. (cuobjdump itself
    refuses the pruned file: it validates every cubin, and a zeroed one is not an ELF file.)"""
    names = _elf_names(cuobjdump, original)
    mine = [n for n in names if f".sm_{keep_arch}" in n]
    if len(mine) != len(kept) or len(names) != len(kept) + len(pruned):
        raise AssertionError(f"cuobjdump lists {len(mine)} sm_{keep_arch} of {len(names)} cubins, "
                             f"the parser {len(kept)} of {len(kept) + len(pruned)}")
    order = sorted(kept, key=lambda e: e.start)
    pick = lambda n: [i * (n - 1) // max(1, samples - 1) for i in range(min(samples, n))]  # noqa: E731
    for i in pick(len(mine)):
        e = order[i]
        payload = bytes(new[e.start:e.start + (e.compressed or e.size)])
        cubin = _zstd_decompress(payload) if e.compressed else payload[:e.size]
        if cubin != _extract(cuobjdump, original, mine[i]):
            raise AssertionError(f"{mine[i]} extracted from the wheel differs from the kept payload")
    for i in pick(len(pruned)):
        e = pruned[i]
        out = _zstd_decompress(bytes(new[e.start:e.start + e.compressed])) if e.compressed else new[e.start:e.start + e.size]
        if any(out) or (e.compressed and len(out) != e.decompressed):
            raise AssertionError(f"pruned sm_{e.arch} entry at {e.start:#x} is not zeros")
    return {"elf_listed": len(names), f"sm_{keep_arch}_listed": len(mine),
            "identical_checked": [mine[i] for i in pick(len(mine))], "zero_checked": len(pick(len(pruned)))}


def wanted(name: str) -> bool:
    if not name.startswith("onnxruntime/") or name.endswith("/") or name.startswith(LEAVE_OUT):
        return False
    return name.endswith((".py", ".so")) or name in ("onnxruntime/LICENSE", "onnxruntime/ThirdPartyNotices.txt")


def pack(wheel: Path, out: Path, keep_arch: int, part_mib: float, include: Path | None, cuobjdump: str | None) -> dict:
    summary: dict = {"wheel": wheel.name, "keep_arch": f"sm_{keep_arch}"}
    with tempfile.TemporaryDirectory(prefix="ortpack-") as tmp:
        root = Path(tmp) / "tree"
        with zipfile.ZipFile(wheel) as z:
            names = [n for n in z.namelist() if wanted(n)]
            for n in names:
                target = root / n
                target.parent.mkdir(parents=True, exist_ok=True)
                data = z.read(n)
                if n == CUDA_PROVIDER:
                    new, kept, pruned = prune(data, keep_arch)
                    verify(data, new, kept, pruned)
                    target.write_bytes(new)
                    target.chmod(0o755)
                    summary["fatbin"] = {"kept": len(kept), "kept_mib": round(sum(e.size for e in kept) / 2**20, 1),
                                         "zeroed": len(pruned), "zstd": sum(1 for e in pruned if e.compressed),
                                         "zeroed_mib": round(sum(e.size for e in pruned) / 2**20, 1),
                                         "zeroed_archs": sorted({e.arch for e in pruned})}
                    if cuobjdump and shutil.which("zstd"):
                        wheel_copy = Path(tmp) / "original.so"
                        wheel_copy.write_bytes(data)
                        summary["cuobjdump"] = cuobjdump_check(cuobjdump, wheel_copy, new, kept, pruned, keep_arch)
                        wheel_copy.unlink()
                else:
                    target.write_bytes(data)
                    if n.endswith(".so"):
                        target.chmod(0o755)
        if CUDA_PROVIDER not in names:
            raise SystemExit(f"{wheel}: no {CUDA_PROVIDER}: not an onnxruntime-gpu wheel")
        top = ["onnxruntime"]
        if include is not None:
            shutil.copytree(include, root / "ort-include")
            top.append("ort-include")
        archive = Path(tmp) / "ort.tar.xz"
        with open(archive, "wb") as f:
            tar = subprocess.Popen(["tar", "-C", str(root), "--owner=0", "--group=0", "-cf", "-", *top],
                                   stdout=subprocess.PIPE)
            subprocess.run(["xz", "-9", "-T0", "-c"], stdin=tar.stdout, stdout=f, check=True)
            if tar.wait() != 0:
                raise SystemExit("tar failed")
        blob = archive.read_bytes()
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("ort.part*"):
        old.unlink()
    step = int(part_mib * 2**20)
    parts = []
    for i in range(0, len(blob), step):
        p = out / f"ort.part{len(parts)}"
        p.write_bytes(blob[i:i + step])
        parts.append(p)
    if len(parts) > 10:
        raise SystemExit(f"{len(parts)} parts: gpu_call.sh joins ort.part* in glob order, which needs at most 10")
    summary.update({"files": len(names), "tar_xz_bytes": len(blob), "tar_xz_mib": round(len(blob) / 2**20, 1),
                    "sha256": hashlib.sha256(blob).hexdigest(), "parts": [str(p) for p in parts],
                    "part_mib_max": part_mib})
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--wheel", type=Path, required=True, help="onnxruntime_gpu-*.whl")
    ap.add_argument("--out", type=Path, default=Path(".carry"), help="folder for ort.part* (default .carry)")
    ap.add_argument("--arch", type=int, default=90, help="the GPU's compute capability (H200: 90)")
    ap.add_argument("--part-mib", type=float, default=21.0, help="largest part, MiB")
    ap.add_argument("--ort-include", type=Path, default=None, help="onnxruntime C API headers to add as ort-include/")
    ap.add_argument("--cuobjdump", default=None, help="cuobjdump for the check (default: triton's, else PATH's)")
    args = ap.parse_args(argv)
    if not args.wheel.is_file():
        ap.error(f"--wheel {args.wheel}: no such file")
    cuobjdump = args.cuobjdump or str(bundled_cuobjdump() or "") or shutil.which("cuobjdump")
    print(json.dumps(pack(args.wheel, args.out, args.arch, args.part_mib, args.ort_include, cuobjdump), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
