"""Sharding at scale, measured side by side in one run (ratios; medians of --repeats, interleaved).

1. memory: the coordinator's peak RSS (ru_maxrss of a fresh process that plans and writes, the
   scan and the writes in 2 worker processes) at 50k / 200k / 1M tiny distinct JPEGs (short
   paths), bytes per record between the sizes, and that slope extrapolated to ImageNet-21k (14M)
   and JFT-300M (300M); and what grows with partitions x shards instead: the route offsets and the
   shard tasks of JFT-300M in shards of 10k at 400 partitions;
2. gets: GET requests per image for an S3 source (real SeaweedFS): whole-object GETs and ranged
   GETs of the ends (the scan); and the GETs and PUTs of the plan's own files (`<out>/_plan/` on S3,
   8 partitions and 16 shards as in the dask section's 2-worker runs);
3. dask: a real `dask scheduler` + `dask worker` processes on 127.0.0.1: --resize images/s with 2
   workers vs 1 (real photographs, the corpus builder of benchmarks/shard_throughput.py), from S3 to
   S3 (on 2 cores the SeaweedFS server shares them with the workers), beside the machine's own
   ceiling for that work: 2 bare processes vs 1, each a boto3 GET, resize_encode (the writer's
   call), PUT loop over its half of the photos; and pass-through S3 -> S3 vs a bare boto3 GET+PUT
   loop per worker (same objects), and again with one read at a time per worker (what
   storage.map_reads' requests in flight give);
4. local: --resize images/s with 2 workers vs 1 from a local folder to a local folder (no server),
   on --local-images photos (16,000: about 400 MB), beside 2 bare processes vs 1 reading and
   resizing the same photos.
   The 2 cores of these machines are virtual: 2 bare processes doing the same CPU-bound work range
   from about 1.6x to 2.0x of one from repeat to repeat, so each repeat's Dask ratio is printed
   beside that repeat's bare one, and their quotient (Dask's share of what the machine gave);
5. first: time to the first shard written for a 200k-record source vs a 50k one (shards of 10k,
   2 local workers), the global plan and --window (default 20k records: 40 of the 50k tree's 100
   class folders, 10 of the 200k tree's) side by side; --first-source manifest: a jsonl manifest
   of the same files (multi-label), in units of 1 MB (about 23k of its lines);
6. attribute (not run by default): at the largest --memory-sizes, the coordinator's peak RSS and
   heap (tracemalloc) after each planning phase, and the bytes per record of what the plan holds.

    .venv/bin/python benchmarks/shard_scale.py [--sections memory,attribute,gets,dask,local,first]
        [--memory-sizes 50000,200000,1000000]
        [--first-sizes 50000,200000] [--window 20000] [--first-source tree|manifest]
        [--images 2000] [--local-images 16000] [--repeats 3] [--workdir DIR]

The load on the machine (os.getloadavg) is printed beside each figure: on a shared 2-core machine
ratios of parallel runs are bounded by what the other processes leave.
"""
from __future__ import annotations

import argparse
import functools
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from shard_throughput import _MEMORY_CHILD, _make_corpus, _median_times  # noqa: E402

from shards import plan_shards, shard_dataset, storage, write_shard  # noqa: E402
from shards.storage import _READ_THREADS  # noqa: E402

