"""The plan after the scan, partition by partition: the coordinator holds per-partition summaries
(counts, byte totals, the fingerprint's shares), per-block totals, the shard bounds, where each
shard's section lies in each route file, and the skipped records (the manifest lists them), never a
row per record.

Phases, each a job per partition (or per range of buckets) run in the workers' pool, or in this
process. Every file they leave in `<out>/_plan/` is an .npz of arrays (shards.partitions.pack_arrays:
no pickle, read with allow_pickle=False):

1. scan: list and scan the partition (shards.partitions.scan_partition) and write its state file
   `s-<tag>-<i>.npz`: its records and scan, its share of the fingerprint, and its (content key,
   row) and (sample key, row) pairs by hash bucket, a byte range per bucket;
2. buckets: a job per range of buckets reads that range of every partition's state file (one
   ranged GET each) and finds the records whose content key (or sample key) an earlier record in
   listing order has: the exact-duplicate and key-collision candidates (few), sent back to the
   coordinator; a small source is one job;
3. look: the partitions holding candidates give their paths (and, for keys read from the ends
   only, the sha256 of the whole records, which confirm them); the first copy in listing order
   stays, as plan._first_copies decides;
4. keep: each partition renames its colliding keys, drops bad, unknown-class, excluded and
   duplicate records, rewrites its state file with its keep mask, and sends back the skipped ones,
   its kept count, byte total and largest record; with --dedup-within near one job then walks the
   kept records of all partitions in listing order;
5. place: the kept record with global kept index j goes to position Shuffle(N, seed).forward(j).
   Unless no block of positions can pass max_shard_bytes (its records times the largest estimate),
   each partition adds its records' estimated bytes per block (shards.order); then each writes its
   route file `r-<tag>-<i>.npz`: one section per shard, its records in position order, and sends
   back where each section lies. A shard writer reads only its section of each (one ranged GET:
   ShardTask.spans; ShardTask.loaded).

The same arithmetic runs for one partition in this process, so the bytes are the same for any
number of partitions and workers.
"""
from __future__ import annotations

import hashlib
from collections import defaultdict
from contextlib import nullcontext

import numpy as np

from shards import storage
from shards.order import TAR_START, Shuffle, block_totals, records_per_block, shard_bounds
from shards.partitions import array_spans, pack_arrays, unpack_arrays, write_arrays

_ROW = np.dtype([("key", "V32"), ("row", "<i8"), ("ok", "u1")])  # a content key of a bucket
_KEY = np.dtype([("row", "<i8"), ("hash", "<u8"), ("size", "<u4")])  # a sample key of a bucket (its text apart)
_BUCKET_ROWS = 1 << 20  # records per bucket job (about 100 MB of keys): a smaller source is one job


# ----------------------------------------------------------------------------- the files in _plan/

def _plan_url(out_url: str, tag: str, what: str, i: int) -> str:
    from shards.partitions import PLAN_DIR

    return storage.join(out_url, PLAN_DIR, f"{what}-{tag}-{i:05d}.npz")


def _save_state(url: str, records, scan, **arrays) -> dict:
    """Write a partition's state file (its records, scan and `arrays`; streamed, not packed in memory
    first); returns array_spans of it."""
    return write_arrays(url, {**records.columns("t_"), **{f"c_{k}": v for k, v in scan.columns().items()}, **arrays})


def _load_state(url: str):
    """(records, scan, keep mask or None) of a partition's state file."""
    from shards.plan import ScanResults
    from shards.table import RecordTable

    arrays = unpack_arrays(storage.read_bytes(url))
    scan = ScanResults.from_columns({k[2:]: v for k, v in arrays.items() if k.startswith("c_")})
    return RecordTable.from_columns(arrays, "t_"), scan, arrays.get("keep")


