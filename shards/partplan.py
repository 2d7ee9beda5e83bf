"""The plan after the scan, partition by partition: the coordinator holds per-partition summaries
(counts, byte totals, the fingerprint's shares), per-block totals, the shard bounds and the
skipped records (the manifest lists them), never a row per record.

Phases, each a job per partition (or per bucket) run in the workers' pool, or in this process:

1. scan: list and scan the partition (shards.partitions.scan_partition), keep its rows in a state
   file `<out>/_plan/s-<tag>-<i>.pkl`, and write its (content key, row) and (sample key, row) pairs
   into hash buckets (one section per bucket of `b-<tag>-<i>.bin`);
2. buckets: a job per bucket reads that section of every partition and finds the records whose
   content key (or sample key) an earlier record in listing order has: the exact-duplicate and
   key-collision candidates (few), sent back to the coordinator;
3. look: the partitions holding candidates give their paths (and, for keys read from the ends
   only, the sha256 of the whole records, which confirm them); the first copy in listing order
   stays, as plan._first_copies decides;
4. keep: each partition renames its colliding keys, drops bad, unknown-class, excluded and
   duplicate records, and sends back the skipped ones and its kept count and byte total; with
   --dedup-within near one job then walks the kept records of all partitions in listing order;
5. place: the kept record with global kept index j goes to position Shuffle(N, seed).forward(j);
   each partition adds its records' estimated bytes per block of positions (shards.order) and
   then writes its route file `r-<tag>-<i>.bin`: one section per shard, its records in position
   order. A shard writer reads only its section of each route file (ShardTask.loaded).

The same arithmetic runs for one partition in this process, so the bytes are the same for any
number of partitions and workers.
"""
from __future__ import annotations

import hashlib
import pickle
from collections import defaultdict
from contextlib import nullcontext

import numpy as np

from shards import storage
from shards.order import TAR_START, Shuffle, block_totals, records_per_block, shard_bounds

_ROW = np.dtype([("key", "V32"), ("row", "<i8"), ("ok", "u1")])


# ----------------------------------------------------------------------------- files of sections

def _sections(parts: list[bytes]) -> bytes:
    """Byte strings with a header of offsets: section i is read alone with read_section."""
    head = 8 * (len(parts) + 2)
    off = np.cumsum([head] + [len(p) for p in parts], dtype=np.uint64)
    return np.r_[np.uint64(len(parts)), off].astype("<u8").tobytes() + b"".join(parts)


def read_section(url: str, i: int) -> bytes:
    lo, hi = np.frombuffer(storage.read_range(url, 8 * (i + 1), 16), dtype="<u8").tolist()
    return storage.read_range(url, lo, hi - lo) if hi > lo else b""


def _state_url(out_url: str, tag: str, what: str, i: int) -> str:
    from shards.partitions import PLAN_DIR

    return storage.join(out_url, PLAN_DIR, f"{what}-{tag}-{i:05d}.{'pkl' if what == 's' else 'bin'}")


def _load(url: str) -> dict:
    return pickle.loads(storage.read_bytes(url))


def _save(url: str, state: dict) -> None:
    storage.write_bytes(url, pickle.dumps(state, protocol=5), durable=False)


# ----------------------------------------------------------------------------- 1. scan

class _Rows:
    """What partitions.merge needs of a partition's records: their count and label names."""

    def __init__(self, n: int = 0, label_names=()):
        self.n, self.label_names = n, list(label_names)

    def __len__(self) -> int:
        return self.n

    def extend(self, other: "_Rows") -> None:
        self.n += other.n
        self.label_names = sorted(set(self.label_names) | set(other.label_names))

    def make_keys_unique(self) -> int:  # done across partitions by the key buckets
        return 0


class _Summary:
    """A partition's listing as partitions.merge sees it, without its rows. Its share of the
    fingerprint's bytes (a line per file) stays in a file (`fp_url`), hashed by _fingerprint."""

    def __init__(self, listing, reused: int, fp_url: str):
        self.records = _Rows(len(listing.records), listing.records.label_names)
        self.skipped, self.fingerprint = listing.skipped, listing.fingerprint
        self.fp, self.fp_url = (None, None) if listing.fp is None else (b"", fp_url)
        self.fp_size = 0 if listing.fp is None else len(listing.fp)
        self.class_files, self.class_names = listing.class_files, listing.class_names
        self.reused = reused


