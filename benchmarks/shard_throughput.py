"""Sharding throughput and memory, measured side by side in one run (medians of --repeats).

1. pass-through sharding vs `tar cf` of the same tree (images/s, MB/s; target >= 0.85x with 2 workers,
   >= 0.8x with 1), on a corpus
   large enough that tar runs for a third of a second (12,000 images): on 1,500, tar's whole run
   takes 50 ms and what a shard run pays once (forking the workers, the manifest) is measured as
   if it were throughput. Two more references put that in context (no target): `tar cf - |
   sha256sum` (tar plus the checksum every shard gets in the manifest) and a Python script that
   adds each file with the stdlib `tarfile`. `--validate decode` (every pixel decoded) is timed on
   the resize corpus, against tar on that corpus;
2. resize mode vs a bare PIL decode+resize+encode loop (target >= 0.9x with 1 worker,
   >= 1.8x of the bare loop with 2 workers). For context, the bare loop split over 2 processes:
   what the machine's two cores give to perfectly parallel work;
3. peak memory (ru_maxrss of a fresh subprocess) sharding 10k vs 50k images (target <= 1.2x).

`--against DIR` (another checkout of this project, e.g. main's, with its own .venv): its
pass-through runs and peak memory are measured too, interleaved with this checkout's in the same
run; both checkouts' shard runs then go through a long-lived child process each, alike.

The corpus is real JPEGs: crops of scikit-image's sample photographs (nothing downloaded).
    .venv/bin/python benchmarks/shard_throughput.py [--images 1500] [--passthrough-images 12000]
        [--workdir DIR] [--quick] [--sections memory,resize,passthrough] [--against DIR]
"""
from __future__ import annotations

import argparse
import functools
import io
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from shards import shard_dataset  # noqa: E402


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _warm(root: Path) -> int:
    return sum(len(p.read_bytes()) for p in _files(root))


def _median_times(runs: dict, repeats: int) -> dict:
    """Median wall time of each run; the runs are interleaved (A B C, B C A, C A B, ...) so that load
    from other processes on the machine hits every contestant alike, and no contestant always runs
    right after the same one (the kernel still writing out the previous run's 300 MB)."""
    times = {name: [] for name in runs}
    names = list(runs)
    for repeat in range(repeats):
        for name in names[repeat % len(names):] + names[:repeat % len(names)]:
            fn = runs[name]
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def _tar_cf(root: Path, out: Path) -> None:
    subprocess.run(["tar", "cf", str(out), "-C", str(root), "."], check=True)
    out.unlink()


def _tar_sha(root: Path) -> None:
    subprocess.run(f"tar cf - -C '{root}' . | sha256sum > /dev/null", shell=True, check=True)


def _python_tarfile(files: list[Path], root: Path, out: Path) -> None:
    """What a hand-written Python script does: one tarfile.add per file (no hashing, no labels)."""
    import tarfile

    with tarfile.open(out, "w") as tar:
        for path in files:
            tar.add(str(path), arcname=str(path.relative_to(root)))
    out.unlink()


