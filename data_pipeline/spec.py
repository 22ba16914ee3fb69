"""Shard specs, as webdataset users write them: brace patterns (``/data/laion-{000000..012345}.tar``),
several patterns joined with ``::``, or an explicit list of shard paths.

A spec names shards wherever they sit, without bigtrain's ``{split}-*.tar`` naming or an index.
Sample counts come from our ``index.json`` beside the shards when it lists them (with the split's
metadata: tokenizer, sequence length, latents), else from one scan of the tar headers, stored in
``.bigtrain-shard-counts.json`` beside the shards (or under the cache directory where that is not
writable) and reused while each shard keeps its size and modification time.

Only local paths for now: a URL scheme (``s3://``, ``https://``, ``pipe:``) is refused in one line.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import tempfile
from typing import Any

from data_pipeline.index import INDEX_NAME, DataError, ShardInfo, SplitInfo, entry_meta, read_index
from data_pipeline.tario import scan_shard

COUNTS_NAME = ".bigtrain-shard-counts.json"
COUNTS_FORMAT = "bigtrain-shard-counts/1"
MAX_EXPANSION = 10_000_000  # shards: beyond any data set; a typo like {0..9999999999} would exhaust memory
_RANGE = re.compile(r"^(-?\d+)\.\.(-?\d+)(?:\.\.(\d+))?$")
_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://|^(pipe):")


def _matching_brace(text: str, start: int) -> int:
    depth = 0
    for i in range(start, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
    raise DataError(f"unbalanced '{{' in shard pattern {text!r}")


def _split_top(text: str) -> list[str]:
    """``text`` split at the commas outside nested braces."""
    parts, depth, last = [], 0, 0
    for i, ch in enumerate(text):
        depth += (ch == "{") - (ch == "}")
        if ch == "," and depth == 0:
            parts.append(text[last:i])
            last = i + 1
    return parts + [text[last:]]


def _range(m: re.Match[str], pattern: str) -> list[str]:
    a, b, step = int(m.group(1)), int(m.group(2)), int(m.group(3) or 1)
    if step == 0:
        raise DataError(f"shard pattern {pattern!r}: a range step of 0")
    if abs(b - a) // step + 1 > MAX_EXPANSION:
        raise DataError(f"shard pattern {pattern!r} expands to more than {MAX_EXPANSION} shards")
    # zero-padded when an end is written with a leading zero, to the wider end (braceexpand's rule)
    padded = any(len(s.lstrip("-")) > 1 and s.lstrip("-")[0] == "0" for s in (m.group(1), m.group(2)))
    width = max(len(m.group(1)), len(m.group(2))) if padded else 0
    values = range(a, b + 1, step) if a <= b else range(a, b - 1, -step)
    return [f"{v:0{width}d}" if width else str(v) for v in values]


def expand_braces(pattern: str) -> list[str]:
    """webdataset's (braceexpand's) expansion: ``{a,b}`` alternatives (nested allowed),
    ``{000..099}`` inclusive numeric ranges (zero-padded when an end is), ``{0..10..2}`` with a step;
    several groups expand in order (the last varies fastest). ``{x}`` without a comma or range
    stays literal."""
    if "}" in pattern and "{" not in pattern:
        raise DataError(f"unbalanced '}}' in shard pattern {pattern!r}")
    start = pattern.find("{")
    if start < 0:
        return [pattern]
    end = _matching_brace(pattern, start)
    head, body, tail = pattern[:start], pattern[start + 1:end], pattern[end + 1:]
    m = _RANGE.match(body)
    if m:
        options = _range(m, pattern)
    else:
        parts = _split_top(body)
        options = [x for part in parts for x in expand_braces(part)] if len(parts) > 1 else ["{" + body + "}"]
    rest = expand_braces(tail)
    if len(options) * len(rest) > MAX_EXPANSION:
        raise DataError(f"shard pattern {pattern!r} expands to more than {MAX_EXPANSION} shards")
    return [head + o + r for o in options for r in rest]


def expand_spec(spec: str, key: str) -> list[str]:
    """Shard paths of a spec: patterns joined with ``::`` (webdataset's separator), each expanded;
    duplicates are refused (a shard named twice would be read twice per epoch)."""
    paths: list[str] = []
    for part in spec.split("::"):
        part = part.strip()
        if not part:
            raise DataError(f"config key '{key}': empty pattern in {spec!r}")
        scheme = _SCHEME.match(part)
        if scheme:
            name = scheme.group(1) or scheme.group(2)
            raise DataError(f"config key '{key}': {part!r} uses '{name}', but shards are read from local paths only "
                            f"for now: copy them to a local or shared file system")
        try:
            paths += [os.path.expanduser(p) for p in expand_braces(part)]
        except DataError as exc:
            raise DataError(f"config key '{key}': {exc}") from None
    seen: set[str] = set()
    for p in paths:
        if os.path.abspath(p) in seen:
            raise DataError(f"config key '{key}': shard {p} is named twice in {spec!r}")
        seen.add(os.path.abspath(p))
    return paths


def _default_cache() -> str:
    return os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "bigtrain")


def _counts_files(directory: str, cache_dir: str) -> list[str]:
    """Where a directory's stored counts may be: beside the shards, then in the cache."""
    digest = hashlib.sha256(os.path.abspath(directory).encode()).hexdigest()[:24]
    return [os.path.join(directory, COUNTS_NAME), os.path.join(cache_dir or _default_cache(), "shard-counts",
                                                                   f"{digest}.json")]


def _read_counts(files: list[str]) -> dict[str, Any]:
    """Stored counts (ours; a damaged or foreign file is ignored: the shards are scanned again)."""
    for path in files:
        try:
            with open(path) as f:
                data = json.load(f)
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and data.get("format") == COUNTS_FORMAT and isinstance(data.get("shards"), dict):
            return data["shards"]
    return {}


def _write_counts(files: list[str], counts: dict[str, Any]) -> None:
    """Atomically, beside the shards if that directory is writable, else in the cache; nowhere if
    neither is (the next run scans again)."""
    body = json.dumps({"format": COUNTS_FORMAT, "shards": counts}, indent=1, sort_keys=True)
    for path in files:
        tmp = ""
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".counts-", suffix=".json")
            with os.fdopen(fd, "w") as f:
                f.write(body)
            os.chmod(tmp, 0o644)
            os.replace(tmp, path)
            return
        except OSError:  # read-only data, a full disk: the next place, and the counts are only a cache
            if tmp and os.path.exists(tmp):
                os.unlink(tmp)