_FP_READ = 1 << 20


def _fingerprint(split, summaries: list[_Summary]) -> str:
    """The listing's fingerprint as partitions.merge makes it (its head, then each partition's
    share in order), the shares read back a piece at a time."""
    from shards.sources import _Fingerprint

    digest = _Fingerprint(split.kind)
    digest.update(split.head)
    for summary in summaries:
        for start in range(0, summary.fp_size, _FP_READ):
            digest.update(storage.read_range(summary.fp_url, start, min(_FP_READ, summary.fp_size - start)))
    return digest.hexdigest()


def _key_hash(keys: list[str]) -> np.ndarray:
    return np.array([int.from_bytes(hashlib.blake2b(k.encode("utf-8", "surrogatepass"), digest_size=8).digest(),
                                    "little") for k in keys], dtype=np.uint64)


def _scan_job(job) -> _Summary:
    from shards.partitions import scan_partition

    part, scan_args, out_url, tag, buckets = job
    listing, scan, reused = scan_partition(part, scan_args, out_url)
    records = listing.records
    n = len(records)
    rows = np.arange(n)
    content = np.zeros(n, dtype=_ROW)
    content["key"] = scan.sha.view("V32").ravel()
    content["row"], content["ok"] = rows, scan.ok
    bucket = np.ascontiguousarray(scan.sha[:, :8]).view(np.uint64).ravel() % np.uint64(buckets)
    keys = records.keys_of(range(n))
    hashes = _key_hash(keys)
    named = hashes % np.uint64(buckets)
    parts = [content[bucket == b].tobytes() for b in range(buckets)]
    for b in range(buckets):
        picked = np.flatnonzero(named == b)
        parts.append(pickle.dumps((picked, hashes[picked], [keys[i] for i in picked.tolist()]), protocol=5))
    storage.write_bytes(_state_url(out_url, tag, "b", part.index), _sections(parts), durable=False)
    _save(_state_url(out_url, tag, "s", part.index), {"records": records, "scan": scan})
    fp_url = _state_url(out_url, tag, "f", part.index)
    if listing.fp:
        storage.write_bytes(fp_url, listing.fp, durable=False)
    return _Summary(listing, reused, fp_url)


# ----------------------------------------------------------------------------- 2. buckets

def _bucket_job(job):
    """(content candidates [(p, row, first p, first row)], key collisions [(p, row)]) of one bucket."""
    from shards.plan import _first_copies

    b, urls, buckets = job
    rows, where = [], []
    for p, url in enumerate(urls):
        part = np.frombuffer(read_section(url, b), dtype=_ROW)
        rows.append(part)
        where.append(np.full(len(part), p, dtype=np.int64))
    rows, where = np.concatenate(rows), np.concatenate(where)
    keys = np.frombuffer(rows["key"].tobytes(), dtype=np.uint8).reshape(len(rows), 32)
    first = _first_copies(keys, rows["ok"].astype(bool))
    dup = np.flatnonzero(first != np.arange(len(rows)))
    content = [(int(where[i]), int(rows["row"][i]), int(where[first[i]]), int(rows["row"][first[i]])) for i in dup]
    collisions, seen = [], set()
    hashes, names = [], []
    for p, url in enumerate(urls):
        picked, part_hashes, part_keys = pickle.loads(read_section(url, buckets + b))
        hashes.append(part_hashes)
        names += [(p, int(r), k) for r, k in zip(picked.tolist(), part_keys)]
    hashes = np.concatenate(hashes)
    ordered = np.sort(hashes)
    repeated = ordered[1:][ordered[1:] == ordered[:-1]]
    for i in np.flatnonzero(np.isin(hashes, repeated)).tolist():  # in listing order
        p, row, key = names[i]
        if key in seen:
            collisions.append((p, row))
        seen.add(key)
    return content, collisions


# ----------------------------------------------------------------------------- 3. look