def _shard(root: Path, out: Path, images: int, **kw) -> None:
    # 16 shards: 8 per worker with 2 workers, as a real job has many shards per worker (ImageNet-21k at
    # 10k samples a shard: ~1400). With few shards the last one's wait measures load imbalance, not
    # throughput (3 shards on 2 workers cap at 1.5x)
    shard_dataset(str(root), str(out), shard_size=max(1, -(-images // 16)), **kw)
    shutil.rmtree(out)


def _bare_resize_loop(files: list[Path], *, shorter: int, quality: int) -> None:
    """What a hand-written script does: decode, resize the shorter side, encode. Same PIL calls
    (draft + BICUBIC with reducing_gap) as shards.imaging.resize_encode, and like it no RGB->RGB
    convert (a copy of the pixels: about 10% of this loop, which an unfair reference would keep)."""
    from PIL import Image

    for path in files:
        image = Image.open(path)
        w, h = image.size
        scale = shorter / min(w, h)
        target = (max(1, round(w * scale)), max(1, round(h * scale)))
        image.draft("RGB", target)
        image = (image if image.mode == "RGB" else image.convert("RGB")).resize(target, Image.BICUBIC, reducing_gap=3.0)
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=quality)


def _bare_resize_two_processes(files: list[Path], *, shorter: int, quality: int) -> None:
    """The bare loop, each half of the files in its own forked process: the ceiling of 2-core scaling."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    procs = [context.Process(target=_bare_resize_loop, args=(files[i::2],), kwargs=dict(shorter=shorter, quality=quality))
             for i in range(2)]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join()
        if proc.exitcode:
            raise RuntimeError(f"bare loop process failed with exit code {proc.exitcode}")


_SHARD_SERVER = """
import shutil, sys, time
sys.path.insert(0, sys.argv[1])
from shards import shard_dataset
for line in sys.stdin:
    src, out, images, workers = line.rstrip("\\n").split("\\t")
    shard_dataset(src, out, shard_size=max(1, -(-int(images) // 16)), workers=int(workers))
    shutil.rmtree(out)
    print("done", flush=True)
"""


class _ShardServer:
    """shard_dataset of a checkout (`root`, run by its `python`) in a long-lived child: one line in per run
    (the same run as _shard's: 16 shards, output removed), one out when it is done; no import or
    startup in the timed part."""

    def __init__(self, root: Path, python: str):
        self.proc = subprocess.Popen([python, "-c", _SHARD_SERVER, str(root)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, cwd=root)

    def __call__(self, src: Path, out: Path, images: int, workers: int) -> None:
        self.proc.stdin.write(f"{src}\t{out}\t{images}\t{workers}\n")
        self.proc.stdin.flush()
        if self.proc.stdout.readline() != "done\n":
            raise RuntimeError(f"the shard server of {self.proc.args[-1]} exited ({self.proc.wait()})")

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def _checkout(root: str) -> tuple[Path, str]:
    """(root, python) of another checkout: its .venv's python if it has one."""
    path = Path(root).resolve()
    python = path / ".venv" / "bin" / "python"
    return path, str(python if python.exists() else sys.executable)


_MEMORY_CHILD = """
import resource, sys
sys.path.insert(0, sys.argv[3])
from shards import shard_dataset
shard_dataset(sys.argv[1], sys.argv[2], shard_size=10000, workers=int(sys.argv[4]) if len(sys.argv) > 4 else 1)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
_CORPUS_CHILD = """
import sys
sys.path.insert(0, sys.argv[5])
from shards.testdata import write_jpeg_tree
w, h = (int(v) for v in sys.argv[3].split("x"))
write_jpeg_tree(sys.argv[1], count=int(sys.argv[2]), size=(w, h), classes=int(sys.argv[4]), quality=85)
"""


def _make_corpus(root: Path, *, count: int, size: str, classes: int) -> None:
    """In a subprocess, so this process stays small (Linux keeps ru_maxrss across fork+exec:
    a child started from a big parent would report the parent's peak)."""
    if not root.exists():
        subprocess.run([sys.executable, "-c", _CORPUS_CHILD, str(root), str(count), size, str(classes), str(ROOT)],
                       check=True)


def _peak_rss_mb(root: Path, out: Path, checkout: tuple[Path, str] = (ROOT, sys.executable)) -> float:
    proc = subprocess.run([checkout[1], "-c", _MEMORY_CHILD, str(root), str(out), str(checkout[0])],
                          capture_output=True, text=True, check=True)
    shutil.rmtree(out, ignore_errors=True)
    return int(proc.stdout.strip().splitlines()[-1]) / 1024


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=1500, help="resize corpus size (default 1500)")
    ap.add_argument("--passthrough-images", type=int, default=12000, help="pass-through corpus size (default 12000)")
    ap.add_argument("--size", default="500x375", help="throughput image size WxH (default 500x375, ImageNet-like)")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--memory-sizes", default="10000,50000")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--quick", action="store_true", help="small corpus, 1 repeat (smoke run)")
    ap.add_argument("--sections", default="memory,resize,passthrough", help="which sections to run (default: all)")
    ap.add_argument("--against", default=None, metavar="DIR",
                    help="another checkout (e.g. main's) measured side by side: pass-through and memory")
    args = ap.parse_args(argv)
    against = _checkout(args.against) if args.against else None
    if args.quick:
        args.images, args.passthrough_images, args.repeats, args.memory_sizes = 600, 2000, 1, "2000,6000"
    width, height = (int(v) for v in args.size.split("x"))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="shard-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    try:
        sections = set(args.sections.split(","))
        sizes = [int(s) for s in args.memory_sizes.split(",")] if "memory" in sections else []
        peaks, their_peaks = [], []
        for count in sizes:  # first, while this process is small
            tree = work / f"mem-{count}"
            _make_corpus(tree, count=count, size="64x48", classes=100)
            peaks.append(_peak_rss_mb(tree, work / "mem-out"))
            print(f"peak RSS sharding {count} images: {peaks[-1]:.1f} MB", flush=True)
            if against:
                their_peaks.append(_peak_rss_mb(tree, work / "mem-out", against))
                print(f"  {against[0]}: {their_peaks[-1]:.1f} MB", flush=True)
        corpus, corpus_pt = work / "corpus", work / "corpus-passthrough"
        if "resize" in sections:
            _make_corpus(corpus, count=args.images, size=f"{width}x{height}", classes=20)
        if "passthrough" in sections:
            _make_corpus(corpus_pt, count=args.passthrough_images, size=f"{width}x{height}", classes=20)
        os.sync()  # the corpora just written reach the disk now, not during the timed runs
        out = work / "out"

        if "resize" in sections:
            # the resize section first. Measured after the pass-through section (which writes and deletes
            # ~1 GB within seconds), the resize runs came out 10-20% slower while the bare loop, which writes
            # nothing, did not; the cause (kernel writeback?) is not established
            n, mb = args.images, _warm(corpus) / 1e6
            files = _files(corpus)
            print(f"resize corpus: {n} JPEGs {width}x{height}, {mb:.1f} MB, {os.cpu_count()} CPUs", flush=True)
            shorter, quality = 160, 90
            resize = {
                "bare": lambda: _bare_resize_loop(files, shorter=shorter, quality=quality),
                "bare2": lambda: _bare_resize_two_processes(files, shorter=shorter, quality=quality),
                "resize1": lambda: _shard(corpus, out, n, workers=1, resize=shorter, quality=quality),
                "resize2": lambda: _shard(corpus, out, n, workers=2, resize=shorter, quality=quality),
                "tar": lambda: _tar_cf(corpus, work / "all.tar"),
                "decode2": lambda: _shard(corpus, out, n, workers=2, validate="decode"),
            }
            t = _median_times(resize, args.repeats)
            rows.append((f"bare PIL decode+resize({shorter})+encode loop", n / t["bare"], mb / t["bare"], 1.0, ""))
            rows.append(("the bare loop split over 2 processes (context: 2-core ceiling)", n / t["bare2"], mb / t["bare2"],
                         t["bare"] / t["bare2"], ""))
            for workers, target in ((1, ">= 0.9x bare loop"), (2, ">= 1.8x bare loop")):
                tw = t[f"resize{workers}"]
                rows.append((f"shard --resize {shorter}, {workers} worker(s)", n / tw, mb / tw, t["bare"] / tw, target))
                print(rows[-1], flush=True)
            rows.append((f"tar cf of the {n}-image resize corpus (reference for the next row)", n / t["tar"],
                         mb / t["tar"], 1.0, ""))
            rows.append(("shard pass-through --validate decode, 2 workers", n / t["decode2"], mb / t["decode2"],
                         t["tar"] / t["decode2"], "(every pixel decoded; no target)"))

        if "passthrough" in sections:
            n, mb = args.passthrough_images, _warm(corpus_pt) / 1e6
            files = _files(corpus_pt)
            print(f"pass-through corpus: {n} JPEGs {width}x{height}, {mb:.1f} MB", flush=True)
            passthrough = {
                "tar": lambda: _tar_cf(corpus_pt, work / "all.tar"),
                "tar_sha": lambda: _tar_sha(corpus_pt),
                "tarfile": lambda: _python_tarfile(files, corpus_pt, work / "py.tar"),
                "shard1": lambda: _shard(corpus_pt, out, n, workers=1),
                "shard2": lambda: _shard(corpus_pt, out, n, workers=2),
            }
            servers = []
            if against:  # both checkouts alike: each in its own long-lived child, interleaved
                servers = [_ShardServer(ROOT, sys.executable), _ShardServer(*against)]
                for workers in (1, 2):
                    passthrough.pop(f"shard{workers}")
                    for name, server in zip(("shard", "against"), servers):
                        passthrough[f"{name}{workers}"] = functools.partial(server, corpus_pt, out, n, workers)
            try:
                t = _median_times(passthrough, args.repeats)
            finally:
                for server in servers:
                    server.close()
            rows.append((f"tar cf of the {n}-image pass-through corpus (reference)", n / t["tar"], mb / t["tar"], 1.0, ""))
            rows.append(("tar cf - | sha256sum (context)", n / t["tar_sha"], mb / t["tar_sha"], t["tar"] / t["tar_sha"], ""))
            rows.append(("Python stdlib tarfile.add per file (context)", n / t["tarfile"], mb / t["tarfile"],
                         t["tar"] / t["tarfile"], ""))
            for workers, target in ((1, ">= 0.8x tar cf"), (2, ">= 0.85x tar cf")):
                tw = t[f"shard{workers}"]
                rows.append((f"shard pass-through, {workers} worker(s)", n / tw, mb / tw, t["tar"] / tw, target))
                if against:
                    ta = t[f"against{workers}"]
                    rows.append((f"shard pass-through, {workers} worker(s), {against[0]}", n / ta, mb / ta, t["tar"] / ta,
                                 f"this checkout: {ta / tw:.2f}x its images/s"))
        for row in rows:
            print(row, flush=True)

    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    print()
    print("| run | images/s | MB/s | ratio | target |")
    print("|---|---:|---:|---:|---|")
    for name, ips, mbs, ratio, target in rows:
        print(f"| {name} | {ips:.0f} | {mbs:.1f} | {ratio:.2f}x | {target} |")
    if not peaks:
        return 0
    print()
    print("| images | peak RSS (MB) | ratio to smallest | target |")
    print("|---:|---:|---:|---|")
    for count, peak in zip(sizes, peaks):
        print(f"| {count} | {peak:.1f} | {peak / peaks[0]:.2f}x | <= 1.2x |")
    for count, peak in zip(sizes, their_peaks):
        print(f"| {count}, {against[0]} | {peak:.1f} | {peak / their_peaks[0]:.2f}x | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
