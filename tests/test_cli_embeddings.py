"""`tiengine embeddings list | inspect | convert` through tiengine.cli.main."""

from __future__ import annotations

import hashlib
import json
import os
import sys

import torch
from embedding_builders import a1111_pt, safetensors_file, vectors
from safetensors.torch import load_file

from tiengine.cli import main


def run(capsys, *argv: str) -> tuple[int, str, str]:
    status = main(["embeddings", *argv])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_inspect_json(tmp_path, capsys):
    clip_l, clip_g = vectors(4, 768, 1), vectors(4, 1280, 2)
    path = safetensors_file(tmp_path / "Pony-Neg.safetensors", {"clip_l": clip_l, "clip_g": clip_g})
    status, out, err = run(capsys, "inspect", str(path), "--json")
    assert status == 0 and err == ""
    info = json.loads(out)
    assert info["name"] == "Pony-Neg" and info["format"] == "sdxl" and info["family"] == "sdxl"
    assert info["vectors"] == 4 and info["widths"] == {"clip_l": 768, "clip_g": 1280}
    assert info["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert info["short_hash"] == info["sha256"][:12]
    assert info["norms"]["clip_g"] == [round(n, 6) for n in clip_g.norm(dim=1).tolist()]


def test_inspect_text(tmp_path, capsys):
    path = a1111_pt(tmp_path / "bad-hands-5.pt", vectors(2, 768, 3), name="bad-hands-5", step=1419)
    status, out, _ = run(capsys, "inspect", str(path))
    assert status == 0
    assert "name:       bad-hands-5" in out and "format:     a1111 (torch_zip)" in out
    assert "family:     sd1  (clip_l 768)" in out and "step:       1419" in out
    assert "vectors:    2" in out


def test_refused_files_exit_nonzero_with_reason(tmp_path, capsys):
    marker = tmp_path / "marker"

    class Payload:
        def __reduce__(self):
            return os.system, (f'"{sys.executable}" -c "open(r\'{marker}\', \'w\').close()"',)

    torch.save({"x": Payload()}, tmp_path / "evil.pt")
    status, out, err = run(capsys, "inspect", str(tmp_path / "evil.pt"), "--json")
    assert status == 2 and out == "" and "refused to load global" in err and "system" in err
    assert not marker.exists()
    t5 = safetensors_file(tmp_path / "t5.safetensors", {"t5xxl": vectors(2, 4096)})
    status, _, err = run(capsys, "inspect", str(t5))
    assert status == 2 and "not a CLIP embedding: t5xxl 4096" in err
    (tmp_path / "zero.pt").write_bytes(b"")
    status, _, err = run(capsys, "convert", str(tmp_path / "zero.pt"), str(tmp_path / "o.pt"))
    assert status == 2 and "file is empty" in err and not (tmp_path / "o.pt").exists()


def test_list_json_and_text(tmp_path, capsys):
    (tmp_path / "sub").mkdir()
    a1111_pt(tmp_path / "a.pt", vectors(2, 768, 4))
    safetensors_file(tmp_path / "sub" / "a.safetensors", {"emb_params": vectors(1, 768, 5)})
    safetensors_file(tmp_path / "sd2.safetensors", {"emb_params": vectors(1, 1024, 6)})
    (tmp_path / "notes.txt").write_text("x")
    status, out, _ = run(capsys, "list", str(tmp_path), "--family", "sd1", "--json")
    assert status == 0
    listing = json.loads(out)
    assert [(e["name"], e["path"], e["shadowed_by"]) for e in listing["loaded"]] == [
        ("a", "a.pt", None), ("a", "sub/a.safetensors", "a.pt")]
    assert listing["skipped"] == [
        {"path": "notes.txt", "reason": "not an embedding file type (.txt)"},
        {"path": "sd2.safetensors", "reason": "made for SD2 (1024), this model is SD1 (768)"}]
    assert listing["collisions"] == [{"name": "a", "winner": "a.pt", "shadowed": ["sub/a.safetensors"]}]
    status, out, _ = run(capsys, "list", str(tmp_path))
    assert status == 0 and "3 loaded, 1 skipped" in out and "notes.txt: not an embedding" in out
    status, _, err = run(capsys, "list", str(tmp_path / "absent"))
    assert status == 2 and "not a folder" in err


def test_convert_every_format_and_overwrite(tmp_path, capsys):
    tensor = vectors(3, 768, 7)
    source = a1111_pt(tmp_path / "style.pt", tensor, name="style", step=9)
    for suffix, fmt in ((".safetensors", None), (".png", None), (".bin", "pt")):
        target = tmp_path / f"out{suffix}"
        args = ["convert", str(source), str(target)] + (["--format", fmt] if fmt else [])
        status, out, err = run(capsys, *args)
        assert status == 0 and err == "" and f"wrote {target}" in out
        status, out, _ = run(capsys, "inspect", str(target), "--json")
        info = json.loads(out)
        assert info["vectors"] == 3 and info["step"] == 9 and info["family"] == "sd1"
    assert torch.equal(load_file(str(tmp_path / "out.safetensors"))["emb_params"], tensor)
    before = (tmp_path / "out.safetensors").read_bytes()
    other = safetensors_file(tmp_path / "other.safetensors", {"emb_params": vectors(1, 768, 8)})
    status, _, err = run(capsys, "convert", str(other), str(tmp_path / "out.safetensors"))
    assert status == 2 and "already exists" in err
    assert (tmp_path / "out.safetensors").read_bytes() == before
    status, _, _ = run(capsys, "convert", str(other), str(tmp_path / "out.safetensors"), "--overwrite")
    assert status == 0 and load_file(str(tmp_path / "out.safetensors"))["emb_params"].shape == (1, 768)


def test_bundled_embedding_by_name(tmp_path, capsys):
    lora = safetensors_file(tmp_path / "lora.safetensors", {
        "lora_te_x.lora_up.weight": torch.zeros(2, 2),
        "bundle_emb.one.string_to_param.*": vectors(2, 768, 9),
        "bundle_emb.two.clip_l": vectors(1, 768, 10), "bundle_emb.two.clip_g": vectors(1, 1280, 11)})
    status, _, err = run(capsys, "inspect", str(lora))
    assert status == 2 and "2 bundled embeddings (one, two)" in err
    status, out, _ = run(capsys, "inspect", str(lora), "--name", "two", "--json")
    assert status == 0 and json.loads(out)["family"] == "sdxl" and json.loads(out)["name"] == "two"
    status, _, err = run(capsys, "inspect", str(lora), "--name", "three")
    assert status == 2 and "no bundled embedding 'three' (has one, two)" in err


def test_convert_refusal_names_the_flag_before_reading_the_input(tmp_path, capsys):
    target = tmp_path / "out.safetensors"
    target.write_bytes(b"mine")
    # IN does not exist: the refusal comes first, so a large IN would not be read either
    status, _, err = run(capsys, "convert", str(tmp_path / "absent.pt"), str(target))
    assert status == 2 and "already exists" in err and "pass --overwrite" in err
    assert "absent.pt" not in err and target.read_bytes() == b"mine"


def test_every_refusal_message_names_the_flag_and_the_argument(tmp_path):
    from tiengine.embeddings.embedding import load_embedding, save_embedding
    from tiengine.errors import TiengineError
    from tiengine.io.atomic import atomic_write_bytes

    source = a1111_pt(tmp_path / "style.pt", vectors(1, 768, 7), name="style")
    messages = []
    for write in (lambda: atomic_write_bytes(source, b""), lambda: save_embedding(load_embedding(source), source)):
        try:
            write()
        except TiengineError as error:
            messages.append(str(error))
    assert len(messages) == 2
    assert all("pass --overwrite (overwrite=True in Python) to replace it" in message for message in messages)


def _gradient(width: int, height: int):
    from PIL import Image

    y, x = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    rgb = torch.stack([x * 255 // width, y * 255 // height, 255 - x * 255 // width], dim=-1)
    return Image.fromarray(rgb.to(torch.uint8).numpy(), "RGB")


def test_convert_with_preview_writes_a_card_that_loads_back_bit_identically(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    from tiengine.embeddings.embedding import load_embedding

    tensor = vectors(2, 768, 12)
    source = a1111_pt(tmp_path / "bad-artist.pt", tensor, name="bad-artist", step=1419)
    picture_path = tmp_path / "picture.png"
    picture = _gradient(256, 192)
    picture.save(picture_path)
    card_path, plain_path = tmp_path / "bad-artist.png", tmp_path / "plain.png"
    status, _, err = run(capsys, "convert", str(source), str(card_path), "--preview", str(picture_path))
    assert status == 0 and err == ""
    assert run(capsys, "convert", str(source), str(plain_path))[0] == 0
    card, plain = load_embedding(card_path), load_embedding(plain_path)
    assert torch.equal(card.vectors["clip_l"], tensor) and card.step == 1419
    assert torch.equal(plain.vectors["clip_l"], tensor)
    with Image.open(card_path) as image:
        pixels = np.asarray(image.convert("RGB")).astype(int)
    block = (pixels.shape[1] - picture.width - 2) // 2
    shown = pixels[:, block + 1 : block + 1 + picture.width]  # the card between the carrier columns
    given = np.asarray(picture).astype(int)
    assert shown.shape == given.shape
    middle = slice(picture.height // 3, 2 * picture.height // 3)
    assert np.array_equal(shown[middle], given[middle])  # the picture itself is kept
    assert shown[:3].sum() < 0.5 * given[:3].sum()  # the top band is shaded
    title = shown[: picture.height // 5, : picture.width // 2]
    assert (title.min(axis=2) > 200).sum() > 50  # white caption text in the top band
    footer = shown[-picture.height // 10 :, picture.width // 2 :]
    assert (footer.min(axis=2) > 200).sum() > 10  # "2v 1419s" at the bottom right


def test_preview_needs_png_output_and_a_readable_image(tmp_path, capsys):
    source = a1111_pt(tmp_path / "style.pt", vectors(1, 768, 7), name="style")
    status, _, err = run(capsys, "convert", str(source), str(tmp_path / "o.safetensors"), "--preview", str(source))
    assert status == 2 and "only PNG output" in err
    status, _, err = run(capsys, "convert", str(source), str(tmp_path / "o.png"), "--preview", str(source))
    assert status == 2 and "not a readable image" in err and not (tmp_path / "o.png").exists()
