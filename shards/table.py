"""A compact, columnar table of records: memory per record is a few dozen bytes plus its path,
so planning ImageNet-21k (14M images) does not mean 14M Python objects.

Strings live in one UTF-8 buffer with offsets; numbers in arrays. `ref(i)` builds the RecordRef
view of one row on demand; `take(indices)` copies a subset (a shard task carries only its rows).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from array import array
from itertools import accumulate, islice

import numpy as np

from shards import storage


_BAD = r".\s/\\\x00-\x1f"  # characters a key cannot hold (a run of them becomes one "_")
_KEY_BAD = re.compile(f"[{_BAD}]+")
# "/"-joined file names that are each a plain stem (no character above) and at most one ".extension"
_PLAIN_NAMES = re.compile(rf"[^{_BAD}]*(?:\.[^./]*)?(?:/[^{_BAD}]*(?:\.[^./]*)?)*")
_PLAIN_BYTES = bytes(sorted(set(range(0x21, 0x80)) - set(b"./\\")))  # ASCII characters a key keeps


def make_key(rel_path: str) -> str:
    """A tar-safe sample key from a relative path: no dots, slashes or whitespace."""
    stem = rel_path.rsplit(".", 1)[0] if "." in rel_path.rsplit("/", 1)[-1] else rel_path
    key = _KEY_BAD.sub("_", stem).strip("_")
    return key or "sample"


_SEP = "\uffff"  # a noncharacter: joins paths for the bulk key functions (checked absent)
_STEM_EXT = re.compile(f"\\.[^./{_SEP}]*(?={_SEP}|\\Z)")  # each path's ".extension" (in its last part)


def keys_of_paths(paths: list[str]) -> list[str]:
    """[make_key(p) for p in paths] with two regex passes over the joined paths instead of one per path."""
    joined = _SEP.join(paths)
    if not paths or joined.count(_SEP) != len(paths) - 1:
        return [make_key(p) for p in paths]
    stems = _KEY_BAD.sub("_", _STEM_EXT.sub("", joined)).split(_SEP)
    return [key.strip("_") or "sample" for key in stems]


def make_keys(folder: str, names: list[str]) -> list[str]:
    """[make_key(folder + name) for name in names], without a regex per name when the names are plain (no character
    make_key replaces, but one dot): then each key is the folder's key part ("a/b/" -> "a_b_") + the name's stem."""
    if not names or not folder.endswith("/"):
        return [make_key(folder + name) for name in names]
    joined = "/".join(names)
    usual = _usual_folder(folder, names, joined)
    if usual:  # every key is head + stem, cut out of one string
        head, ext = usual
        return (head + joined.removesuffix(ext).replace(ext + "/", "/" + head)).split("/")
    if _PLAIN_NAMES.fullmatch(joined):
        head = _KEY_BAD.sub("_", folder).lstrip("_")  # ends in "_" (from the "/"); empty or starts with a non-"_"
        return [(head + name.partition(".")[0]).strip("_") or "sample" for name in names]
    return [make_key(folder + name) for name in names]


def _usual_folder(folder: str, names: list[str], joined: str) -> tuple[str, str] | None:
    """(head, ext) when the key of each folder + name is head + the name's stem: ASCII names of one dot each, all
    one extension `ext`, no stem empty or ending in "_"; else None."""
    head = _KEY_BAD.sub("_", folder).lstrip("_")  # ends in "_" (from the "/"); empty or starts with a non-"_"
    ends, first = joined + "/", names[0]
    ext = first[first.rfind("."):]
    if (folder.endswith("/") and head and ends.isascii()
            and ends.encode("ascii").translate(None, _PLAIN_BYTES) == b"./" * len(names)
            and ends.count(ext + "/") == len(names) and "_" + ext + "/" not in ends and "/" + ext + "/" not in "/" + ends):
        return head, ext
    return None


class _Strings:
    __slots__ = ("buf", "off")

    def __init__(self):
        self.buf = bytearray()
        self.off = array("Q", [0])

    def append(self, text: str) -> None:
        self.buf += text.encode("utf-8", "surrogatepass")
        self.off.append(len(self.buf))

    def extend(self, texts: list[str], *, prefix: str = "") -> None:
        """append(prefix + text) for each text."""
        if not texts:
            return
        joined = prefix + prefix.join(texts)
        pre = prefix.encode("utf-8", "surrogatepass")
        if joined.isascii():
            data, sizes = joined.encode("ascii"), map(len, texts)
        else:
            encoded = [text.encode("utf-8", "surrogatepass") for text in texts]
            data, sizes = pre + pre.join(encoded), map(len, encoded)
        if pre:
            sizes = map(len(pre).__add__, sizes)
        self.off.extend(islice(accumulate(sizes, initial=len(self.buf)), 1, None))
        self.buf += data

    def __getitem__(self, i: int) -> str:
        return self.buf[self.off[i]:self.off[i + 1]].decode("utf-8", "surrogatepass")

    def extend_strings(self, other: "_Strings") -> None:
        """Append all of `other`'s strings."""
        base = len(self.buf)
        self.buf += other.buf
        self.off += array("Q", (np.frombuffer(other.off, dtype=np.uint64)[1:] + np.uint64(base)).tobytes())

    def replace(self, texts: dict[int, str]) -> None:
        """Set the text of rows {i: text} (rare: key collisions), in one rebuild."""
        off = np.frombuffer(self.off, dtype=np.uint64).astype(np.int64)
        sizes = np.diff(off)
        buf, start = bytearray(), 0
        for i in sorted(texts):
            data = texts[i].encode("utf-8", "surrogatepass")
            buf += self.buf[off[start]:off[i]]
            buf += data
            sizes[i] = len(data)
            start = i + 1
        buf += self.buf[off[start]:]
        self.buf = buf
        self.off = array("Q", [0])
        self.off.frombytes(np.cumsum(sizes).astype(np.uint64).tobytes())

    def take(self, indices: np.ndarray) -> "_Strings":
        """The strings of rows `indices` (an int64 array), gathered with array operations."""
        out = _Strings()
        off = np.frombuffer(self.off, dtype=np.uint64).astype(np.int64)
        starts, sizes = off[indices], off[indices + 1] - off[indices]
        new_off = np.zeros(len(indices) + 1, dtype=np.int64)
        np.cumsum(sizes, out=new_off[1:])
        source = np.repeat(starts - new_off[:-1], sizes) + np.arange(new_off[-1])
        out.buf = bytearray(np.frombuffer(self.buf, dtype=np.uint8)[source].tobytes())
        out.off = array("Q", new_off.astype(np.uint64).tobytes())
        return out