_TINY_CHILD = """
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[3])
from shards.testdata import encode, photo_crops
base = encode(photo_crops(1, size=(8, 8), seed=1)[0], "JPEG", quality=80)
root, count = Path(sys.argv[1]), int(sys.argv[2])
for c in range(100):
    (root / f"c{c:02d}").mkdir(parents=True, exist_ok=True)
for i in range(count):  # distinct files: a comment segment holding the number, after the SOI marker
    note = str(i).encode()
    (root / f"c{i % 100:02d}" / f"{i}.jpg").write_bytes(base[:2] + b"\\xff\\xfe" + (len(note) + 2).to_bytes(2, "big")
                                                      + note + base[2:])
"""
# what the coordinator holds, phase by phase: each planning step wrapped to print the peak RSS so far
# and the Python/numpy heap (tracemalloc: current and peak) when it returns
_ATTRIBUTE_CHILD = """
import importlib, os, pickle, resource, sys, tracemalloc
sys.path.insert(0, sys.argv[3])
import shards
from shards import plan, shard_dataset
tracemalloc.start()
os.register_at_fork(after_in_child=tracemalloc.stop)  # the coordinator's heap only (workers untraced)
def rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
def wrap(where):
    module, name = where.rsplit(".", 1)
    module = importlib.import_module(module)
    fn = getattr(module, name)
    def wrapped(*args, **kwargs):
        tracemalloc.reset_peak()
        out = fn(*args, **kwargs)
        current, peak = tracemalloc.get_traced_memory()
        print(f"phase {name}: peak RSS so far {rss() / 1e6:.1f} MB; heap now {current / 1e6:.1f} MB, "
              f"step peak {peak / 1e6:.1f} MB", flush=True)
        return out
    setattr(module, name, wrapped)
for where in sys.argv[4].split(","):
    wrap(where)
held = {}
real_plan = plan.plan_shards
def planned(*args, **kwargs):
    out = real_plan(*args, **kwargs)
    held["the plan (pickled: tasks, skipped, classes, settings)"] = len(pickle.dumps(out))
    held["skipped"] = len(out.skipped)
    current, peak = tracemalloc.get_traced_memory()
    print(f"phase plan_shards: peak RSS so far {rss() / 1e6:.1f} MB; heap now {current / 1e6:.1f} MB, "
          f"peak {peak / 1e6:.1f} MB", flush=True)
    return out
shards.plan_shards = planned
shard_dataset(sys.argv[1], sys.argv[2], shard_size=10000, workers=2)
for what, size in held.items():
    print(f"held {what}: {size}", flush=True)
print(f"peak RSS {rss() / 1e6:.1f} MB", flush=True)
"""
# the coordinator's own steps between the workers' phases (shards.partplan)
_PHASES = "shards.partitions.merge,shards.partplan._duplicates,shards.partplan._shard_bounds"
_BUCKET = "bench"


def _load() -> str:
    return f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"


def _tiny_tree(root: Path, count: int) -> None:
    if not root.exists():
        subprocess.run([sys.executable, "-c", _TINY_CHILD, str(root), str(count), str(ROOT)], check=True)


def memory(work: Path, sizes: list[int]) -> None:
    peaks = {}
    for n in sizes:
        tree = work / f"tiny{n}"
        _tiny_tree(tree, n)
        proc = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, str(tree), str(work / "mem_out"), str(ROOT), "2"],
                              capture_output=True, text=True, check=True)
        shutil.rmtree(work / "mem_out", ignore_errors=True)
        peaks[n] = int(proc.stdout.strip().splitlines()[-1]) * 1024
        print(f"memory: {n:>8} records  coordinator peak RSS {peaks[n] / 1e6:7.1f} MB   ({_load()})", flush=True)
    lo, hi = min(sizes), max(sizes)
    slope = (peaks[hi] - peaks[lo]) / (hi - lo)
    print(f"memory: {hi // 1000}k/{lo // 1000}k peak ratio {peaks[hi] / peaks[lo]:.2f}x; {slope:.0f} bytes per record; "
          f"extrapolated: ImageNet-21k 14M {(peaks[lo] + slope * (14e6 - lo)) / 1e9:.1f} GB, "
          f"JFT-300M {(peaks[lo] + slope * (300e6 - lo)) / 1e9:.1f} GB", flush=True)
    _task_memory(400, 30000)


