"""`vitpipe index`: a manifest for WebDataset shards made elsewhere (webdataset's ShardWriter,
img2dataset, ...), so `vitpipe verify` and training use them as they are, without re-sharding.

Each ``.tar`` under the folder / ``s3://`` prefix is read once: its sha256, size and samples
(WebDataset's rule: the key is the member path up to the first dot of the file name). A sample's
label is read as training reads it: the ``.json``'s ``labels`` (list), else the ``.cls`` (an
integer); class names come from the ``.json``'s ``classes`` / ``class_name`` beside the ids
(else the id itself is the name). A sample without an image or a label stays in its tar (the
counts must match the tar for the sample order) and is listed in ``skipped``; readers skip it.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import tarfile

from shards import storage
from shards.describe import write_reader_info
from shards.manifest import FORMAT_VERSION, MANIFEST
from shards.format import IMAGE_EXTS, HashingReader, image_ext, split_name
from shards.plan import ShardError

LABEL_EXTS = ("cls", "json")


def _labels(members: dict[str, bytes]) -> tuple[list[int], list[str] | None]:
    """(label ids, their names or None) of one sample, read as training reads them (vit.data.parse_labels):
    the .json's ``labels`` list, else the ``.cls`` integer; ([], None) when it has neither."""
    meta = {}
    if "json" in members:
        try:
            meta = json.loads(members["json"])
        except ValueError:
            return [], None
        meta = meta if isinstance(meta, dict) else {}
    ids = meta.get("labels")
    if ids is None and "cls" in members:
        try:
            ids = [int(members["cls"].strip())]
        except ValueError:
            return [], None
    if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and i >= 0 for i in ids):
        return [], None
    names = meta.get("classes", meta.get("class_name"))
    names = [names] if isinstance(names, str) else names
    return ids, names if isinstance(names, list) and len(names) == len(ids) else None


def _scan_shard(url: str) -> tuple[dict, list[tuple[str, list[int], list[str] | None, str | None]]]:
    """(manifest entry, [(key, label ids, names, image ext or None)]) of one tar, read once."""
    samples: list = []
    key, members = None, {}

    def close():
        if key is not None:
            ext = image_ext(members)
            ids, names = _labels(members)
            samples.append((key, ids, names, ext))

    with storage.open_read(url) as raw:
        reader = HashingReader(raw)
        try:
            with tarfile.open(fileobj=reader, mode="r|") as tar:
                for member in tar:
                    if not member.isfile():
                        continue
                    k, ext = split_name(member.name)
                    if k != key:
                        close()
                        key, members = k, {}
                    ext = ext.lower()
                    # only the small label members are read; images are read past (but hashed)
                    members[ext] = tar.extractfile(member).read() if ext in LABEL_EXTS else b""
                close()
        except (tarfile.TarError, EOFError) as err:
            raise ShardError(f"{url}: not a readable tar ({err}); remove it from the folder or fix it") from None
        while reader.read(1 << 20):  # tar end padding counts for the checksum
            pass
    entry = {"name": None, "samples": len(samples), "bytes": reader.bytes, "sha256": reader.digest.hexdigest()}
    return entry, samples


def find_shards(url: str) -> list[str]:
    """The ``.tar`` files under ``url`` (recursively), sorted by name."""
    return sorted(u for u in storage.list_recursive(url) if u.lower().endswith(".tar"))