def _look_job(job):
    """{row: (path, sha256 of its bytes | a ("bad", kind, reason) | None)} of some rows of a partition."""
    from shards.plan import hash_records

    state_url, rows, whole = job
    records = _load(state_url)["records"]
    paths = records.paths_of(rows)
    digests = hash_records(records.locations(rows, paths)) if whole else [None] * len(rows)
    return dict(zip(rows, zip(paths, digests)))


def _duplicates(candidates, states: list[str], decode: bool, run):
    """({p: {row: path of its first copy}}, {p: {row: ("bad", kind, reason)}}) from the buckets'
    candidates: keys from the ends only are confirmed by the sha256 of the whole records."""
    from shards.plan import _first_copies

    wanted = defaultdict(set)
    for p, row, fp, frow in candidates:
        wanted[p].add(row)
        wanted[fp].add(frow)
    parts = sorted(wanted)
    looked = dict(zip(parts, run(_look_job, [(states[p], sorted(wanted[p]), not decode) for p in parts])))
    first = {(p, row): (fp, frow) for p, row, fp, frow in candidates}
    bad = defaultdict(dict)
    if not decode and first:
        rows = sorted({r for pair in first.items() for r in pair})  # listing order
        digests, ok = np.zeros((len(rows), 32), dtype=np.uint8), np.ones(len(rows), dtype=bool)
        for j, (p, row) in enumerate(rows):
            result = looked[p][row][1]
            if isinstance(result, tuple):
                bad[p][row], ok[j] = result, False
            else:
                digests[j] = np.frombuffer(result, dtype=np.uint8)
        firsts = _first_copies(digests, ok)
        first = {rows[j]: rows[f] for j, f in enumerate(firsts.tolist()) if f != j}
    drops = defaultdict(dict)
    for (p, row), (fp, frow) in first.items():
        drops[p][row] = looked[fp][frow][0]
    return drops, bad


# ----------------------------------------------------------------------------- 4. keep

def class_ids_of(records, rows: np.ndarray, label_map: np.ndarray, multi_label: bool):
    """(class ids int32, offsets int64 [len(rows)+1]) of rows: sorted, distinct ids per row when
    `multi_label`, else one per row."""
    label_off = records.label_offsets()
    labels = np.frombuffer(records.labels, dtype=np.uint32)
    if label_off is None:
        starts, counts = rows.astype(np.int64), np.ones(len(rows), dtype=np.int64)
    else:
        starts = label_off[rows].astype(np.int64)
        counts = label_off[rows + 1].astype(np.int64) - starts
    offs = np.r_[0, np.cumsum(counts)].astype(np.int64)
    flat = labels[np.repeat(starts - offs[:-1], counts) + np.arange(offs[-1])]
    ids = label_map[flat].astype(np.int32) if len(flat) else np.zeros(0, np.int32)
    if multi_label:
        per = [np.unique(ids[offs[j]:offs[j + 1]]) for j in range(len(rows))]
        offs = np.r_[0, np.cumsum([len(p) for p in per])].astype(np.int64)
        ids = np.concatenate(per).astype(np.int32) if per else np.zeros(0, np.int32)
    return ids, offs


def _label_map(records, class_ids: dict) -> np.ndarray:
    return np.array([class_ids.get(name, -1) for name in records.label_names] or [0], dtype=np.int64)


def _kept_summary(records, scan, keep: np.ndarray, kind: str) -> dict:
    from shards.plan import _estimates

    kept = np.flatnonzero(keep)
    off = records.label_offsets()
    return {"kept": len(kept), "est": int(_estimates(records, scan.nbytes, kept).sum()),
            "multi": kind in ("jsonl", "csv") and off is not None and bool((np.diff(off)[kept] != 1).any()),
            "exts": sorted(set(scan.ext[kept].tolist()))}