class RecordTable:
    """Rows of (key, root, path, labels, offset, length); see shards.sources.RecordRef."""

    def __init__(self):
        self.roots: list[str] = []  # few distinct values: the source root, or one per tar
        self._root_ids: dict[str, int] = {}
        self.root_idx = array("I")
        self.keys: _Strings | None = None  # None while every key is derived from its path (see append)
        self.paths = _Strings()
        self.label_names: list[str] = []
        self._label_ids: dict[str, int] = {}
        self.labels = array("I")
        self.label_off = array("Q")  # empty while every row has exactly one label (row i: labels[i])
        self.offset = array("q")  # tar members only: empty while every row is a whole file (offset -1)
        self.length = array("q")
        # while all rows came from extend_files (for make_keys_unique), else None: hash(key(i)) of every row, 0 for
        # the rows of _later runs (lo, hi, folder, head): usual folders, hashed only if needed. Never pickled (str
        # hashes differ between processes).
        self._key_hash: array | None = array("q")
        self._later: list[tuple[int, int, str, str]] = []

    def __len__(self) -> int:
        return len(self.root_idx)

    def append(self, *, key: str | None, root: str, path: str, labels, offset: int = -1, length: int = -1) -> None:
        """`key=None`: the key is make_key(path), computed when asked for instead of stored."""
        self._key_hash, self._later = None, []
        self.root_idx.append(self._root_id(root))
        if key and self.keys is None:
            self._store_keys()
        if self.keys is not None:
            self.keys.append(key or "")
        self.paths.append(path)
        before = len(self.labels)
        for label in labels:
            self.labels.append(self._label_id(label))
        if self.label_off or len(labels) != 1:
            if not self.label_off:  # rows so far had one label each
                self.label_off = array("Q", range(before + 1))
            self.label_off.append(len(self.labels))
        if offset >= 0 and not self.offset:
            self.offset, self.length = array("q", [-1]) * (len(self) - 1), array("q", [-1]) * (len(self) - 1)
        if self.offset or offset >= 0:
            self.offset.append(offset)
            self.length.append(length)

    def extend(self, other: "RecordTable") -> None:
        """Append every row of `other` (a part listed in another process), a column at a time."""
        n, m = len(self), len(other)
        if not m:
            return
        if self._key_hash is not None and other._key_hash is not None:  # both all extend_files rows: still so
            self._key_hash += other._key_hash
            self._later += [(lo + n, hi + n, folder, head) for lo, hi, folder, head in other._later]
        else:
            self._key_hash, self._later = None, []
        roots = np.array([self._root_id(root) for root in other.roots], dtype=np.uint32)
        self.root_idx += array("I", roots[np.frombuffer(other.root_idx, dtype=np.uint32)].tobytes())
        if other.keys is not None and self.keys is None:
            self._store_keys()
        if self.keys is not None:  # rows whose key is derived from the path store it empty
            keys = other.keys
            if keys is None:
                keys = _Strings()
                keys.off = array("Q", [0]) * (m + 1)
            self.keys.extend_strings(keys)
        self.paths.extend_strings(other.paths)
        before = len(self.labels)
        names = np.array([self._label_id(name) for name in other.label_names] or [0], dtype=np.uint32)
        self.labels += array("I", names[np.frombuffer(other.labels, dtype=np.uint32)].tobytes())
        if self.label_off or other.label_off:
            if not self.label_off:  # rows so far had one label each
                self.label_off = array("Q", range(before + 1))
            off = other.label_offsets()
            off = np.arange(m + 1, dtype=np.uint64) if off is None else off
            self.label_off += array("Q", (off[1:] + np.uint64(before)).tobytes())
        if self.offset or other.offset:
            if not self.offset:
                self.offset, self.length = array("q", [-1]) * n, array("q", [-1]) * n
            self.offset += other.offset or array("q", [-1]) * m
            self.length += other.length or array("q", [-1]) * m

    def extend_files(self, *, root: str, folder: str, names: list[str], label: str) -> None:
        """append(key=None, root=root, path=folder + name, labels=(label,)) for each name, at a fraction of the cost
        (an imagefolder listing: one label per row, whole files, keys derived from the paths)."""
        if self.keys is not None or self.label_off or self.offset:  # not that layout any more: row by row
            for name in names:
                self.append(key=None, root=root, path=folder + name, labels=(label,))
            return
        start = len(self)
        self.root_idx += array("I", [self._root_id(root)]) * len(names)
        self.labels += array("I", [self._label_id(label)]) * len(names)
        self.paths.extend(names, prefix=folder)
        if self._key_hash is None or not names:
            return
        usual = folder.endswith("/") and len(set(names)) == len(names) and _usual_folder(folder, names, "/".join(names))
        if usual:
            self._later.append((start, len(self), folder, usual[0]))
            self._key_hash += array("q", [0]) * len(names)
        else:
            self._key_hash.extend(map(hash, make_keys(folder, names)))

    def _names(self, lo: int, hi: int, folder: str) -> list[str]:
        """The names of rows lo..hi-1 whose paths are folder + name (one extend_files call)."""
        skip = len(folder.encode("utf-8", "surrogatepass"))
        off = np.frombuffer(self.paths.off, dtype=np.uint64)[lo:hi + 1].astype(np.int64)
        text = np.frombuffer(self.paths.buf, dtype=np.uint8)[off[0]:off[-1]]
        keep = np.ones(len(text), dtype=bool)
        keep[((off[:-1] - off[0])[:, None] + np.arange(skip - 1)).ravel()] = False  # each folder but its last "/"
        return text[keep].tobytes().decode("utf-8", "surrogatepass")[1:].split("/")

    def _root_id(self, root: str) -> int:
        rid = self._root_ids.get(root)
        if rid is None:
            rid = self._root_ids[root] = len(self.roots)
            self.roots.append(root)
        return rid

    def _label_id(self, label: str) -> int:
        lid = self._label_ids.get(label)
        if lid is None:
            lid = self._label_ids[label] = len(self.label_names)
            self.label_names.append(label)
        return lid

    def key(self, i: int) -> str:
        return (self.keys is not None and self.keys[i]) or make_key(self.paths[i])

    def keys_of(self, rows, paths: list[str] | None = None) -> list[str]:
        """[key(i) for i in rows], deriving the keys of all those rows at once. `paths`: paths_of(rows)."""
        paths = self.paths_of(rows) if paths is None else paths
        if self.keys is None:
            return keys_of_paths(paths)
        return [self.keys[i] or make_key(path) for i, path in zip(rows, paths)]

    def _store_keys(self) -> None:
        """From now on keep keys: the rows so far get empty (derived) ones."""
        self.keys = _Strings()
        self.keys.off = array("Q", [0]) * (len(self.paths.off))

    def path(self, i: int) -> str:
        return self.paths[i]

    def label_list(self, i: int) -> tuple[str, ...]:
        lo, hi = self.label_span(i)
        return tuple(self.label_names[j] for j in self.labels[lo:hi])

    def label_span(self, i: int) -> tuple[int, int]:
        """Row i's labels are labels[lo:hi]."""
        return (self.label_off[i], self.label_off[i + 1]) if self.label_off else (i, i + 1)

    def label_offsets(self) -> np.ndarray | None:
        """The label offsets as an array [n+1] (a view), or None when every row has one label."""
        return np.frombuffer(self.label_off, dtype=np.uint64) if self.label_off else None

    def _offset(self, i: int) -> int:
        return self.offset[i] if self.offset else -1

    def paths_of(self, rows) -> list[str]:
        """[path(i) for i in rows]; a run of consecutive rows (a range) is decoded in one piece."""
        buf, off = self.paths.buf, self.paths.off
        if isinstance(rows, range) and rows.step == 1 and len(rows):
            base, end = off[rows.start], off[rows.stop]
            text = buf[base:end].decode("utf-8", "surrogatepass")
            if len(text) == end - base:  # ASCII: byte offsets are character offsets
                cuts = [o - base for o in off[rows.start:rows.stop + 1]]
                return [text[a:b] for a, b in zip(cuts, cuts[1:])]
        return [buf[off[i]:off[i + 1]].decode("utf-8", "surrogatepass") for i in rows]

    def locations(self, rows, paths: list[str] | None = None) -> list[tuple[str, int, int]]:
        """(url, offset, length) of each row: where its bytes are (offset -1: the whole file).
        `paths`: paths_of(rows), when the caller has them."""
        paths = self.paths_of(rows) if paths is None else paths
        roots = self.roots
        if not self.offset and len(roots) == 1 and roots[0] and not storage.is_s3(roots[0]) and os.sep == "/":
            prefix = roots[0] + "/"  # one local root, whole files: what _url gives, without a call per row
            return [(prefix + path, -1, -1) for path in paths]
        root_idx = self.root_idx
        if not self.offset:
            return [(self._url(roots[root_idx[i]], path, -1), -1, -1) for i, path in zip(rows, paths)]
        offset, length = self.offset, self.length
        return [(self._url(roots[root_idx[i]], path, offset[i]), offset[i], length[i] if offset[i] >= 0 else -1)
                for i, path in zip(rows, paths)]

    def url(self, i: int) -> str:
        return self._url(self.roots[self.root_idx[i]], self.paths[i], self._offset(i))

    @staticmethod
    def _url(root: str, path: str, offset: int) -> str:
        if offset >= 0 or not root:
            return root or path
        if storage.is_s3(root):
            return storage.join(root, path)
        return f"{root}/{path}" if os.sep == "/" else os.path.join(root, *path.split("/"))

    def ref(self, i: int):
        from shards.sources import RecordRef

        path, offset = self.paths[i], self._offset(i)
        return RecordRef(self.key(i), self._url(self.roots[self.root_idx[i]], path, offset), self.label_list(i), path,
                         None if offset < 0 else offset, None if offset < 0 else self.length[i])

    def __iter__(self):
        for i in range(len(self)):
            yield self.ref(i)

    def __getitem__(self, i: int):
        return self.ref(i)

    def take(self, indices) -> "RecordTable":
        out = RecordTable()
        out._key_hash, out._later = None, []
        out.roots, out._root_ids, out.label_names, out._label_ids = self.roots, self._root_ids, self.label_names, self._label_ids
        indices = np.asarray(indices, dtype=np.int64)

        def gather(column: array) -> array:
            return array(column.typecode, np.frombuffer(column, dtype=column.typecode)[indices].tobytes())

        out.root_idx = gather(self.root_idx)
        out.keys = None if self.keys is None else self.keys.take(indices)
        out.paths = self.paths.take(indices)
        if self.label_off:  # the label lists are strings of uint32: gathered the same way
            lists = _Strings()
            lists.buf, lists.off = self.labels, array("Q", (np.frombuffer(self.label_off, dtype=np.uint64) * 4).tobytes())
            taken = lists.take(indices)
            out.labels = array("I", bytes(taken.buf))
            out.label_off = array("Q", (np.frombuffer(taken.off, dtype=np.uint64) // 4).tobytes())
        else:
            out.labels = gather(self.labels)
        if self.offset:
            out.offset, out.length = gather(self.offset), gather(self.length)
        return out

    def __getstate__(self):
        state = {k: getattr(self, k) for k in ("roots", "root_idx", "keys", "paths", "label_names", "labels",
                                               "label_off", "offset", "length")}
        if self._key_hash is not None and sum(hi - lo for lo, hi, *_ in self._later) == len(self):
            state["_later"] = self._later  # every row in usual folders: no hash to carry (a listed partition)
        return state

    def __setstate__(self, state):
        self._later = []
        for k, v in state.items():
            setattr(self, k, v)
        self._root_ids = {r: i for i, r in enumerate(self.roots)}
        self._label_ids = {n: i for i, n in enumerate(self.label_names)}
        self._key_hash = array("q", [0]) * len(self) if "_later" in state else None

    def columns(self, prefix: str = "") -> dict:
        """The table as arrays only (for an .npz: no pickle); RecordTable.from_columns reads them back."""
        names = json.dumps([self.roots, self.label_names]).encode("utf-8", "surrogatepass")
        out = {"names": np.frombuffer(names, dtype=np.uint8), "root_idx": np.frombuffer(self.root_idx, dtype=np.uint32),
               "paths": np.frombuffer(self.paths.buf, dtype=np.uint8), "path_off": np.frombuffer(self.paths.off, np.uint64),
               "labels": np.frombuffer(self.labels, dtype=np.uint32), "label_off": np.frombuffer(self.label_off, np.uint64),
               "offset": np.frombuffer(self.offset, dtype=np.int64), "length": np.frombuffer(self.length, dtype=np.int64)}
        if self.keys is not None:
            out["keys"], out["key_off"] = np.frombuffer(self.keys.buf, np.uint8), np.frombuffer(self.keys.off, np.uint64)
        return {prefix + name: value for name, value in out.items()}

    @classmethod
    def from_columns(cls, arrays: dict, prefix: str = "") -> "RecordTable":
        get = lambda name: arrays[prefix + name]  # noqa: E731
        out = cls()
        out._key_hash = None
        out.roots, out.label_names = json.loads(get("names").tobytes().decode("utf-8", "surrogatepass"))
        out._root_ids = {r: i for i, r in enumerate(out.roots)}
        out._label_ids = {n: i for i, n in enumerate(out.label_names)}
        def column(name: str, code: str) -> array:
            out = array(code)
            out.frombytes(memoryview(np.ascontiguousarray(get(name))).cast("B"))  # one copy
            return out
        for name, code in (("root_idx", "I"), ("labels", "I"), ("label_off", "Q"), ("offset", "q"), ("length", "q")):
            setattr(out, name, column(name, code))
        out.paths.buf, out.paths.off = bytearray(get("paths")), column("path_off", "Q")
        if prefix + "keys" in arrays:
            out.keys = _Strings()
            out.keys.buf, out.keys.off = bytearray(get("keys")), column("key_off", "Q")
        return out

    def make_keys_unique(self) -> int:
        """Give colliding keys a short hash of their path (first occurrence keeps its key); returns changes."""
        known, later = self._key_hash, self._later
        self._key_hash, self._later = None, []  # keys may change below
        if known is not None and len(known) == len(self):
            heads = sorted(head for *_, head in later)
            if sum(hi - lo for lo, hi, *_ in later) == len(self) and not any(map(str.startswith, heads[1:], heads)):
                return 0  # every key is its folder's head + a stem unique in the folder, and no head begins another
            for lo, hi, folder, _ in later:
                known[lo:hi] = array("q", map(hash, make_keys(folder, self._names(lo, hi, folder))))
            hashes = np.frombuffer(known, dtype=np.int64)
        else:
            hashes = np.fromiter((hash(self.key(i)) for i in range(len(self))), dtype=np.int64, count=len(self))
        ordered = np.sort(hashes)
        repeated = ordered[1:][ordered[1:] == ordered[:-1]]
        if not len(repeated):
            return 0
        seen: set[str] = set()
        changes: list[int] = []
        for i in np.flatnonzero(np.isin(hashes, repeated)).tolist():
            key = self.key(i)
            if key in seen:
                changes.append(i)
                key = self._renamed(i)
            seen.add(key)
        self.rename_keys(changes)
        return len(changes)

    def _renamed(self, i: int) -> str:
        """Row i's key made unique: a short hash of its path added."""
        return f"{self.key(i)}_{hashlib.sha1(self.paths[i].encode('utf-8')).hexdigest()[:10]}"

    def rename_keys(self, rows) -> None:
        """Give each of `rows` (keys an earlier row has: see make_keys_unique) its _renamed key."""
        changes = {i: self._renamed(i) for i in rows}
        if changes:
            if self.keys is None:
                self._store_keys()
            self.keys.replace(changes)

    @property
    def nbytes(self) -> int:
        keys = self.keys or _Strings()
        return (len(keys.buf) + len(self.paths.buf) + 8 * (len(keys.off) + len(self.paths.off))
                + 4 * len(self.root_idx) + 4 * len(self.labels) + 8 * len(self.label_off) + 16 * len(self.offset))