def _cut(pieces: list[bytes]) -> tuple[np.ndarray, bytes]:
    """(byte offsets [len(pieces)+1], the pieces end to end)."""
    return np.cumsum([0] + [len(p) for p in pieces], dtype=np.int64), b"".join(pieces)


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
    fingerprint's bytes (a line per file) comes with it when small (`share`), else stays in its state
    file as its buckets do (`url`, at `spans`)."""

    def __init__(self, listing, reused: int, url: str, spans: dict):
        self.records = _Rows(len(listing.records), listing.records.label_names)
        self.skipped, self.fingerprint = listing.skipped, listing.fingerprint
        self.fp = None if listing.fp is None else b""
        self.share = listing.fp if listing.fp is not None and len(listing.fp) <= _FP_READ else None
        self.class_files, self.class_names = listing.class_files, listing.class_names
        self.reused, self.url = reused, url
        self.spans = {name: spans[name] for name in ("fp", "bucket_cuts", "bucket_body")}

    def shares(self):
        """The partition's share of the fingerprint's bytes, a piece at a time."""
        if self.share is not None:
            yield self.share
            return
        lo, hi = self.spans["fp"]
        for start in range(lo, hi, _FP_READ):
            yield storage.read_range(self.url, start, min(_FP_READ, hi - start))


_FP_READ = 1 << 20


def _buckets(records, scan, buckets: int) -> tuple[np.ndarray, bytes]:
    """A partition's keys by bucket: three pieces per bucket (content keys as _ROW, sample keys as
    _KEY, their texts end to end), as _cut gives them."""
    n = len(records)
    content = np.zeros(n, dtype=_ROW)
    content["key"] = scan.sha.view("V32").ravel()
    content["row"], content["ok"] = np.arange(n), scan.ok
    of_content = np.ascontiguousarray(scan.sha[:, :8]).view(np.uint64).ravel() % np.uint64(buckets)
    texts = [k.encode("utf-8", "surrogatepass") for k in records.keys_of(range(n))]
    keys = np.zeros(n, dtype=_KEY)
    keys["row"], keys["size"] = np.arange(n), [len(t) for t in texts]
    keys["hash"] = np.array([int.from_bytes(hashlib.blake2b(t, digest_size=8).digest(), "little") for t in texts],
                           dtype=np.uint64)
    of_key = keys["hash"] % np.uint64(buckets)
    by_content, by_key = np.argsort(of_content, kind="stable"), np.argsort(of_key, kind="stable")  # rows in order
    content, keys = content[by_content], keys[by_key]
    edges = np.arange(buckets + 1, dtype=np.uint64)
    at_content, at_key = np.searchsorted(of_content[by_content], edges), np.searchsorted(of_key[by_key], edges)
    pieces = []
    for lo, hi, klo, khi in zip(at_content[:-1].tolist(), at_content[1:].tolist(), at_key[:-1].tolist(),
                                at_key[1:].tolist()):
        pieces += [content[lo:hi].tobytes(), keys[klo:khi].tobytes(), b"".join(texts[i] for i in by_key[klo:khi].tolist())]
    return _cut(pieces)


def bucket_keys(state_url: str, buckets: int) -> tuple[np.ndarray, bytes]:
    """A state file's content keys and sample keys by hash bucket: (offsets, body) as _buckets cuts them."""
    records, scan, _ = _load_state(state_url)
    return _buckets(records, scan, buckets)


def read_bucket(url: str, cuts: np.ndarray, b: int) -> tuple[np.ndarray, np.ndarray]:
    """(content keys: key, row, ok; sample keys: row, hash, size) of bucket b of bucket_keys' body at `cuts`."""
    lo, mid, hi = cuts[3 * b:3 * b + 3].tolist()
    data = storage.read_range(url, lo, hi - lo)
    return np.frombuffer(data, dtype=_ROW, count=(mid - lo) // _ROW.itemsize), np.frombuffer(data, dtype=_KEY,
                                                                                             offset=mid - lo)