def _stat_key(path: str) -> dict[str, int]:
    st = os.stat(path)
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _indexed(directory: str, names: list[str]) -> tuple[dict[str, int], dict[str, Any]]:
    """Counts our index beside the shards gives for ``names``, and the metadata of the split that
    holds them all (empty when they span splits or are not all listed)."""
    index = read_index(directory)
    if index is None:
        return {}, {}
    counts, meta = {}, {}
    for entry in index["splits"].values():
        listed = {s["name"]: s["num_samples"] for s in entry["shards"]}
        counts.update({n: listed[n] for n in names if n in listed})
        if names and all(n in listed for n in names):
            meta = entry_meta(entry)
    return counts, meta


def load_spec(spec: str, key: str, cache_dir: str = "") -> SplitInfo:
    """The split a shard spec names, counted without rescanning what was counted before."""
    paths = expand_spec(spec, key)
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise DataError(f"config key '{key}': shard {missing[0]} does not exist{more} (spec {spec!r})")
    absolute = [os.path.abspath(p) for p in paths]
    root = os.path.commonpath([os.path.dirname(p) for p in absolute])
    by_dir: dict[str, list[str]] = {}
    for p in absolute:
        by_dir.setdefault(os.path.dirname(p), []).append(os.path.basename(p))
    counts: dict[str, int] = {}
    damaged: list[str] = []
    metas = []
    all_indexed = True  # every count from an index: check_shards then verifies them, as for data.dir
    for directory, names in by_dir.items():
        from_index, meta = _indexed(directory, names)
        metas.append(meta if len(from_index) == len(names) else {})
        files = _counts_files(directory, cache_dir)
        stored, changed = _read_counts(files), False
        for name in names:
            path = os.path.join(directory, name)
            if name in from_index:
                counts[path] = from_index[name]
                continue
            all_indexed = False
            entry, stat = stored.get(name), _stat_key(path)
            # ours, but read like any file: an entry that is not for this very file (size, mtime) or
            # not a count is scanned again, never trusted
            if not (isinstance(entry, dict) and {k: entry.get(k) for k in ("size", "mtime_ns")} == stat
                    and type(entry.get("num_samples")) is int and entry["num_samples"] >= 0
                    and isinstance(entry.get("error", ""), str)):
                scan = scan_shard(path)
                entry = {**stat, "num_samples": len(scan.samples), "error": scan.error or ""}
                stored[name], changed = entry, True
            counts[path] = entry["num_samples"]
            if entry.get("error"):
                damaged.append(f"{os.path.relpath(path, root)}: {entry['error']}")
        if changed:
            _write_counts(files, stored)
    shards = [ShardInfo(os.path.relpath(p, root), counts[p]) for p in absolute if counts[p] > 0]
    meta = metas[0] if len(metas) == 1 else {}
    info = SplitInfo(root, shards, meta.get("num_classes", 0), meta.get("classes", []), damaged_shards=damaged,
                     indexed=all_indexed, meta=meta)
    if info.num_samples == 0:
        raise DataError(f"config key '{key}': the shards of {spec!r} hold no readable samples")
    return info


def load_mixture(sources: list[tuple[str, float]], key: str, cache_dir: str = "") -> SplitInfo:
    """One split of several specs mixed by weight (``[(spec, weight), ...]``): their shards in
    order, with the run of shards and the weight of each source (see ``SplitInfo.order``)."""
    parts = [load_spec(spec, f"{key}[{i}].spec", cache_dir) for i, (spec, _) in enumerate(sources)]
    paths = [os.path.join(p.root, s.name) for p in parts for s in p.shards]
    if len(set(paths)) < len(paths):
        raise DataError(f"config key '{key}': a shard is in two sources (each sample would be drawn by both weights)")
    root = os.path.commonpath([p.root for p in parts])
    shards = [ShardInfo(os.path.relpath(os.path.join(p.root, s.name), root), s.num_samples) for p in parts for s in p.shards]
    metas = [p.meta for p in parts]
    meta = metas[0] if all(m == metas[0] for m in metas) else {}
    return SplitInfo(root, shards, max(p.num_classes for p in parts), parts[0].classes if meta else [],
                     damaged_shards=[d for p in parts for d in p.damaged_shards], indexed=all(p.indexed for p in parts),
                     meta=meta, sources=[(len(p.shards), float(w)) for p, (_, w) in zip(parts, sources)])


__all__ = ["COUNTS_NAME", "INDEX_NAME", "expand_braces", "expand_spec", "load_mixture", "load_spec"]