def _keep_job(job):
    """([(row, skipped entry)], kept summary) of a partition; its keep mask joins its state file."""
    state_url, renames, drops, bad, class_ids, exclude, kind = job
    state = _load(state_url)
    records, scan = state["records"], state["scan"]
    if renames:
        records.rename_keys(renames)
    for row, result in bad.items():  # unreadable when hashed whole: a bad record now
        scan.put(row, result)
        scan.ok[row] = False
    label_map = _label_map(records, class_ids)
    keep = scan.ok.copy()
    if exclude is not None:
        check = range(len(keep))
    else:
        flags = ~scan.ok
        flags[list(drops)] = True
        unknown = np.flatnonzero(label_map[np.frombuffer(records.labels, dtype=np.uint32)] < 0)
        if len(unknown):
            off = records.label_offsets()
            flags[unknown if off is None else np.searchsorted(off, unknown, side="right") - 1] = True
        check = np.flatnonzero(flags).tolist()
    skips = []
    for i in check:
        def skip(kind, reason):
            skips.append((i, {"key": records.key(i), "path": records.path(i), "reason": reason, "kind": kind}))
            keep[i] = False
        if not scan.ok[i]:
            skip(*scan.bad[i])
            continue
        lo, hi = records.label_span(i)
        ids = label_map[records.labels[lo:hi]]
        if (ids < 0).any():
            missing = records.label_list(i)[int(np.flatnonzero(ids < 0)[0])]
            skip("unknown_class", f"class {missing!r} is not in the class index (--classes)")
            continue
        if exclude is not None:
            reason = exclude.match(scan.sha[i].tobytes().hex(), int(scan.dhash[i]),
                                   lambda: storage.read_record(*records.locations([i])[0]))
            if reason:
                skip("excluded_exact" if reason.startswith("exact") else "excluded_near", reason)
                continue
        if i in drops:
            skip("duplicate_exact", f"exact duplicate of {drops[i]}")
    _save(state_url, {"records": records, "scan": scan, "keep": keep})
    return skips, _kept_summary(records, scan, keep, kind)


def _near_job(job):
    """With --dedup-within near: the kept records of every partition, in listing order, against
    those kept before them (shards.dedup.HashIndex, confirmed by their thumbnails). Returns per
    partition ([(row, skipped entry)], kept summary)."""
    from shards.dedup import HashIndex, confirm_with
    from shards.imaging import thumbnail

    states, threshold, kind = job
    near, out = HashIndex(threshold), []
    for url in states:
        state = _load(url)
        records, scan, keep = state["records"], state["scan"], state["keep"]
        skips = []
        for i in np.flatnonzero(keep).tolist():
            location = records.locations([i])[0]
            hit = near.find(int(scan.dhash[i]), confirm_with(lambda: storage.read_record(*location),
                                                             lambda where: thumbnail(storage.read_record(*where))))
            if hit is not None:
                skips.append((i, {"key": records.key(i), "path": records.path(i),
                                  "reason": f"near duplicate of {hit[0]} (dHash distance {hit[1]})",
                                  "kind": "duplicate_near"}))
                keep[i] = False
                continue
            near.add(int(scan.dhash[i]), records.path(i), payload=location)
        if skips:
            _save(url, state)
        out.append((skips, _kept_summary(records, scan, keep, kind)))
    return out


# ----------------------------------------------------------------------------- 5. place

def _placed(state: dict, start: int, n: int, seed: int):
    """(kept rows, their positions) of a partition whose first kept record has global kept index `start`."""
    kept = np.flatnonzero(state["keep"])
    return kept, Shuffle(n, seed).forward(start + np.arange(len(kept)))


