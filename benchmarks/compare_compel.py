"""One weighted prompt's conditioning from tiengine (A1111's rules) and from compel, on the same model.

    python benchmarks/compare_compel.py [--json compel.json]

The model is a CLIP-L text encoder of SD 1.x's architecture (TextEncoderConfig.sd1_clip_l) with seeded random
weights (layer norms perturbed, as tests/model_builders.py perturbs them), loaded into transformers'
CLIPTextModel for compel and read by tiengine through that same object (PipelineEncoder.from_pipeline shares
its tensors). The tokenizer is OpenAI CLIP's vocabulary (tests/test_tokenizer.py writes its files). compel
(https://github.com/damian0815/compel, installed on its own: `pip install --no-deps compel pyparsing`) has its
own syntax, so each row writes the same weights in each tool's spelling: A1111 `(red:1.3)` is compel `(red)1.3`.

Rows: the difference between the two contexts (1, 77, 768): largest and mean absolute difference, over the
weighted tokens and over the others. The README ("Using tiengine from diffusers") quotes this table.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from importlib import metadata
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from tiengine.integrations.diffusers import PipelineEncoder
from tiengine.io.atomic import atomic_write_bytes
from tiengine.models.text_encoder import ClipTextEncoder, TextEncoderConfig

SEED = 0
# (label, A1111 prompt, tiengine emphasis, compel prompt, positions of the weighted tokens (BOS is 0))
CASES = [
    ("no weights", "a red cat, blue sky", "original", "a red cat, blue sky", []),
    ("(red:1.3), A1111 emphasis", "a (red:1.3) cat, blue sky", "original", "a (red)1.3 cat, blue sky", [2]),
    ("(red:1.3), tiengine lerp emphasis", "a (red:1.3) cat, blue sky", "lerp", "a (red)1.3 cat, blue sky", [2]),
    ("(blue sky:0.8), A1111 emphasis", "a red cat, (blue sky:0.8)", "original", "a red cat, (blue sky)0.8", [5, 6]),
    ("(blue sky:0.8), tiengine lerp emphasis", "a red cat, (blue sky:0.8)", "lerp", "a red cat, (blue sky)0.8",
     [5, 6]),
    ("both, A1111 emphasis", "a (red:1.3) cat, (blue sky:0.8)", "original", "a (red)1.3 cat, (blue sky)0.8",
     [2, 5, 6]),
]


def random_clip_l() -> ClipTextEncoder:
    torch.manual_seed(SEED)
    encoder = ClipTextEncoder(TextEncoderConfig.sd1_clip_l()).eval()
    with torch.no_grad():
        for module in encoder.modules():
            if isinstance(module, torch.nn.LayerNorm):
                module.weight.normal_(1.0, 0.2)
                module.bias.normal_(0.0, 0.2)
    return encoder


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = parser.parse_args()
    import compel
    import transformers
    from test_tokenizer import BPE_PATH, ReferenceClipTokenizer

    torch.set_num_threads(1)
    ours = random_clip_l()
    config = ours.config
    text_encoder = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        hidden_act=config.hidden_act, max_position_embeddings=77, eos_token_id=49407)).eval()
    text_encoder.load_state_dict({key.removeprefix("text_model."): value for key, value in ours.state_dict().items()})
    with tempfile.TemporaryDirectory() as folder:
        ReferenceClipTokenizer(BPE_PATH).write_hf_files(Path(folder))
        tokenizer = transformers.CLIPTokenizer.from_pretrained(folder, model_max_length=77)
    encoder = PipelineEncoder.from_pipeline(SimpleNamespace(text_encoder=text_encoder))
    weighting = compel.Compel(tokenizer=tokenizer, text_encoder=text_encoder)

    rows = []
    for label, a1111_prompt, emphasis, compel_prompt, weighted in CASES:
        with torch.no_grad():
            a1111 = encoder.encode(a1111_prompt, emphasis=emphasis).prompt_embeds[0]  # (77, 768)
            theirs = weighting(compel_prompt)[0]  # (77, 768)
        difference = (a1111 - theirs).abs().max(dim=-1).values  # (77,) per token
        others = [index for index in range(77) if index not in weighted]
        rows.append({
            "case": label, "a1111_prompt": a1111_prompt, "tiengine_emphasis": emphasis, "compel_prompt": compel_prompt,
            "max_abs": float(difference.max()), "mean_abs": float((a1111 - theirs).abs().mean()),
            "max_abs_weighted_tokens": float(difference[weighted].max()) if weighted else None,
            "max_abs_other_tokens": float(difference[others].max()),
        })

    with torch.no_grad():
        scale = float(encoder.encode(CASES[0][1]).prompt_embeds.abs().mean())
    print(f"# tiengine vs compel {metadata.version('compel')}: random-weight CLIP-L (seed {SEED}), fp32, torch "
          f"{torch.__version__}, transformers {transformers.__version__}, {platform.machine()}; "
          f"mean |context| {scale:.3g}")
    print("| case | A1111 prompt (tiengine emphasis) | compel prompt | max abs | mean abs | weighted tokens | others |")
    print("|---|---|---|---|---|---|---|")
    for row in rows:
        weighted_max = "-" if row["max_abs_weighted_tokens"] is None else f"{row['max_abs_weighted_tokens']:.3g}"
        print(f"| {row['case']} | `{row['a1111_prompt']}` ({row['tiengine_emphasis']}) | `{row['compel_prompt']}` | "
              f"{row['max_abs']:.3g} | {row['mean_abs']:.3g} | {weighted_max} | {row['max_abs_other_tokens']:.3g} |")
    if args.json is not None:
        atomic_write_bytes(args.json, json.dumps(rows, indent=2).encode("utf-8"))


if __name__ == "__main__":
    main()
