"""NetworkLibrary: a folder of LoRA / LyCORIS files or of hypernetworks, as names -> files.

AUTOMATIC1111's conventions (`models/Lora`, `models/hypernetworks`): every file below the folder with an
accepted extension is a network, sub-folders included; its name is the file stem (`<lora:stem:0.8>`).
LoRA files also answer to their training alias, the `ss_output_name` of a `.safetensors` header (A1111's
"alias from file"), when no other file has that name and no two files share the alias. Accepted
extensions: `.safetensors`, `.pt`, `.ckpt` for LoRA (A1111's Lora folder scan), `.pt` for hypernetworks.

Names are case-sensitive and collide as embedding names do (tiengine.embeddings.library): the shallowest
file wins, then the first by relative path; every file stays reachable by its relative path without
extension (`<lora:styles/ink:1>`), and collisions are reported. The walk is tiengine.io.folders'
bounded walk (links not followed out of the folder, depth and file count bounded, each cut reported).
Scanning reads nothing but file sizes and, for `.safetensors` LoRA files, the JSON header (for the
alias); the tensors are read when a prompt names the network (tiengine.networks.active).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from tiengine.embeddings.library import ReloadReport
from tiengine.errors import NetworkError
from tiengine.io.folders import (
    MAX_SCAN_DEPTH,
    MAX_SCAN_FILES,
    bounded_walk,
    describe_read_error,
)
from tiengine.weights_conv.readers import SafetensorsFile

NetworkKind = Literal["lora", "hypernetwork"]
NETWORK_SUFFIXES: dict[str, tuple[str, ...]] = {
    "lora": (".safetensors", ".pt", ".ckpt"),
    "hypernetwork": (".pt",),
}
ALIAS_METADATA_KEY = "ss_output_name"  # kohya-ss sd-scripts' training output name
FileSignature = tuple[int, int]  # (st_mtime_ns, st_size)


@dataclass(frozen=True)
class NetworkFile:
    """One usable file of the folder."""

    path: Path
    relative_path: str  # POSIX, with extension
    signature: FileSignature
    alias: str | None = None  # ss_output_name, LoRA .safetensors only

    @property
    def name(self) -> str:
        return Path(self.relative_path).stem

    @property
    def path_key(self) -> str:
        """Relative path without extension: `<lora:sub/name>`."""
        stem, _ = os.path.splitext(self.relative_path)
        return stem


@dataclass
class _Scan:
    files: dict[str, NetworkFile] = field(default_factory=dict)  # relative path -> file
    skipped: dict[str, str] = field(default_factory=dict)  # relative path -> reason


class NetworkLibrary:
    """The LoRA or hypernetwork files of one folder by name, alias and relative path (module docstring)."""

    def __init__(
        self,
        folder: str | os.PathLike[str],
        kind: NetworkKind,
        *,
        max_depth: int = MAX_SCAN_DEPTH,
        max_files: int = MAX_SCAN_FILES,
        follow_links: bool = False,
    ) -> None:
        if kind not in NETWORK_SUFFIXES:
            raise NetworkError(f"unknown network kind {kind!r} (expected {', '.join(NETWORK_SUFFIXES)})")
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise NetworkError(f"{self.folder}: not a folder ({kind} folder)")
        self.kind = kind
        self.max_depth = max_depth
        self.max_files = max_files
        self.follow_links = follow_links
        self._scan = _Scan()
        self._by_name: dict[str, NetworkFile] = {}
        self._by_path: dict[str, NetworkFile] = {}
        self._by_alias: dict[str, NetworkFile] = {}
        self.collisions: dict[str, list[str]] = {}  # name -> [winner, shadowed...] (relative paths)
        self.reload()

    def reload(self) -> ReloadReport:
        """Re-scan the folder; files whose size and modification time are unchanged are not re-read."""
        previous = self._scan
        scan = _Scan()
        for path, relative, reason in bounded_walk(self.folder, max_depth=self.max_depth, max_files=self.max_files,
                                                   follow_links=self.follow_links):
            reason = reason or self._reason_to_skip(path)
            if reason is not None:
                scan.skipped[relative] = reason
                continue
            try:
                stat = path.stat()
            except OSError:
                continue  # vanished during the scan
            signature = (stat.st_mtime_ns, stat.st_size)
            known = previous.files.get(relative)
            if known is not None and known.signature == signature:
                scan.files[relative] = known
                continue
            try:
                scan.files[relative] = NetworkFile(path, relative, signature, self._alias(path))
            except Exception as error:  # one bad file must not spoil the folder  # noqa: BLE001
                scan.skipped[relative] = describe_read_error(error, str(path))
        before = {**{relative: entry.signature for relative, entry in previous.files.items()}, **previous.skipped}
        after = {**{relative: entry.signature for relative, entry in scan.files.items()}, **scan.skipped}
        report = ReloadReport(
            added=sorted(set(after) - set(before)),
            changed=sorted(relative for relative in set(after) & set(before) if after[relative] != before[relative]),
            removed=sorted(set(before) - set(after)),
        )
        self._scan = scan
        self._index()
        return report

    def _reason_to_skip(self, path: Path) -> str | None:
        suffix = path.suffix.lower()
        if ".preview." in path.name.lower():
            return "preview image"
        if suffix not in NETWORK_SUFFIXES[self.kind]:
            return f"not a {self.kind} file type ({suffix or 'no extension'}; expected " \
                   f"{', '.join(NETWORK_SUFFIXES[self.kind])})"
        if not path.stem.strip():
            return "file name is empty or only whitespace before the extension"
        try:
            if path.stat().st_size == 0:
                return "empty file (0 bytes)"
        except OSError as error:
            return f"could not be read ({error.strerror or type(error).__name__})"
        return None

    def _alias(self, path: Path) -> str | None:
        if self.kind != "lora" or path.suffix.lower() != ".safetensors":
            return None
        with SafetensorsFile(path) as source:  # header only: validated, no tensor data read
            alias = source.metadata.get(ALIAS_METADATA_KEY)
        return alias.strip() if isinstance(alias, str) and alias.strip() else None

    def _index(self) -> None:
        """Rebuild the lookup tables from the scan; each is filled aside and published by one assignment, so a
        listing on another thread never iterates a half-filled one."""
        candidates: dict[str, list[NetworkFile]] = {}
        by_path: dict[str, NetworkFile] = {}
        for relative in sorted(self._scan.files):
            entry = self._scan.files[relative]
            by_path.setdefault(entry.path_key, entry)
            candidates.setdefault(entry.name, []).append(entry)
        by_name: dict[str, NetworkFile] = {}
        collisions: dict[str, list[str]] = {}
        for name, entries in candidates.items():
            entries.sort(key=lambda e: (e.relative_path.count("/"), e.relative_path))
            by_name[name] = entries[0]
            if len(entries) > 1:
                collisions[name] = [e.relative_path for e in entries]
        aliases: dict[str, list[NetworkFile]] = {}
        for entry in self._scan.files.values():
            if entry.alias is not None and entry.alias != entry.name:
                aliases.setdefault(entry.alias, []).append(entry)
        by_alias = {alias: entries[0] for alias, entries in aliases.items() if len(entries) == 1 and alias not in by_name}
        self._by_path, self._by_name, self._by_alias, self.collisions = by_path, by_name, by_alias, collisions

    # -- results
    @property
    def files(self) -> list[NetworkFile]:
        """Every usable file, sorted by relative path."""
        files = self._scan.files  # one scan, even if a reload publishes the next meanwhile
        return [files[relative] for relative in sorted(files)]

    @property
    def skipped(self) -> dict[str, str]:
        """Relative path -> reason for every file that is not a usable network file."""
        return dict(sorted(self._scan.skipped.items()))

    def names(self) -> list[str]:
        return sorted(self._by_name)

    def lookup(self, reference: str) -> NetworkFile | None:
        """By name, then by alias (ss_output_name), then by relative path without extension."""
        found = self._by_name.get(reference) or self._by_alias.get(reference)
        if found is None:
            found = self._by_path.get(reference.replace(os.sep, "/").strip("/"))
        return found

    def __contains__(self, reference: object) -> bool:
        return isinstance(reference, str) and self.lookup(reference) is not None

    def __len__(self) -> int:
        return len(self._by_name)