def _totals_job(job):
    """The partition's estimated bytes per block of positions; with `over`, also (positions,
    estimates) of its records in those blocks."""
    from shards.plan import _estimates

    state_url, start, n, seed, per, over = job
    state = _load(state_url)
    kept, pos = _placed(state, start, n, seed)
    est = _estimates(state["records"], state["scan"].nbytes, kept)
    if over is None:
        return block_totals(pos, est, per, n)
    inside = np.isin(pos // per, over)
    return pos[inside], est[inside]


def _route_job(job):
    """Write the partition's route file (one section per shard: its records in position order);
    returns its class histogram."""
    state_url, route_url, start, n, seed, los, class_ids, classes, multi_label = job
    state = _load(state_url)
    records, scan = state["records"], state["scan"]
    kept, pos = _placed(state, start, n, seed)
    order = np.argsort(pos, kind="stable")
    kept, pos = kept[order], pos[order]
    shard = np.searchsorted(los, pos, side="right") - 1
    ids, offs = class_ids_of(records, kept, _label_map(records, class_ids), multi_label)
    cuts = np.searchsorted(shard, np.arange(len(los) + 1))
    parts = []
    for s in range(len(los)):
        lo, hi = int(cuts[s]), int(cuts[s + 1])
        if lo == hi:
            parts.append(b"")
            continue
        rows = kept[lo:hi]
        parts.append(pickle.dumps({
            "pos": pos[lo:hi], "records": records.take(rows), "ext": scan.ext[rows], "width": scan.width[rows],
            "height": scan.height[rows], "nbytes": scan.nbytes[rows], "sha": scan.sha[rows],
            "class_ids": ids[offs[lo]:offs[hi]], "class_off": offs[lo:hi + 1] - offs[lo]}, protocol=5))
    storage.write_bytes(route_url, _sections(parts), durable=False)
    return np.bincount(ids, minlength=len(classes)).astype(np.int64)


def load_route(task):
    """The records of a routed shard task, from its section of each partition's route file, in
    position order: (records, columns {ext, width, height, nbytes, sha}, class_ids, class_off)."""
    from shards.table import RecordTable

    pieces = [pickle.loads(data) for data in (read_section(url, task.index) for url in task.routes) if data]
    records = RecordTable()
    for piece in pieces:
        records.extend(piece["records"])
    order = np.argsort(np.concatenate([p["pos"] for p in pieces]), kind="stable")
    columns = {name: np.concatenate([p[name] for p in pieces])[order] for name in ("ext", "width", "height",
                                                                                    "nbytes", "sha")}
    counts = np.concatenate([np.diff(p["class_off"]) for p in pieces])
    starts = np.concatenate([p["class_off"][:-1] + base for p, base in
                             zip(pieces, np.cumsum([0] + [len(p["class_ids"]) for p in pieces[:-1]]))])
    flat = np.concatenate([p["class_ids"] for p in pieces])
    counts, starts = counts[order], starts[order]
    off = np.r_[0, np.cumsum(counts)].astype(np.int64)
    ids = flat[np.repeat(starts - off[:-1], counts) + np.arange(off[-1])].astype(np.int32)
    return records.take(order), columns, ids, off


# ----------------------------------------------------------------------------- the plan

def _results(pool, fn, jobs):
    """fn(job) for each job, in order, as they come (in `pool`, or in this process)."""
    if pool is None:
        return map(fn, jobs)
    from shards.workers import ordered_map

    return ordered_map(pool, fn, jobs, ahead=2 * pool._max_workers)


def plan_partitions(split, cfg, scan_args: tuple, out_url: str, classes_of, exclude, *, pool=None, workers=1,
                    progress=None, earlier=None, multi_label=None):
    """The plan's parts (a Planned): the merged listing facts (its records: a count), classes, skipped
    records, the shards' [lo, hi) positions and the route files. `classes_of(listing)`: the class list.
    `earlier(states, run, drops, bad, collisions)`: adds the duplicates and colliding keys of records
    planned before these (shards.windows: earlier windows); then a plan may keep no record. `multi_label`:
    the flag decided before (shards.windows); None: set if a kept record has other than one label."""
    from shards.partitions import merge
    from shards.plan import ShardError, _reason_kind
    from shards.workers import process_pool

    decode = scan_args[1]
    tag = hashlib.sha256(repr((split.kind, split.url, [p.units for p in split.partitions], scan_args, cfg.seed,
                               cfg.shard_size, cfg.max_shard_bytes)).encode()).hexdigest()[:16]
    count = len(split.partitions)
    states = [_state_url(out_url, tag, "s", i) for i in range(count)]
    with nullcontext(pool) if pool is not None or workers <= 1 or count == 1 else process_pool(workers) as executor:
        run = lambda fn, jobs: list(_results(executor, fn, jobs))  # noqa: E731
        summaries = []

        def scanned(results):
            for summary in results:
                summaries.append(summary)
                if progress is not None:
                    progress(len(summary.records))
                yield summary
        jobs = ((part, scan_args, out_url, tag, count) for part in split.partitions)
        listing = merge(split, scanned(_results(executor, _scan_job, jobs)))
        if summaries[0].fp is not None:  # a listing of units: hash their shares (merge saw none of their bytes)
            listing.fingerprint = _fingerprint(split, summaries)
        reused = sum(summary.reused for summary in summaries)
        # 2-3: exact duplicates and colliding keys, by buckets
        buckets = [_state_url(out_url, tag, "b", i) for i in range(count)]
        candidates, collisions = [], defaultdict(list)
        for content, named in run(_bucket_job, [(b, buckets, count) for b in range(count)]):
            candidates += content
            for p, row in named:
                collisions[p].append(row)
        drops, bad = _duplicates(candidates, states, decode, run)
        del candidates
        if earlier is not None:
            earlier(states, run, drops, bad, collisions)
        # 4: what each partition keeps
        classes = classes_of(listing)
        class_ids = {name: i for i, name in enumerate(classes)}
        kept = run(_keep_job, [(states[p], sorted(collisions.get(p, ())), drops.get(p, {}), bad.get(p, {}), class_ids,
                                exclude, split.kind) for p in range(count)])
        if cfg.dedup_within == "near":
            near = run(_near_job, [(states, cfg.near_dup_threshold, split.kind)])[0]
            kept = [(skips + more, summary) for (skips, _), (more, summary) in zip(kept, near)]
        skipped = [dict(s, kind=_reason_kind(s["reason"])) for s in listing.skipped]
        for skips, _ in kept:
            skipped += [entry for _, entry in sorted(skips, key=lambda item: item[0])]
        if cfg.strict and skipped:
            first = skipped[0]
            raise ShardError(f"--strict: {len(skipped)} record(s) would be skipped; first: "
                             f"{first.get('path') or first.get('key')}: {first['reason']}")
        counts = [summary["kept"] for _, summary in kept]
        n = sum(counts)
        if not n and earlier is None:
            raise ShardError(f"{listing.url}: no usable images ({len(skipped)} skipped; first: "
                             f"{skipped[0]['path'] if skipped else '-'}: {skipped[0]['reason'] if skipped else '-'})")
        if multi_label is None:
            multi_label = any(summary["multi"] for _, summary in kept)
        exts = sorted({e for _, summary in kept for e in summary["exts"]})
        total_est = sum(summary["est"] for _, summary in kept)
        starts = np.r_[0, np.cumsum(counts)][:-1].tolist()
        del kept
        # 5: positions, blocks of positions, shards, route files
        per = records_per_block(n, total_est, cfg.shard_size, cfg.max_shard_bytes)
        place = [(states[p], starts[p], n, cfg.seed, per) for p in range(count)]
        totals = sum(run(_totals_job, [job + (None,) for job in place]))
        over = np.flatnonzero(TAR_START + totals > cfg.max_shard_bytes)
        est_of = {}
        if len(over):  # blocks over the limit (few): their records' estimates in position order
            found = run(_totals_job, [job + (over,) for job in place])
            pos = np.concatenate([f[0] for f in found])
            est = np.concatenate([f[1] for f in found])
            est = est[np.argsort(pos)]
            pos = np.sort(pos)
            for b in over.tolist():
                est_of[b] = est[np.searchsorted(pos, b * per):np.searchsorted(pos, (b + 1) * per)]
        bounds = shard_bounds(n, per, totals, cfg.max_shard_bytes, est_of.__getitem__)
        los = np.array([lo for lo, _ in bounds], dtype=np.int64)
        routes = [_state_url(out_url, tag, "r", p) for p in range(count)]
        histogram = sum(run(_route_job, [(states[p], routes[p], starts[p], n, cfg.seed, los, class_ids, classes,
                                          multi_label) for p in range(count)]))
    planned = Planned(listing, classes, skipped, bounds, routes, histogram.tolist(), multi_label, exts, reused)
    planned.summaries = summaries  # shards.windows: the partitions' shares of the fingerprint
    return planned


class Planned:
    def __init__(self, listing, classes, skipped, bounds, routes, histogram, multi_label, exts, reused):
        self.listing, self.classes, self.skipped, self.bounds, self.routes = listing, classes, skipped, bounds, routes
        self.histogram, self.multi_label, self.exts, self.reused = histogram, multi_label, exts, reused
