"""NetworkLibrary (LoRA and hypernetwork folders): names, kohya aliases, paths, collisions, and a reload seen
from another thread."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from tiengine.errors import NetworkError
from tiengine.networks import library as library_module
from tiengine.networks.library import NetworkLibrary


def lora_file(path, alias: str | None = None):
    path.parent.mkdir(parents=True, exist_ok=True)
    tensors = {"lora_unet_x.lora_down.weight": torch.zeros(1, 4), "lora_unet_x.lora_up.weight": torch.zeros(4, 1)}
    save_file(tensors, str(path), metadata={"ss_output_name": alias} if alias else None)
    return path


@pytest.fixture
def folder(tmp_path):
    lora_file(tmp_path / "ink.safetensors", alias="ink_v2_final")
    lora_file(tmp_path / "styles" / "ink.safetensors")  # deeper: loses the name, keeps its path
    lora_file(tmp_path / "styles" / "paper.safetensors")
    (tmp_path / "notes.txt").write_text("not a network")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    return tmp_path


def test_names_aliases_paths_and_collisions(folder):
    library = NetworkLibrary(folder, "lora")
    assert library.names() == ["ink", "paper"] and len(library) == 2
    assert library.lookup("ink").relative_path == "ink.safetensors"
    assert library.lookup("ink_v2_final").relative_path == "ink.safetensors"
    assert library.lookup("styles/ink").relative_path == "styles/ink.safetensors"
    assert library.collisions == {"ink": ["ink.safetensors", "styles/ink.safetensors"]}
    assert library.skipped == {"empty.safetensors": "empty file (0 bytes)",
                               "notes.txt": "not a lora file type (.txt; expected .safetensors, .pt, .ckpt)"}
    with pytest.raises(NetworkError, match="not a folder"):
        NetworkLibrary(folder / "absent", "lora")


def test_a_reading_thread_sees_one_whole_scan_while_a_reload_indexes(folder, monkeypatch):
    """The HTTP service lists a library on request threads while its worker thread reloads it: lookups taken
    in the middle of a reload's indexing must answer from the previous scan, whole."""
    library = NetworkLibrary(folder, "lora")

    def listing() -> tuple:
        return (library.names(), [f.relative_path for f in library.files], library.lookup("styles/paper"),
                library.lookup("ink_v2_final"), dict(library.collisions))

    before = listing()
    lora_file(folder / "new.safetensors")
    seen_mid_index = []
    path_key = library_module.NetworkFile.path_key

    def path_key_and_list(entry):
        if entry.name == "new":  # only the files the reload indexes after the new scan is in place
            seen_mid_index.append(listing())
        return path_key.fget(entry)

    monkeypatch.setattr(library_module.NetworkFile, "path_key", property(path_key_and_list))
    library.reload()
    monkeypatch.undo()
    assert seen_mid_index and all(seen[0] == before[0] and seen[2:] == before[2:] for seen in seen_mid_index)
    assert library.lookup("new") is not None and "new" not in before[0]