def _task_memory(partitions: int, shards: int) -> None:
    """What grows with partitions x shards instead of records: the route offsets the coordinator holds
    (Planned.spans) and the shard tasks made from them (shards.plan.shard_tasks; tracemalloc), at the
    size of JFT-300M in shards of 10k cut into `partitions`."""
    import tracemalloc
    from types import SimpleNamespace

    import numpy as np

    from shards.plan import ShardSettings, shard_tasks

    planned = SimpleNamespace(bounds=[(10 * i, 10 * i + 10) for i in range(shards)], classes=["c"],
                              multi_label=False, listing=SimpleNamespace(fingerprint="f"),
                              routes=[f"s3://bucket/out/_plan/r-{i:05d}.npz" for i in range(partitions)],
                              spans=np.zeros((partitions, shards + 1), dtype=np.int64))
    tracemalloc.start()
    tasks = shard_tasks(ShardSettings(), "s3://bucket/out", planned)
    held = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    print(f"memory: {len(tasks)} shard tasks at {partitions} partitions hold {held / 1e6:.1f} MB beside the route "
          f"offsets' {planned.spans.nbytes / 1e6:.1f} MB", flush=True)


def attribute(work: Path, n: int) -> None:
    """Where the coordinator's memory goes at `n` records: each planning phase's peak RSS and heap,
    and the bytes of what the plan keeps."""
    tree = work / f"tiny{n}"
    _tiny_tree(tree, n)
    proc = subprocess.run([sys.executable, "-c", _ATTRIBUTE_CHILD, str(tree), str(work / "attr_out"), str(ROOT),
                           _PHASES], capture_output=True, text=True, check=True)
    shutil.rmtree(work / "attr_out", ignore_errors=True)
    for line in proc.stdout.splitlines():
        if line.startswith("held "):
            what, size = line[5:].rsplit(": ", 1)
            line = f"held {what}: {int(size) / 1e3:.1f} kB, {int(size) / n:.2f} bytes per record" if what != "skipped" \
                else f"held {what}: {size} entries"
        print(f"attribute {n // 1000}k: {line}", flush=True)
    print(f"attribute {n // 1000}k: ({_load()})", flush=True)


def _store(work: Path):
    from pipeline.objectstore import start_seaweedfs

    store = start_seaweedfs(work / "seaweedfs", access_key="bench", secret_key="bench-secret", buckets=(_BUCKET,))
    os.environ.update(store.env())
    storage.reset_clients()
    return store


def _upload(corpus: Path, url: str) -> int:
    if not any(True for _ in storage.iter_files(url)):
        storage.copy_tree(str(corpus), url)
    return sum(1 for _ in storage.iter_files(url))


