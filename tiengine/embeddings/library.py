"""EmbeddingLibrary: a folder of embedding files (sub-folders included) as names -> Embedding.

Scanning follows AUTOMATIC1111's embeddings folder: every file below the folder is looked
at; zero-byte files and `*.preview.*` images are skipped; files of other types are skipped;
each skipped file keeps a reason. With a model family, embeddings made for another family
are skipped with the width message ("made for SD2 (1024), this model is SD1 (768)").

Names are case-sensitive. When two files give the same name, the shallowest file wins, then
the first by relative path (POSIX, code-point order); the others stay reachable by path
(`by_path`, `shadowed`: `embedding:sub/cat` reaches `sub/cat.pt` when `cat.pt` took the name `cat`) and
are reported in `collisions`. Path references (for the explicit `embedding:sub/name` syntax)
are relative paths without extension, e.g. "negatives/EasyNegative"; two files differing only
in extension resolve to the first by relative path. `reload()` re-reads only files whose
modification time or size changed and drops deleted ones. No tokenizer logic lives here.

`default_embeddings_folder()` is the folder named by the environment variable TIENGINE_EMBEDDINGS, which
`Engine.load` and every command with `--embeddings` use when no folder is given.

One bad file never spoils the folder: any error while reading a file (a malformed header, an image
over Pillow's decompression-bomb limit, a file that vanished, a recursion or memory error from a
hostile pickle) makes that one file a skipped entry with its reason. A file whose name (stem, or
stored name) is empty or only whitespace is skipped. The walk is bounded: symbolic links are not
followed out of the folder (a link pointing outside is a skipped entry "link points outside the
folder"; its target is never quoted), folders deeper than `max_depth` levels and files beyond
`max_files` are not read, and each cut is reported as a skipped entry. `follow_links=True` follows
links anywhere (still once per real folder, within the same bounds). A relative path that is also
another embedding's name stays that name; the clash is reported in `collisions`.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from tiengine.embeddings.embedding import (
    FAMILY_LABELS,
    PAIR_SECOND_STEM,
    Embedding,
    load_embedding,
    pair_partner,
)
from tiengine.errors import EmbeddingError
from tiengine.io.folders import (
    MAX_SCAN_DEPTH,
    MAX_SCAN_FILES,
    bounded_walk,
    describe_read_error,
)

EMBEDDING_SUFFIXES = (".pt", ".bin", ".safetensors", ".png", ".webp")
EMBEDDINGS_ENV = "TIENGINE_EMBEDDINGS"  # the default embeddings folder

# (st_mtime_ns, st_size) of a file, plus its pair partner's for diffusers SDXL pairs
Signature = tuple[tuple[int, int], tuple[int, int] | None]


def default_embeddings_folder() -> Path | None:
    """The folder named by $TIENGINE_EMBEDDINGS (read now, not at import), or None when it is unset or empty."""
    value = os.environ.get(EMBEDDINGS_ENV, "")
    if not value:
        return None
    folder = Path(value).expanduser()
    if not folder.is_dir():
        raise EmbeddingError(f"{EMBEDDINGS_ENV}={value}: not a folder")
    return folder


@dataclass
class LibraryEntry:
    """One file of the folder: loaded (`embedding`) or skipped (`reason`)."""

    relative_path: str  # POSIX path below the folder, with extension
    embedding: Embedding | None = None
    reason: str | None = None

    @property
    def path_key(self) -> str:
        """Relative path without extension: the `embedding:sub/name` form."""
        stem, _ = os.path.splitext(self.relative_path)
        return stem


@dataclass
class ReloadReport:
    """Relative paths that appeared, changed or disappeared since the previous scan."""

    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)


class EmbeddingLibrary:
    """Embeddings of one folder by name and by relative path (see module docstring)."""

    def __init__(
        self,
        folder: str | os.PathLike[str],
        family: str | None = None,
        *,
        max_depth: int = MAX_SCAN_DEPTH,
        max_files: int = MAX_SCAN_FILES,
        follow_links: bool = False,
    ):
        if family is not None and family not in FAMILY_LABELS:
            raise EmbeddingError(f"unknown model family {family!r} (expected "
                                 f"{', '.join(FAMILY_LABELS)})")
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise EmbeddingError(f"{self.folder}: not a folder")
        self.family = family
        self.max_depth = max_depth
        self.max_files = max_files
        self.follow_links = follow_links
        self._files: dict[str, tuple[Signature, LibraryEntry]] = {}
        self._by_name: dict[str, LibraryEntry] = {}
        self._by_path: dict[str, LibraryEntry] = {}
        self.collisions: dict[str, list[str]] = {}  # name -> [winner, shadowed...] (rel. paths)
        self.reload()

    # -- scanning
    def reload(self) -> ReloadReport:
        """Re-scan the folder, re-reading only new or changed files."""
        report = ReloadReport()
        files = dict(self._files)  # built aside and published whole: readers on other threads see either scan
        seen: dict[str, tuple[Path, Signature | None, str | None]] = {}
        for path, relative, reason in bounded_walk(self.folder, max_depth=self.max_depth, max_files=self.max_files,
                                                  follow_links=self.follow_links):
            signature = None if reason is not None else _signature(path)
            if reason is None and signature is None:
                continue  # vanished during the scan
            seen[relative] = (path, signature, reason)
        for relative in sorted(set(files) - set(seen)):
            del files[relative]
            report.removed.append(relative)
        for relative, (path, signature, reason) in seen.items():
            cached = files.get(relative)
            if reason is not None:
                entry = LibraryEntry(relative, reason=reason)
                if cached is None or cached[1].reason != reason:
                    (report.changed if cached else report.added).append(relative)
                files[relative] = ((((0, 0), None)), entry)
                continue
            if cached is not None and cached[0] == signature:
                continue
            (report.changed if cached else report.added).append(relative)
            assert signature is not None
            files[relative] = (signature, self._read(path, relative))
        self._files = files
        self._index()
        return report

    def _read(self, path: Path, relative: str) -> LibraryEntry:
        try:
            return self._read_file(path, relative)
        except Exception as error:  # one bad file must not spoil the folder  # noqa: BLE001
            return LibraryEntry(relative, reason=describe_read_error(error, str(path)))

    def _read_file(self, path: Path, relative: str) -> LibraryEntry:
        entry = LibraryEntry(relative)
        suffix = path.suffix.lower()
        if ".preview." in path.name.lower():
            entry.reason = "preview image"
        elif suffix not in EMBEDDING_SUFFIXES:
            entry.reason = f"not an embedding file type ({suffix or 'no extension'})"
        elif not path.stem.strip():
            entry.reason = "file name is empty or only whitespace before the extension"
        elif path.stat().st_size == 0:
            entry.reason = "empty file (0 bytes)"
        elif PAIR_SECOND_STEM in path.stem and pair_partner(path) is not None:
            partner = pair_partner(path)
            assert partner is not None
            entry.reason = (f"second half of the SDXL pair "
                            f"{partner.relative_to(self.folder).as_posix()}")
        else:
            embedding = load_embedding(path)
            if not isinstance(embedding.name, str) or not embedding.name.strip():
                entry.reason = f"stored embedding name {embedding.name!r} is empty or only whitespace"
            else:
                entry.embedding = embedding
        return entry

    def _index(self) -> None:
        """Rebuild the name and path tables from the cached entries; each table is filled aside and then
        published by one assignment, so a listing on another thread never iterates a half-filled one."""
        candidates: dict[str, list[LibraryEntry]] = {}
        by_path: dict[str, LibraryEntry] = {}
        for relative in sorted(self._files):
            entry = self._files[relative][1]
            if self._usable(entry) is None:
                continue
            by_path.setdefault(entry.path_key, entry)
            assert entry.embedding is not None
            candidates.setdefault(entry.embedding.name, []).append(entry)
        by_name: dict[str, LibraryEntry] = {}
        collisions: dict[str, list[str]] = {}
        for name, entries in candidates.items():
            entries.sort(key=lambda e: (e.relative_path.count("/"), e.relative_path))
            by_name[name] = entries[0]
            if len(entries) > 1:
                collisions[name] = [e.relative_path for e in entries]
        # A path key that is also another embedding's name stays that name (and is reported).
        for path_key, entry in by_path.items():
            owner = by_name.get(path_key)
            if owner is not None and owner is not entry and entry.embedding is not None:
                clash = collisions.setdefault(path_key, [owner.relative_path])
                if entry.relative_path not in clash:
                    clash.append(entry.relative_path)
        self._by_path, self._by_name, self.collisions = by_path, by_name, collisions

    def _usable(self, entry: LibraryEntry) -> Embedding | None:
        if entry.embedding is None:
            return None
        if self.family is not None and entry.embedding.mismatch(self.family):
            return None
        return entry.embedding

    # -- results
    @property
    def entries(self) -> list[LibraryEntry]:
        """Every file, sorted by relative path; family mismatches carry their reason."""
        result = []
        files = self._files  # one scan, even if a reload publishes the next meanwhile
        for relative in sorted(files):
            entry = files[relative][1]
            if entry.embedding is not None and self._usable(entry) is None:
                assert self.family is not None
                entry = LibraryEntry(relative, None, entry.embedding.mismatch(self.family))
            result.append(entry)
        return result

    @property
    def loaded(self) -> dict[str, Embedding]:
        """Name -> embedding for every usable name (collision winners only)."""
        return {name: entry.embedding for name, entry in sorted(self._by_name.items())
                if entry.embedding is not None}

    @property
    def skipped(self) -> dict[str, str]:
        """Relative path -> reason for every file not loaded."""
        return {e.relative_path: e.reason for e in self.entries if e.reason is not None}

    @property
    def shadowed(self) -> dict[str, Embedding]:
        """Path key -> embedding for every usable file that lost its name to another file (a collision
        loser) and that its path key reaches: the key is no embedding's name and no other file's path."""
        by_name, by_path = self._by_name, self._by_path
        winners = {id(entry) for entry in by_name.values()}
        return {key: entry.embedding for key, entry in sorted(by_path.items())
                if id(entry) not in winners and key not in by_name and entry.embedding is not None}

    def names(self) -> list[str]:
        return sorted(self._by_name)

    def path_keys(self, name: str) -> list[str]:
        """Relative paths without extension that also refer to the embedding `name`."""
        entry = self._by_name.get(name)
        if entry is None:
            return []
        key = entry.path_key
        if key != name and (key in self._by_name or self._by_path.get(key) is not entry):
            return []  # the key is another embedding's name, or another file's path
        return [key]

    def get(self, name: str) -> Embedding | None:
        """Embedding by its (case-sensitive) name."""
        entry = self._by_name.get(name)
        return entry.embedding if entry is not None else None

    def by_path(self, path_key: str) -> Embedding | None:
        """Embedding by relative path without extension ("sub/name"); any file, even shadowed."""
        entry = self._by_path.get(path_key.replace(os.sep, "/").strip("/"))
        return entry.embedding if entry is not None else None

    def lookup(self, reference: str) -> Embedding | None:
        """By name first, then by relative path (what `embedding:REFERENCE` means)."""
        return self.get(reference) or self.by_path(reference)

    def __getitem__(self, name: str) -> Embedding:
        embedding = self.get(name)
        if embedding is None:
            raise KeyError(name)
        return embedding

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    def __len__(self) -> int:
        return len(self._by_name)

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


def _signature(path: Path) -> Signature | None:
    try:
        stat = path.stat()
        partner = pair_partner(path) if path.suffix.lower() in EMBEDDING_SUFFIXES else None
        partner_stat = None
        if partner is not None:
            other = partner.stat()
            partner_stat = (other.st_mtime_ns, other.st_size)
    except OSError:  # vanished or a broken link
        return None
    return (stat.st_mtime_ns, stat.st_size), partner_stat