def bucket_texts(url: str, cuts: np.ndarray, b: int, keys: np.ndarray) -> list[bytes]:
    """The texts of read_bucket's sample keys `keys` of bucket b, in their order (one ranged read)."""
    hi, stop = cuts[3 * b + 2:3 * b + 4].tolist()
    body = storage.read_range(url, hi, stop - hi)
    ends = np.cumsum(keys["size"], dtype=np.int64).tolist()
    return [body[end - size:end] for end, size in zip(ends, keys["size"].tolist())]


def _scan_job(job) -> _Summary:
    from shards.partitions import scan_partition

    part, scan_args, out_url, tag, buckets = job
    listing, scan, reused = scan_partition(part, scan_args, out_url)
    cuts, body = _buckets(listing.records, scan, buckets)
    url = _plan_url(out_url, tag, "s", part.index)
    spans = _save_state(url, listing.records, scan, fp=np.frombuffer(listing.fp or b"", dtype=np.uint8),
                        bucket_cuts=cuts, bucket_body=np.frombuffer(body, dtype=np.uint8))  # cuts just before body
    return _Summary(listing, reused, url, spans)


def listing_digest(split):
    """The running fingerprint of a listing of units (sources._Fingerprint) before its first unit."""
    from shards.sources import _Fingerprint

    digest = _Fingerprint(split.kind)
    digest.update(split.head)
    return digest


def _scan_all(split, scan_args, out_url, tag, executor, progress, digest=None):
    """Phase 1: (the merged listing, the partitions' _Summary). `digest`: the running fingerprint of
    the units listed before these (shards.windows), updated with theirs; else one from the head."""
    from shards.partitions import merge

    summaries, digest = [], listing_digest(split) if digest is None else digest

    def scanned(results):
        for summary in results:
            summaries.append(summary)
            if summary.fp is not None:  # a listing of units: the fingerprint as merge would make it from their bytes
                for piece in summary.shares():
                    digest.update(piece)
                summary.share = None
            if progress is not None:
                progress(len(summary.records))
            yield summary
    jobs = ((part, scan_args, out_url, tag, len(split.partitions)) for part in split.partitions)
    listing = merge(split, scanned(map_jobs(executor, _scan_job, jobs)))
    if summaries[0].fp is not None:
        listing.fingerprint = digest.hexdigest()
    return listing, summaries


# ----------------------------------------------------------------------------- 2. buckets

def _read_buckets(url: str, spans: dict, lo: int, hi: int, buckets: int) -> tuple[np.ndarray, bytes]:
    """(byte offsets of the pieces of buckets lo..hi-1 in `body`, body) of a state file: one ranged
    GET when they are all the buckets (the cuts lie just before the body), else two."""
    (cuts_lo, cuts_hi), (body_lo, body_hi) = spans["bucket_cuts"], spans["bucket_body"]
    if lo == 0 and hi == buckets:
        data = storage.read_range(url, cuts_lo, body_hi - cuts_lo)
        return np.frombuffer(data[:cuts_hi - cuts_lo], dtype="<i8"), data[body_lo - cuts_lo:]
    cuts = np.frombuffer(storage.read_range(url, cuts_lo + 24 * lo, 8 * (3 * (hi - lo) + 1)), dtype="<i8")
    return cuts - cuts[0], storage.read_range(url, body_lo + int(cuts[0]), int(cuts[-1] - cuts[0]))


def _bucket_job(job):
    """(content candidates [(p, row, first p, first row)], key collisions [(p, row)]) of buckets lo..hi-1."""
    lo, hi, sources, buckets = job
    read = [_read_buckets(url, spans, lo, hi, buckets) for url, spans in sources]
    content, collisions = [], []
    for b in range(hi - lo):
        pieces = [[body[cuts[3 * b + j]:cuts[3 * b + j + 1]] for j in range(3)] for cuts, body in read]
        found, named = _bucket(pieces)
        content += found
        collisions += named
    return content, collisions


