"""The windowed plan (`vitpipe shard --window RECORDS`): shards written while the rest of the source
is still being scanned.

A window is a run of consecutive units of the source in listing order (class folders or S3 key
prefixes, per-synset tars, a jsonl manifest's 16 MB blocks of whole lines; a csv manifest is one
unit: shards.partitions.split_source), closed at a unit boundary once it holds at least `window`
listed records. The windows follow from the units' record counts alone, so they are the same for
any number of workers and partitions. Each unit is listed once (by names, in the workers): the
coordinator holds the listings of the window being filled and hands them to that window's scan
jobs. The class list is known before the first window: --classes,
a tree's class folders, a tars folder's synsets; a manifest's units are all listed first (by names,
in the workers; the coordinator keeps each unit's count and the set of class names, and the scan
lists each unit again: a manifest's listing is not held whole), which gives
its class list (as without a window) and its multi-label flag: set if a listed record has other
than one label (without a window: a kept one; they differ only if every such record is skipped).
Each window is planned as the global plan plans a source (shards.partplan.plan_partitions over
the window's units, cut into pieces): the same scan, de-duplication, Shuffle over the window's
kept records and split into shards. Its shards are numbered after the previous window's and
written (in the workers' pool) while the next windows are listed, scanned and planned; the
manifest and its fingerprint (the whole listing's, as without a window) come at the end.

De-duplication keeps the first copy in listing order, across windows too: a record is dropped if
a record of an earlier window (or an earlier one of its own) has its content, and its sample key
is renamed if a record of an earlier window has that key. A window needs only the windows before
it. Each piece of a window writes its records' content keys and sample keys into _BUCKETS hash
buckets (`<out>/_plan/k-<hash of the piece's state file>.npz`, arrays only as every file in
_plan/: shards.partplan.bucket_keys' three pieces per bucket); a job per bucket reads that bucket of
every earlier piece's file, one file at a time, and keeps only the keys its window has: the
coordinator holds where each bucket lies in each piece's file, no row per record. Cost: a window
reads the keys of every record before it (a 32-byte content key, its 8-byte row and a flag, a
64-bit hash of the sample key, its row and size), so N records in windows of W read about
N^2 / (2 W) keys in all, one ranged GET per bucket of each earlier piece (and a second for the
key strings, only where a hash is the same).

A shard holds the records of one window: with class folders, a range of classes (see README).
"""
from __future__ import annotations

import hashlib
from collections import defaultdict

import numpy as np

from shards import storage

_BUCKETS = 16
_MANIFESTS = ("jsonl", "csv")


def windows_of(listed, window: int):
    """(first unit, stop, [what listed gave of each of its units]) of each window from the units'
    listings or record counts (an iterable, in listing order): a window closes after the unit that
    brings it to >= `window` records; the rest is the last one. Only one window's items are held."""
    start, held, items = 0, 0, []
    for item in listed:
        items.append(item)
        held += item if isinstance(item, int) else len(item.records)
        if held >= window:
            yield start, start + len(items), items
            start, held, items = start + len(items), 0, []
    if items:
        yield start, start + len(items), items


def _list_job(job):
    """A unit's listing (list_unit by names alone: no image is read), carried to its scan (so each unit
    is listed once); of a manifest's unit (every unit is listed before the first window, and a whole
    manifest's listing is not held) its record count, class names and whether a record has other
    than one label."""
    from shards.partitions import list_unit

    kind, url, unit = job
    listing = list_unit(kind, url, unit, stats=False)
    if kind not in _MANIFESTS:
        return listing
    records = listing.records
    off = records.label_offsets()
    return len(records), records.label_names, off is not None and bool((np.diff(off) != 1).any())


def _manifest_labels(infos) -> tuple[list, list[str], bool]:
    """(counts, sorted class names, multi-label flag: a record has other than one label) of a
    manifest from every unit's _list_job."""
    counts, names, multi = [], set(), False
    for count, labels, several in infos:
        counts.append(count)
        names.update(labels)
        multi |= several
    return counts, sorted(names), multi


# ----------------------------------------------------------------------------- keys of earlier windows

def _keys_job(job) -> np.ndarray:
    """Write a piece's content keys and sample keys by bucket (shards.partplan.bucket_keys); returns
    where each bucket's three pieces lie in the file (byte offsets, int64 [3 * _BUCKETS + 1])."""
    from shards.partitions import write_arrays
    from shards.partplan import bucket_keys

    state_url, keys_url = job
    cuts, body = bucket_keys(state_url, _BUCKETS)
    spans = write_arrays(keys_url, {"bucket_body": np.frombuffer(body, dtype=np.uint8)})
    return cuts + spans["bucket_body"][0]