def index_dataset(url: str, *, name: str | None = None, progress: bool = False) -> dict:
    """Write ``manifest.json`` (last; after ``_info.json``) for the WebDataset shards under ``url``."""
    url = str(url).rstrip("/")
    if storage.exists(storage.join(url, MANIFEST)):
        raise ShardError(f"{storage.join(url, MANIFEST)} exists: {url} is already a dataset "
                         "(`vitpipe verify` checks it; delete the manifest to index again)")
    tars = find_shards(url)
    if not tars:
        raise ShardError(f"{url}: no .tar shards there; give the folder or s3:// prefix that holds the WebDataset tars")
    if progress:
        from tqdm import tqdm

        tars_iter = tqdm(tars, desc="index", unit="shard", dynamic_ncols=True)
    else:
        tars_iter = tars
    shards, skipped, names, counts, multi, exts = [], [], {}, {}, False, set()
    base = url + "/"
    for tar_url in tars_iter:
        entry, samples = _scan_shard(tar_url)
        entry["name"] = tar_url[len(base):]
        shards.append(entry)
        for key, ids, labels, ext in samples:
            if ext is None or not ids:
                reason = "no image member" if ext is None else "no label (.cls, or .json labels)"
                skipped.append({"key": key, "shard": entry["name"], "reason": reason, "kind": "unlabeled" if ext else "no_image"})
                continue
            exts.add(ext)
            multi |= len(ids) > 1
            for i, label in zip(ids, labels or [None] * len(ids)):
                counts[i] = counts.get(i, 0) + 1
                if label is not None and names.setdefault(i, str(label)) != str(label):
                    raise ShardError(f"{tar_url}: sample {key} names class {i} {label!r}, another sample named it "
                                     f"{names[i]!r}; the class index must be the same in every shard")
    if not counts:
        raise ShardError(f"{url}: no sample has an image and a label (.cls, or .json with labels); nothing to train on")
    num_classes = max(counts) + 1
    classes = [names.get(i, str(i)) for i in range(num_classes)]
    listing = hashlib.sha256(json.dumps([[s["name"], s["bytes"], s["sha256"]] for s in shards]).encode()).hexdigest()
    manifest = {
        "format": "webdataset",
        "version": FORMAT_VERSION,
        "name": name or _common_prefix([s["name"] for s in shards]),
        "shards": shards,
        "num_shards": len(shards),
        "num_samples": sum(s["samples"] for s in shards),
        "total_bytes": sum(s["bytes"] for s in shards),
        "classes": classes,
        "num_classes": num_classes,
        "label_histogram": [counts.get(i, 0) for i in range(num_classes)],
        "multi_label": multi,
        "source": {"kind": "webdataset", "url": url, "fingerprint": listing, "records": sum(s["samples"] for s in shards)},
        "fingerprint": listing,
        "settings": {},
        "skipped": skipped,
        "dropped": {},
        "created": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }
    write_reader_info(url, manifest)
    storage.write_json(storage.join(url, MANIFEST), manifest)
    return manifest


def _common_prefix(names: list[str]) -> str:
    """The shards' name stem (``train`` for ``train-000000.tar`` ...), else ``data``."""
    stem = names[0].rsplit("/", 1)[-1].split(".")[0].rsplit("-", 1)[0]
    return stem if stem and all(n.rsplit("/", 1)[-1].startswith(stem) for n in names) else "data"


def looks_like_webdataset(source: str) -> bool:
    """True when ``source`` is a folder / prefix of ``.tar`` files whose first members are WebDataset
    samples (``<key>.<ext>`` with ``.cls`` or ``.json`` beside the image), not per-class tars of images."""
    try:
        if not storage.isdir(source):
            return False
        tars = [u for u in storage.listdir(source) if u.lower().endswith(".tar")]
    except storage.StorageError:
        return False
    if not tars:
        return False
    first = storage.join(source, sorted(tars)[0].rstrip("/").rsplit("/", 1)[-1])
    exts = set()
    try:
        with storage.open_read(first) as raw, tarfile.open(fileobj=raw, mode="r|") as tar:
            for i, member in enumerate(tar):
                if i >= 16:
                    break
                exts.add(split_name(member.name)[1].lower())
    except (tarfile.TarError, EOFError, OSError, storage.StorageError):
        return False
    return bool(exts & set(LABEL_EXTS)) and bool(exts & set(IMAGE_EXTS))