def _bucket(pieces):
    """_bucket_job's findings in one bucket, from each partition's three pieces of it."""
    from shards.plan import _first_copies

    rows = [np.frombuffer(content, dtype=_ROW) for content, _, _ in pieces]
    where = np.concatenate([np.full(len(part), p, dtype=np.int64) for p, part in enumerate(rows)])
    rows = np.concatenate(rows)
    first = _first_copies(np.frombuffer(rows["key"].tobytes(), dtype=np.uint8).reshape(len(rows), 32),
                          rows["ok"].astype(bool))
    dup = np.flatnonzero(first != np.arange(len(rows)))
    content = [(int(where[i]), int(rows["row"][i]), int(where[first[i]]), int(rows["row"][first[i]])) for i in dup]
    keys = [np.frombuffer(named, dtype=_KEY) for _, named, _ in pieces]
    owner = np.concatenate([np.full(len(part), p, dtype=np.int64) for p, part in enumerate(keys)])
    starts = np.concatenate([np.cumsum(part["size"], dtype=np.int64) - part["size"] for part in keys])
    keys = np.concatenate(keys)
    ordered = np.sort(keys["hash"])
    repeated = ordered[1:][ordered[1:] == ordered[:-1]]
    collisions, seen = [], set()
    for i in np.flatnonzero(np.isin(keys["hash"], repeated)).tolist():  # in listing order
        text = pieces[owner[i]][2]
        key = text[starts[i]:starts[i] + keys["size"][i]]
        if key in seen:
            collisions.append((int(owner[i]), int(keys["row"][i])))
        seen.add(key)
    return content, collisions