def _prefix(keys: np.ndarray) -> np.ndarray:
    """The first 8 bytes of 32-byte keys (read_bucket's content keys' "key" column) as uint64."""
    return np.frombuffer(keys.tobytes(), dtype=np.uint64)[::4].copy() if len(keys) else np.zeros(0, np.uint64)


def _read_bucket(url: str, cuts: np.ndarray, b: int):
    """(readable content keys, sample keys) of bucket b of a keys file (shards.partplan.read_bucket)."""
    from shards.partplan import read_bucket

    content, keys = read_bucket(url, cuts, b)
    return content[content["ok"] != 0], keys


def _earlier_job(job):
    """One bucket: ([(piece, row, [(earlier piece id, row), ...] in listing order)] of this window's
    records whose content key an earlier window's record has, [(piece, row)] whose sample key it has).
    The earlier pieces' buckets are read one at a time, and only their keys this window has are kept."""
    b, earlier, pieces = job  # earlier: [(piece id, keys url, cuts)] in listing order; pieces: this window's
    from shards.partplan import bucket_texts

    read = [(_read_bucket(url, cuts, b), url, cuts) for url, cuts in pieces]
    mine = [content for (content, _), _, _ in read]
    names = [(keys["row"], bucket_texts(url, cuts, b, keys)) for (_, keys), url, cuts in read]
    wanted = _prefix(np.concatenate([part["key"] for part in mine])) if mine else np.zeros(0, np.uint64)
    hashes = np.concatenate([keys["hash"] for (_, keys), _, _ in read] or [np.zeros(0, np.uint64)])
    refs, seen = defaultdict(list), set()
    for piece, url, cuts in earlier:
        part, keys = _read_bucket(url, cuts, b)
        part = part[np.isin(_prefix(part["key"]), wanted)]
        for key, row in zip(part["key"].tolist(), part["row"].tolist()):
            refs[key].append((piece, row))
        hit = np.flatnonzero(np.isin(keys["hash"], hashes))
        if len(hit):  # the key strings, read only where a hash is the same
            texts = bucket_texts(url, cuts, b, keys)
            seen.update(texts[i] for i in hit.tolist())
    content = [(p, row, refs[key]) for p, part in enumerate(mine)
               for key, row in zip(part["key"].tolist(), part["row"].tolist()) if key in refs]
    collisions = [(p, int(row)) for p, (picked, keys) in enumerate(names)
                  for row, key in zip(picked.tolist(), keys) if key in seen]
    return content, collisions


class Earlier:
    """plan_partitions' `earlier` hook: the records of the windows planned so far (their pieces'
    state and key files), and what a window's records have in common with them."""

    def __init__(self, out_url: str, decode: bool):
        self.out_url, self.decode = out_url, decode
        self.states: list[str] = []  # every earlier piece's state file, by piece id
        self.keys: list[tuple] = []  # and its keys file: (url, where its buckets lie: _keys_job)

    def __call__(self, states, run, drops, bad, collisions) -> None:
        from shards.partitions import PLAN_DIR

        first = len(self.states)
        urls = [storage.join(self.out_url, PLAN_DIR, f"k-{hashlib.sha256(url.encode()).hexdigest()[:16]}.npz")
                for url in states]
        keys = list(zip(urls, run(_keys_job, list(zip(states, urls)))))
        earlier = [(piece, url, cuts) for piece, (url, cuts) in enumerate(self.keys)]
        matches = []
        for content, named in run(_earlier_job, [(b, earlier, keys) for b in range(_BUCKETS)]):
            matches += content
            for p, row in named:
                collisions[p].append(row)
        self.states += states
        self.keys += keys
        firsts, paths, unreadable = self._firsts(matches, first, run)
        for (p, row), (piece, first_row) in firsts.items():
            drops[p][row] = paths[piece, first_row]
        for (p, row), result in unreadable.items():
            bad[p][row] = result

    def _firsts(self, matches, first: int, run):
        """({(p, row): (earlier piece, row) of its first copy}, {(piece, row): path}, {(p, row): bad
        result}): the first copy is the first earlier record with the same key (the same bytes: keys read
        from the ends only are confirmed by hashing the records whole)."""
        from shards.partplan import look_job

        if not matches:
            return {}, {}, {}
        wanted = defaultdict(set)
        for p, row, refs in matches:
            wanted[first + p].add(row)
            for piece, earlier_row in (refs if not self.decode else refs[:1]):
                wanted[piece].add(earlier_row)
        pieces = sorted(wanted)
        looked = {}
        for piece, found in zip(pieces, run(look_job, [(self.states[piece], sorted(wanted[piece]), not self.decode)
                                                       for piece in pieces])):
            looked.update(((piece, row), result) for row, result in found.items())
        out, unreadable = {}, {}
        for p, row, refs in matches:
            if self.decode:
                out[p, row] = tuple(refs[0])
                continue
            digest = looked[first + p, row][1]
            if isinstance(digest, tuple):  # unreadable when hashed whole: a bad record now
                unreadable[p, row] = digest
                continue
            same = [ref for ref in refs if looked[tuple(ref)][1] == digest]
            if same:
                out[p, row] = tuple(same[0])
        return out, {where: found[0] for where, found in looked.items()}, unreadable