def gets(work: Path, corpus: Path) -> None:
    src = f"s3://{_BUCKET}/gets-{corpus.name}"  # by size: a --workdir kept between runs holds each corpus
    n = _upload(corpus, src)
    ranges: list = []
    plan_files = {"GetObject": 0, "PutObject": 0}  # requests on <out>/_plan/ (the plan's own files)
    client = storage.s3._client()

    def image(params, **_):
        if params["Key"].startswith(f"gets-{corpus.name}/"):
            ranges.append(params.get("Range"))

    def plan_file(params, event_name, **_):
        if "/_plan/" in params.get("Key", ""):
            plan_files[event_name.rsplit(".", 1)[-1]] += 1
    hooks = [("GetObject", image)] + [(op, plan_file) for op in plan_files]
    for op, hook in hooks:
        client.meta.events.register(f"provide-client-params.s3.{op}", hook)
    out = f"s3://{_BUCKET}/gets_out"
    try:
        _clear(out)
        plan = plan_shards(src, out, shard_size=-(-n // 16), partitions=8)  # as the dask section's 2 workers
        for index in range(len(plan.tasks)):
            write_shard(plan, index)
    finally:
        for op, hook in hooks:
            client.meta.events.unregister(f"provide-client-params.s3.{op}", hook)
    _clear(out)
    whole = sum(r is None for r in ranges)
    print(f"gets: {n} S3 images: {whole / n:.2f} whole-object GETs per image, {(len(ranges) - whole) / n:.2f} ranged "
          f"GETs of the ends per image (the scan), with the plan's own files: {plan_files['GetObject']} GETs and "
          f"{plan_files['PutObject']} PUTs on _plan/ for {len(plan.split.partitions)} partitions and {len(plan.tasks)} "
          "shards", flush=True)


def _boto_loop(keys: list[str], src: str, dst: str, resize: int = 0) -> None:
    """A bare GET+PUT per object (what a hand-written copy does), run on each worker for its half;
    `resize`: with the writer's resize_encode call between them."""
    from shards.imaging import resize_encode
    from shards.plan import ShardSettings
    from shards.storage.s3 import _client, split

    bucket, prefix = split(src)
    _, out = split(dst)
    client = _client()
    for key in keys:
        body = client.get_object(Bucket=bucket, Key=key)["Body"].read()
        if resize:
            body = resize_encode(body, shorter=resize, quality=ShardSettings.quality)[0]
        client.put_object(Bucket=bucket, Key=out + "/" + key.rsplit("/", 1)[-1], Body=body)


def dask(work: Path, corpus: Path, repeats: int) -> None:
    from distributed import Client

    from shards.storage.s3 import split
    from shards.workers import LoopbackCluster, process_pool

    src = f"s3://{_BUCKET}/{corpus.name}"
    n = _upload(corpus, src)
    env = dict(os.environ)
    keys = [split(item["url"])[1] for item in storage.iter_files(src)]
    with LoopbackCluster(2, env=env) as two, LoopbackCluster(1, env=env) as one, \
            process_pool(2) as bare2, process_pool(1) as bare1:
        def run(cluster, tag, **kw):
            # 16 shards, as benchmarks/shard_throughput.py: with 3 (shard_size 200 of 600) 2 workers write 2
            # and 1, which caps them at 1.5x one worker and measures the wait for the last shard
            url = f"s3://{_BUCKET}/out/{tag}"

            def go():
                _clear(url)
                with _paused(two if cluster is one else one):
                    shard_dataset(src, url, dask=cluster.address, shard_size=-(-n // 16), **kw)
            return go

        def bare(pool, k):
            dst = f"s3://{_BUCKET}/out/bare{k}"
            return lambda: _paused_both(two, one, lambda: _spread(pool, functools.partial(
                _boto_loop, src=src, dst=dst, resize=64), keys, k))

        times = _pair_times([{"2 workers": run(two, "r2", resize=64), "1 worker": run(one, "r1", resize=64)},
                             {"bare 2": bare(bare2, 2), "bare 1": bare(bare1, 1)}], repeats)
        _scaling("dask", f"--resize 64 on {n} photos, S3 -> S3 (bare: a boto3 GET, resize_encode, PUT loop)", n, times)
        with Client(two.address, set_as_default=False) as client:
            def loop():
                halves = [keys[0::2], keys[1::2]]
                futures = [client.submit(_boto_loop, half, src, f"s3://{_BUCKET}/out/bare", pure=False)
                           for half in halves]
                client.gather(futures)

            def reads(threads, fn):  # storage.map_reads' requests in flight in each worker, then the run
                return lambda: (client.run(_read_threads, threads), fn())

            with _paused(one):
                times = _median_times({"pass-through 2 workers": reads(_READ_THREADS, run(two, "p2")),
                                       "boto3 GET+PUT 2 workers": loop,
                                       "one read at a time": reads(1, run(two, "p1"))}, repeats)
            client.run(_read_threads, _READ_THREADS)
        ratio = times["boto3 GET+PUT 2 workers"] / times["pass-through 2 workers"]
        print(f"dask: pass-through S3->S3 on 2 workers {n / times['pass-through 2 workers']:.1f} img/s vs a bare boto3 "
              f"GET+PUT loop per worker {n / times['boto3 GET+PUT 2 workers']:.1f} img/s: {ratio:.2f}x ({_load()})",
              flush=True)
        print(f"dask: the same pass-through with one read at a time per worker (storage.map_reads off): "
              f"{n / times['one read at a time']:.1f} img/s: "
              f"{times['boto3 GET+PUT 2 workers'] / times['one read at a time']:.2f}x the loop", flush=True)


def local(work: Path, corpus: Path, repeats: int) -> None:
    """--resize 64 from a local folder to a local folder on the loopback Dask cluster, 2 workers vs 1: no
    SeaweedFS sharing the 2 cores; a larger corpus than the S3 sections' (at 1,200-1,400 img/s per
    worker 2,000 photos last 1.5 s and 8,000 photos 6 s, and the plan's fixed phases weigh).
    Beside it, interleaved, the machine's own ceiling for the same work: 2 bare processes vs 1
    reading and resizing the same photos (the writer's resize_encode call, no plan, no tar, no Dask)."""
    from shards.workers import LoopbackCluster, process_pool

    paths = sorted(str(p) for p in corpus.rglob("*.jpg"))
    n = len(paths)
    with LoopbackCluster(2, env=dict(os.environ)) as two, LoopbackCluster(1, env=dict(os.environ)) as one, \
            process_pool(2) as bare2, process_pool(1) as bare1:
        def run(cluster, tag):
            url = work / "out" / tag

            def go():
                shutil.rmtree(url, ignore_errors=True)
                with _paused(two if cluster is one else one):
                    shard_dataset(str(corpus), str(url), dask=cluster.address, shard_size=-(-n // 16), resize=64)
            return go

        def bare(pool, k):
            return lambda: _paused_both(two, one, lambda: _spread(pool, _resize_files, paths, k))

        times = _pair_times([{"2 workers": run(two, "l2"), "1 worker": run(one, "l1")},
                             {"bare 2": bare(bare2, 2), "bare 1": bare(bare1, 1)}], repeats)
    _scaling("local", f"--resize 64 on {n} photos, local folder -> local folder", n, times)


def _resize_files(paths: list[str]) -> None:
    """The writer's per-image work for --resize 64 from a local folder, bare: read, resize_encode."""
    from shards.imaging import resize_encode
    from shards.plan import ShardSettings

    for path in paths:
        resize_encode(Path(path).read_bytes(), shorter=64, quality=ShardSettings.quality)


def _spread(pool, fn, items: list, k: int) -> None:
    """fn over `items` in `k` processes of `pool` (started before: no fork in the time), a slice each."""
    for future in [pool.submit(fn, items[i::k]) for i in range(k)]:
        future.result()


@contextmanager
def _paused(cluster):
    """The other cluster's processes stopped (SIGSTOP) while this one runs: an idle Dask scheduler and
    worker still wake on their timers (about 0.07 of a core here), a load no user's single cluster has."""
    for proc in cluster.procs:
        os.kill(proc.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for proc in cluster.procs:
            os.kill(proc.pid, signal.SIGCONT)


def _paused_both(two, one, fn) -> None:
    with _paused(two), _paused(one):
        fn()


def _pair_times(pairs: list[dict], repeats: int) -> dict:
    """Each run's wall times, one per repeat: the two runs of a pair back to back (the machine's speed
    drifts from minute to minute), the pairs and the runs within them in turn first."""
    times = {name: [] for pair in pairs for name in pair}
    for repeat in range(repeats):
        for pair in pairs[repeat % len(pairs):] + pairs[:repeat % len(pairs)]:
            names = list(pair) if repeat % 2 == 0 else list(pair)[::-1]
            for name in names:
                start = time.perf_counter()
                pair[name]()
                times[name].append(time.perf_counter() - start)
    return times


def _scaling(section: str, what: str, n: int, times: dict) -> None:
    """Print 2 workers vs 1 (Dask) beside 2 bare processes vs 1: medians of the times, and the ratios of
    each repeat (the contestants of one repeat run back to back, under the same load)."""
    med = {name: statistics.median(values) for name, values in times.items()}
    dask = [a / b for a, b in zip(times["1 worker"], times["2 workers"])]
    bare = [a / b for a, b in zip(times["bare 1"], times["bare 2"])]
    share = [d / b for d, b in zip(dask, bare)]
    print(f"{section}: {what}: Dask 2 workers {n / med['2 workers']:.1f} img/s, 1 worker {n / med['1 worker']:.1f} img/s: "
          f"{med['1 worker'] / med['2 workers']:.2f}x; the machine's ceiling, 2 bare processes vs 1 doing the same "
          f"per-image work: {n / med['bare 2']:.1f} vs {n / med['bare 1']:.1f} img/s, "
          f"{med['bare 1'] / med['bare 2']:.2f}x ({_load()})", flush=True)
    print(f"{section}: per repeat: Dask {' '.join(f'{r:.2f}' for r in dask)}; bare {' '.join(f'{r:.2f}' for r in bare)}; "
          f"Dask's scaling as a share of the bare processes' {' '.join(f'{r:.2f}' for r in share)} "
          f"(median {statistics.median(share):.2f})", flush=True)


def _read_threads(n: int) -> None:
    """In a worker: storage.map_reads with `n` requests in flight (1: one after the other)."""
    storage._READ_THREADS = n
    for pool in storage._read_pools.values():
        pool.shutdown(wait=False)
    storage._read_pools.clear()


def _clear(url: str) -> None:
    for item in list(storage.iter_files(url)) if storage.exists(url) else []:
        storage.delete(item["url"])


def _first_shard(tree: Path, dest: Path, times: list, **settings) -> None:
    """Shard `tree` into `dest` (2 local workers, shards of 10k); appends the time to the first shard
    file seen in `dest` (a watcher thread polling every 10 ms)."""
    shutil.rmtree(dest, ignore_errors=True)
    seen: list[float] = []
    stop = threading.Event()

    def watch():
        while not stop.is_set():
            if dest.exists() and any(name.endswith(".tar") for name in os.listdir(dest)):
                seen.append(time.perf_counter())
                return
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    start = time.perf_counter()
    watcher.start()
    try:
        shard_dataset(str(tree), str(dest), shard_size=10000, workers=2, **settings)
    finally:
        stop.set()
        watcher.join()
    times.append((seen[0] if seen else time.perf_counter()) - start)
    shutil.rmtree(dest, ignore_errors=True)


_MANIFEST_BLOCK = 1 << 20  # the first section's manifest units (16 MB in shards.partitions: ~350k of its lines)


def _tiny_manifest(tree: Path, n: int) -> Path:
    """A jsonl manifest of the tiny tree's files, class by class as the tree lists them: labels
    ["cNN"], every 10th record also the next class (multi-label, as JFT-300M)."""
    import json

    out = tree.parent / f"{tree.name}.jsonl"
    if not out.exists():
        with open(out, "w") as f:
            f.writelines(json.dumps({"path": f"{tree.name}/c{c:02d}/{i}.jpg",
                                     "labels": [f"c{c:02d}"] + ([f"c{(c + 1) % 100:02d}"] if i % 10 == 0 else [])})
                         + "\n" for c in range(100) for i in range(c, n, 100))
    return out


def first(work: Path, sizes: list[int], window: int, repeats: int, source: str = "tree") -> None:
    """Time to the first shard written, the global plan and --window side by side at each size (medians
    of `repeats`, the four runs interleaved), and the ratio between the sizes. `source` "manifest": a
    jsonl manifest of the same files, cut into units of _MANIFEST_BLOCK bytes."""
    import statistics

    from shards import partitions

    if source == "manifest":
        partitions._MANIFEST_BLOCK = _MANIFEST_BLOCK
    runs, firsts = {}, {}
    for n in sizes:
        tree = work / f"tiny{n}"
        _tiny_tree(tree, n)
        tree = _tiny_manifest(tree, n) if source == "manifest" else tree
        for plan, settings in (("global", {}), (f"window {window}", {"window": window})):
            firsts[plan, n] = []
            runs[plan, n] = (lambda tree=tree, n=n, plan=plan, settings=settings:
                             _first_shard(tree, work / f"first{n}", firsts[plan, n], **settings))
    totals = _median_times(runs, repeats)
    out = {key: statistics.median(values) for key, values in firsts.items()}
    for plan, n in runs:
        print(f"first: {source}, {plan:>13}, {n:>8} records: first shard after {out[plan, n]:.1f} s "
              f"(all {totals[plan, n]:.1f} s; runs {', '.join(f'{v:.1f}' for v in firsts[plan, n])}; {_load()})",
              flush=True)
    if source == "manifest":  # what --window does before the first window: every line listed (here in one process)
        from shards.windows import _count_job, _manifest_labels

        for n in sizes:
            start = time.perf_counter()
            split = partitions.split_source(str(_tiny_manifest(work / f"tiny{n}", n)), partitions=1 << 40)
            _manifest_labels(_count_job((split.kind, split.url, part.units[0])) for part in split.partitions)
            took = time.perf_counter() - start
            print(f"first: manifest, {n:>8} records: the label pass in one process {took:.2f} s, "
                  f"{took / n * 1e6:.1f} us per record ({_load()})", flush=True)
    lo, hi = min(sizes), max(sizes)
    for plan in dict.fromkeys(plan for plan, _ in runs):
        print(f"first: {source}, {plan:>13}: {hi // 1000}k vs {lo // 1000}k: {out[plan, hi] / out[plan, lo]:.2f}x the time "
              f"for {hi / lo:.0f}x the records ({_load()})", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sections", default="memory,gets,dask,local,first")
    ap.add_argument("--memory-sizes", default="50000,200000,1000000")
    ap.add_argument("--first-sizes", default="50000,200000")
    ap.add_argument("--window", type=int, default=20000, help="records per window in the first section (default 20000)")
    ap.add_argument("--first-source", choices=("tree", "manifest"), default="tree",
                    help="the first section's source: the class-folder tree, or a jsonl manifest of its files")
    ap.add_argument("--images", type=int, default=2000, help="photos for the gets and dask sections (default 2000)")
    ap.add_argument("--local-images", type=int, default=16000,
                    help="photos for the local section (default 16000: fewer, and the plan's fixed phases weigh)")
    ap.add_argument("--size", default="500x375", help="photo size WxH (default 500x375, ImageNet-like)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args(argv)
    sections = set(args.sections.split(","))
    work = Path(args.workdir or tempfile.mkdtemp(prefix="vitpipe-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    corpus = work / f"photos{args.images}"
    store = None
    try:
        if "memory" in sections:
            memory(work, [int(v) for v in args.memory_sizes.split(",")])
        if "attribute" in sections:
            attribute(work, max(int(v) for v in args.memory_sizes.split(",")))
        if sections & {"gets", "dask"}:
            _make_corpus(corpus, count=args.images, size=args.size, classes=20)
            store = _store(work)
        if "gets" in sections:
            gets(work, corpus)
        if "dask" in sections:
            dask(work, corpus, args.repeats)
        if "local" in sections:
            local_corpus = work / f"photos{args.local_images}"
            _make_corpus(local_corpus, count=args.local_images, size=args.size, classes=20)
            local(work, local_corpus, args.repeats)
        if "first" in sections:
            first(work, [int(v) for v in args.first_sizes.split(",")], args.window, args.repeats, args.first_source)
    finally:
        if store is not None:
            store.stop()
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