def _find_duplicates(summaries, records: int, decode: bool, run):
    """Phases 2-3: ({p: {row: path of its first copy}}, {p: {row: bad entry}}, {p: [rows whose key an
    earlier record has]})."""
    count = len(summaries)
    jobs = min(count, max(1, -(-records // _BUCKET_ROWS)))
    edges = [count * j // jobs for j in range(jobs + 1)]
    sources = [(summary.url, summary.spans) for summary in summaries]
    candidates, collisions = [], defaultdict(list)
    for content, named in run(_bucket_job, [(lo, hi, sources, count) for lo, hi in zip(edges, edges[1:])]):
        candidates += content
        for p, row in named:
            collisions[p].append(row)
    drops, bad = _duplicates(candidates, [summary.url for summary in summaries], decode, run)
    return drops, bad, collisions


# ----------------------------------------------------------------------------- 3. look

def look_job(job):
    """(state file url, rows, whole) -> {row: (path, sha256 of its bytes if whole | ("bad", kind, reason) | None)}."""
    from shards.plan import hash_records

    state_url, rows, whole = job
    records = _load_state(state_url)[0]
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
    looked = dict(zip(parts, run(look_job, [(states[p], sorted(wanted[p]), not decode) for p in parts])))
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
    est = _estimates(records, scan.nbytes, kept)
    return {"kept": len(kept), "est": int(est.sum()), "largest": int(est.max()) if len(est) else 0,
            "multi": kind in ("jsonl", "csv") and off is not None and bool((np.diff(off)[kept] != 1).any()),
            "exts": sorted(set(scan.ext[kept].tolist()))}


def _keep_job(job):
    """([(row, skipped entry)], kept summary) of a partition; its state file is written again with
    its keep mask (its buckets and fingerprint share, read by now, left out)."""
    state_url, renames, drops, bad, class_ids, exclude, kind = job
    records, scan, _ = _load_state(state_url)
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
    _save_state(state_url, records, scan, keep=keep)
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
        records, scan, keep = _load_state(url)
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
            _save_state(url, records, scan, keep=keep)
        out.append((skips, _kept_summary(records, scan, keep, kind)))
    return out


def _keep_all(split, cfg, listing, states, found, class_ids, exclude, run, empty=False):
    """Phase 4: (skipped entries, kept count per partition, their kept summaries summed). `empty`: no
    kept record is no error (a window whose records earlier windows have)."""
    from shards.plan import ShardError, StrictSkipError, _reason_kind

    drops, bad, collisions = found
    kept = run(_keep_job, [(states[p], sorted(collisions.get(p, ())), drops.get(p, {}), bad.get(p, {}), class_ids,
                            exclude, split.kind) for p in range(len(states))])
    if cfg.dedup_within == "near":
        near = run(_near_job, [(states, cfg.near_dup_threshold, split.kind)])[0]
        kept = [(skips + more, summary) for (skips, _), (more, summary) in zip(kept, near)]
    skipped = [dict(s, kind=_reason_kind(s["reason"])) for s in listing.skipped]
    for skips, _ in kept:
        skipped += [entry for _, entry in sorted(skips, key=lambda item: item[0])]
    if cfg.strict and skipped:
        raise StrictSkipError(skipped)
    counts = [summary["kept"] for _, summary in kept]
    if not sum(counts) and not empty:
        raise ShardError(f"{listing.url}: no usable images ({len(skipped)} skipped; first: "
                         f"{skipped[0]['path'] if skipped else '-'}: {skipped[0]['reason'] if skipped else '-'})")
    total = {"multi": any(summary["multi"] for _, summary in kept),
             "exts": sorted({e for _, summary in kept for e in summary["exts"]}),
             "est": sum(summary["est"] for _, summary in kept), "largest": max(summary["largest"] for _, summary in kept)}
    return skipped, counts, total


# ----------------------------------------------------------------------------- 5. place

def _placed(keep: np.ndarray, start: int, n: int, seed: int):
    """(kept rows, their positions) of a partition whose first kept record has global kept index `start`."""
    kept = np.flatnonzero(keep)
    return kept, Shuffle(n, seed).forward(start + np.arange(len(kept)))


def _totals_job(job):
    """The partition's estimated bytes per block of positions; with `over`, also (positions,
    estimates) of its records in those blocks."""
    from shards.plan import _estimates

    state_url, start, n, seed, per, over = job
    records, scan, keep = _load_state(state_url)
    kept, pos = _placed(keep, start, n, seed)
    est = _estimates(records, scan.nbytes, kept)
    if over is None:
        return block_totals(pos, est, per, n)
    inside = np.isin(pos // per, over)
    return pos[inside], est[inside]


def _shard_bounds(cfg, states, starts, n, total, run):
    """Phase 5, the cut: the shards' [lo, hi) positions. The partitions' totals per block are asked
    for only when a block could pass max_shard_bytes (its records times the largest estimate)."""
    per = records_per_block(n, total["est"], cfg.shard_size, cfg.max_shard_bytes)
    blocks = -(-n // per)
    if TAR_START + per * total["largest"] <= cfg.max_shard_bytes:  # no block is over: a shard per block
        return shard_bounds(n, per, np.zeros(blocks, dtype=np.int64), cfg.max_shard_bytes, None)
    place = [(states[p], starts[p], n, cfg.seed, per) for p in range(len(states))]
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
    return shard_bounds(n, per, totals, cfg.max_shard_bytes, est_of.__getitem__)


# A route section: these arrays end to end after a header of their sizes (data only, no pickle): a
# shard's records of one partition, in position order, with their own table of roots and labels.
_SECTION = (("pos", "<i8"), ("names", "u1"), ("root_idx", "<u4"), ("paths", "u1"), ("path_off", "<u8"),
            ("keys", "u1"), ("key_off", "<u8"), ("labels", "<u4"), ("label_off", "<u8"), ("offset", "<i8"),
            ("length", "<i8"), ("ext", "u1"), ("width", "<i4"), ("height", "<i4"), ("nbytes", "<i8"),
            ("sha", "u1"), ("class_ids", "<i4"), ("class_off", "<i8"))


def _pack_section(arrays: dict) -> bytes:
    sizes = np.array([arrays[name].size if name in arrays else 0 for name, _ in _SECTION], dtype="<i8")
    return sizes.tobytes() + b"".join(np.ascontiguousarray(arrays[name], dtype=dtype).tobytes()
                                      for name, dtype in _SECTION if name in arrays)


def _unpack_section(data: bytes) -> dict:
    sizes = np.frombuffer(data[:8 * len(_SECTION)], dtype="<i8").tolist()
    out, at = {}, 8 * len(_SECTION)
    for (name, dtype), size in zip(_SECTION, sizes):
        if size or name not in ("keys", "key_off"):  # no keys: each derived from its path
            out[name] = np.frombuffer(data, dtype=dtype, count=size, offset=at)
        at += size * np.dtype(dtype).itemsize
    out["sha"] = out["sha"].reshape(-1, 32)
    return out


def _section(records, scan, rows: np.ndarray, pos: np.ndarray, ids: np.ndarray, off: np.ndarray) -> bytes:
    """The route section of `rows` (their positions `pos`, class ids `ids` at offsets `off`)."""
    from shards.table import RecordTable

    table = records.take(rows)
    roots, root_idx = np.unique(np.frombuffer(table.root_idx, dtype=np.uint32), return_inverse=True)
    table.roots, table.root_idx = [table.roots[r] for r in roots.tolist()], root_idx.astype(np.uint32)
    labels, label_idx = np.unique(np.frombuffer(table.labels, dtype=np.uint32), return_inverse=True)
    table.label_names, table.labels = [table.label_names[i] for i in labels.tolist()], label_idx.astype(np.uint32)
    columns = {name: np.asarray(value) for name, value in RecordTable.columns(table).items()}
    return _pack_section({**columns, "pos": pos, "ext": scan.ext[rows], "width": scan.width[rows],
                          "height": scan.height[rows], "nbytes": scan.nbytes[rows], "sha": scan.sha[rows],
                          "class_ids": ids, "class_off": off})


def _route_job(job):
    """Write the partition's route file (one section per shard: its records in position order);
    returns (its class histogram, the [start, stop) of each section in the file: int64 [shards + 1])."""
    state_url, route_url, start, n, seed, los, class_ids, classes, multi_label = job
    records, scan, keep = _load_state(state_url)
    kept, pos = _placed(keep, start, n, seed)
    order = np.argsort(pos, kind="stable")
    kept, pos = kept[order], pos[order]
    shard = np.searchsorted(los, pos, side="right") - 1
    ids, offs = class_ids_of(records, kept, _label_map(records, class_ids), multi_label)
    cuts = np.searchsorted(shard, np.arange(len(los) + 1))
    sections = [b"" if lo == hi else _section(records, scan, kept[lo:hi], pos[lo:hi], ids[offs[lo]:offs[hi]],
                                               offs[lo:hi + 1] - offs[lo])
                for lo, hi in zip(cuts[:-1].tolist(), cuts[1:].tolist())]
    where, body = _cut(sections)
    data = pack_arrays({"sections": np.frombuffer(body, dtype=np.uint8)})
    storage.write_bytes(route_url, data, durable=False)
    return np.bincount(ids, minlength=len(classes)).astype(np.int64), where + array_spans(data)["sections"][0]


def _write_routes(cfg, states, routes, starts, n, bounds, class_ids, classes, multi_label, run):
    """Phase 5, the routes: (the class histogram, where each shard's section lies in each route
    file: int64 [partitions, shards + 1])."""
    los = np.array([lo for lo, _ in bounds], dtype=np.int64)
    done = run(_route_job, [(states[p], routes[p], starts[p], n, cfg.seed, los, class_ids, classes, multi_label)
                            for p in range(len(states))])
    return sum(histogram for histogram, _ in done), np.stack([where for _, where in done])


def load_route(task):
    """The records of a routed shard task, from its section of each partition's route file (a
    ranged GET each, those on S3 in flight together), in position order: (records, columns {ext,
    width, height, nbytes, sha}, class_ids, class_off)."""
    from shards.table import RecordTable

    wanted = [(url, int(lo), int(hi)) for url, (lo, hi) in zip(task.routes, task.spans) if hi > lo]
    pieces = [_unpack_section(data) for data in storage.map_reads(
        lambda where: storage.read_range(where[0], where[1], where[2] - where[1]), wanted,
        wanted[0][0] if wanted else "")]
    records = RecordTable()
    for piece in pieces:
        records.extend(RecordTable.from_columns(piece))
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

def map_jobs(pool, fn, jobs):
    """fn(job) for each job, in order, as they come (in `pool`, or in this process)."""
    if pool is None:
        return map(fn, jobs)
    from shards.workers import ordered_map

    return ordered_map(pool, fn, jobs, ahead=2 * pool._max_workers)


def plan_tag(split, cfg, scan_args: tuple) -> str:
    """What names a plan's files in `_plan/`: the source's partitions and the settings they depend on."""
    return hashlib.sha256(repr((split.kind, split.url, [p.units for p in split.partitions], scan_args, cfg.seed,
                                cfg.shard_size, cfg.max_shard_bytes)).encode()).hexdigest()[:16]


def plan_partitions(split, cfg, scan_args: tuple, out_url: str, classes_of, exclude, *, pool=None, workers=1,
                    progress=None, earlier=None, multi_label=None, digest=None):
    """The plan's parts (a Planned): the merged listing facts (its records: a count), classes, skipped
    records, the shards' [lo, hi) positions, the route files and where each shard's section lies in
    them. `classes_of(listing)`: the class list. For shards.windows (a window's plan):
    `earlier(states, run, drops, bad, collisions)` adds the duplicates and colliding keys of records
    planned before these (then a plan may keep no record); `multi_label`: the flag decided before
    (None: set if a kept record has other than one label); `digest`: the listing's running
    fingerprint (sources._Fingerprint) over the units before these, carried on (_scan_all)."""
    from shards.workers import process_pool

    tag, count = plan_tag(split, cfg, scan_args), len(split.partitions)
    states = [_plan_url(out_url, tag, "s", i) for i in range(count)]
    routes = [_plan_url(out_url, tag, "r", i) for i in range(count)]
    with nullcontext(pool) if pool is not None or workers <= 1 or count == 1 else process_pool(workers) as executor:
        run = lambda fn, jobs: list(map_jobs(executor, fn, jobs))  # noqa: E731
        listing, summaries = _scan_all(split, scan_args, out_url, tag, executor, progress, digest)
        found = _find_duplicates(summaries, len(listing.records), scan_args[1], run)
        if earlier is not None:
            earlier(states, run, *found)
        reused = sum(summary.reused for summary in summaries)
        del summaries
        classes = classes_of(listing)
        class_ids = {name: i for i, name in enumerate(classes)}
        skipped, counts, total = _keep_all(split, cfg, listing, states, found, class_ids, exclude, run,
                                           empty=earlier is not None)
        del found
        multi = total["multi"] if multi_label is None else multi_label
        n, starts = sum(counts), np.r_[0, np.cumsum(counts)][:-1].tolist()
        bounds = _shard_bounds(cfg, states, starts, n, total, run)
        histogram, spans = _write_routes(cfg, states, routes, starts, n, bounds, class_ids, classes, multi, run)
    return Planned(listing, classes, skipped, bounds, routes, spans, histogram.tolist(), multi, total["exts"], reused)


class Planned:
    def __init__(self, listing, classes, skipped, bounds, routes, spans, histogram, multi_label, exts, reused):
        self.listing, self.classes, self.skipped, self.bounds, self.routes = listing, classes, skipped, bounds, routes
        self.spans = spans  # int64 [partitions, shards + 1]: shard s's section of route p is spans[p, s:s + 2]
        self.histogram, self.multi_label, self.exts, self.reused = histogram, multi_label, exts, reused