# ----------------------------------------------------------------------------- planning and writing

def _classes(split, cfg) -> list[str]:
    """The class list, known before any window is planned: --classes, a folder tree's class folders
    (its top-level listing), a tars folder's synsets (a manifest's: _manifest_labels)."""
    from shards.plan import load_class_index

    if cfg.classes:
        return load_class_index(cfg.classes)
    if split.kind == "i21k-tars":
        return list(split.class_names)
    if split.class_files:  # a local tree: every folder at the top, as the listing counts them
        return sorted(split.class_files)
    return sorted(p.units[0] for p in split.partitions if p.units[0] and not p.units[0].startswith("."))


def _window_split(split, units: list, first: int, pieces: int, listings=None):
    """The source split of the units [first, first + len(units)), cut into `pieces` partitions (with
    the units' `listings`, if given)."""
    from shards.partitions import Partition, SourceSplit

    per = -(-len(units) // max(1, min(pieces, len(units))))
    class_files = {u: 0 for u in units if u in split.class_files}
    if first == 0:  # folders at the top that are not units (links): counted empty, as the whole listing does
        every = {part.units[0] for part in split.partitions}
        class_files.update({name: 0 for name in split.class_files if name not in every})
    return SourceSplit(split.kind, split.url,
                       [Partition(i, split.kind, split.url, tuple(units[lo:lo + per]), first + lo,
                                  listings=tuple(listings[lo:lo + per]) if listings else ())
                        for i, lo in enumerate(range(0, len(units), per))],
                       head=split.head, class_files=class_files, class_names=split.class_names)


def _strict_message(err, url: str, start: int, stop: int, units: int, written: int) -> str:
    """The one line of a --strict failure in the window of units [start, stop): the record, why, what
    is left, what to do."""
    line = (f"--strict: {url}: {err.name}: {err.skipped[0]['reason']} ({len(err.skipped)} record(s) of the window "
            f"of units {start}..{stop - 1} of {units} would be skipped)")
    fix = f"fix or remove {err.name}, or re-run without --strict to skip it"
    if not written:
        return f"{line}: {fix}"
    return (f"{line}; the {written} shard(s) of the windows before it are written, complete and kept (no manifest "
            f"yet): {fix}; a re-run keeps the finished shards")


def shard_windows(source, out_url, *, window: int, pool=None, workers: int = 1, partitions: int | None = None,
                  progress: bool = False, on_shard_done=None, map_shards=None, **settings) -> dict:
    """shards.shard_dataset with `window`: plan a window, hand its shards to the writers, plan the
    next (see the module's docstring); returns the manifest. `partitions`: the pieces each window is
    cut into (default: 2 per worker; a window's plan phases are fixed costs per piece, and the next
    window's jobs queue behind its own, so fewer pieces than the global plan's 4 per worker)."""
    import json
    from collections import Counter
    from dataclasses import asdict

    from shards.manifest import finish_dataset
    from shards.partitions import attach_records, split_source
    from shards.partplan import listing_digest, map_jobs, plan_partitions
    from shards.plan import (ShardError, ShardPlan, ShardSettings, ShardSettingsError, StrictSkipError, scan_setup,
                             settings_fingerprint, shard_tasks)
    from shards.sources import SourceError
    from shards.writer import write_shard

    cfg = ShardSettings(**settings)
    if window < 1:
        raise ShardSettingsError(f"window={window}: must be >= 1 record")
    if cfg.dedup_within == "near":
        raise ShardSettingsError("window: --dedup-within near walks every record before each one; use it without "
                                 "--window")
    out_url = storage.normalize(out_url)
    cores = pool._max_workers if pool is not None else workers
    try:
        split = split_source(source, format=cfg.format, partitions=1 << 40)  # a partition per unit
        classes = None if split.kind in _MANIFESTS and not cfg.classes else _classes(split, cfg)
    except SourceError as err:
        raise ShardError(str(err)) from None
    scan_args, exclude = scan_setup(cfg)
    storage.remove_stale_staging(out_url)  # left by writers of this dataset that were killed
    units = [part.units[0] for part in split.partitions]
    earlier = Earlier(out_url, scan_args[1])
    digest = listing_digest(split)  # the whole listing's fingerprint: its head, then each window's units
    tasks, entries, pending, skipped = [], [], {}, []
    multi_label, exts, listed, reused, fingerprint = False, set(), 0, 0, ""  # folders and tars: one label each

    def done(task, entry):
        entries.append(entry)
        if on_shard_done is not None:
            on_shard_done(entry)

    def collect(block: bool):
        from concurrent.futures import FIRST_COMPLETED, wait

        while pending:
            finished, _ = wait(pending, timeout=None if block else 0, return_when=FIRST_COMPLETED)
            for future in finished:
                done(pending.pop(future), future.result())
            if not block and not finished:
                return

    try:
        listings = map_jobs(pool, _list_job, ((split.kind, split.url, unit) for unit in units))
        if split.kind in _MANIFESTS:  # every unit's labels before the first window is planned
            listings, names, multi_label = _manifest_labels(listings)
            classes = names if classes is None else classes
        histogram = np.zeros(len(classes), np.int64)
        for start, stop, items in windows_of(listings, window):
            part = _window_split(split, units[start:stop], start, partitions or 2 * max(1, cores),
                                 None if split.kind in _MANIFESTS else items)
            del items  # held by the window's partitions (one window's listings at a time)
            attach_records(part, out_url, scan_args)
            try:
                planned = plan_partitions(part, cfg, scan_args, out_url, lambda _: classes, exclude, pool=pool,
                                          workers=workers, earlier=earlier, multi_label=multi_label, digest=digest)
            except StrictSkipError as err:  # the earlier windows' shards are finished first: all kept, complete
                collect(block=True)
                raise ShardError(_strict_message(err, split.url, start, stop, len(units), len(entries))) from None
            del part  # and its units' listings: the next window's are listed while its shards are written
            batch = shard_tasks(cfg, out_url, planned, first=len(tasks))
            tasks += batch
            skipped += planned.skipped
            histogram += np.asarray(planned.histogram, dtype=np.int64)
            exts.update(planned.exts)
            listed += len(planned.listing.records)
            reused += planned.reused
            fingerprint = planned.listing.fingerprint  # of the units so far (of a listing of units: digest's)
            if progress:
                print(f"window {start}..{stop - 1} of {len(units)} units: {sum(len(t) for t in batch)} records in "
                      f"{len(batch)} shard(s)", flush=True)
            if map_shards is not None:
                for task, entry in zip(batch, map_shards(batch)):
                    done(task, entry)
            elif pool is None:
                for task in batch:
                    done(task, write_shard(task))
            else:
                pending.update((pool.submit(write_shard, task), task) for task in batch)
                collect(block=False)
        collect(block=True)
    except (SourceError, storage.StorageError) as err:
        raise ShardError(str(err)) from None
    finally:
        for future in pending:
            future.cancel()
    if progress and reused:
        print(f"plan: {reused} unit(s) of the source (class folders, tars) taken from their scan records instead of "
              "scanned again", flush=True)
    if not tasks:
        raise ShardError(f"{split.url}: no usable images ({len(skipped)} skipped; first: "
                         f"{skipped[0]['path'] if skipped else '-'}: {skipped[0]['reason'] if skipped else '-'})")
    source_info = {"kind": split.kind, "url": split.url, "fingerprint": fingerprint, "records": listed}
    if exclude is not None:
        source_info["exclude_fingerprint"] = exclude.fingerprint
    plan_fp = settings_fingerprint(fingerprint, cfg, exclude.fingerprint if exclude else "")
    plan = ShardPlan(name=cfg.name, out_url=out_url, tasks=tasks, classes=classes, multi_label=multi_label,
                     source=source_info, settings={**asdict(cfg), "window": window}, skipped=skipped,
                     dropped=dict(sorted(Counter(s["kind"] for s in skipped).items())),
                     fingerprint=hashlib.sha256(json.dumps([plan_fp, window]).encode()).hexdigest(),
                     label_histogram=histogram.tolist(), split=split, scan_args=scan_args, units_reused=reused,
                     ext_codes=sorted(exts))
    return finish_dataset(plan, entries)
