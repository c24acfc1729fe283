"""The machine-readable reports of prompt reading and encoding, shared by the CLI and the service.

One builder per report, so `tiengine parse --json`, `tiengine tokenize --json` and `tiengine encode --out`
print and write exactly what `tiengine serve`'s `/tiengine/v1/parse`, `tokenize` and `encode` answer:

- `parse_report(prompt, steps)`: extra-network tags removed -> AND parts -> per-part schedule -> per-entry
  attention fragments (the object documented in tiengine.cli.parse).
- `extra_network_report(tag)`: one removed `<kind:...>` tag as a JSON object (tiengine.cli.parse documents it).
- `tokenize_report(prompt, tokenizer, vocabulary, family=, options=)`: 77-token chunks with weights and
  embedding slots, unresolved and skipped names, warnings (the object documented in tiengine.cli.tokenize).
- `conditioning_tensors(conditioning)` / `conditioning_metadata(...)` / `conditioning_file(...)`: the
  tensors, the `tiengine` metadata JSON and the safetensors bytes of `tiengine encode` (tensor names and
  metadata keys documented in tiengine.cli.encode).

Pad ids per family (FAMILY_PAD_IDS) are the text encoders' `pad_token_id`s: CLIP-L pads with EOS (49407),
OpenCLIP (SD2's ViT-H, SDXL's bigG) with 0.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

import torch
from safetensors.torch import save

from tiengine.io.metadata import valid_text
from tiengine.text.conditioning import EncodeOptions, encoder_token_ids, tokenize_texts
from tiengine.text.extra_networks import (
    HYPERNET_KINDS,
    LORA_KINDS,
    ExtraNetworkTag,
    hypernet_arguments,
    lora_arguments,
    strip_extra_networks,
)
from tiengine.text.prompt import (
    DEFAULT_LIMITS,
    PromptLimits,
    parse_prompt_attention,
    prompt_schedule,
    split_and,
)

if TYPE_CHECKING:
    from tiengine.engine import Engine
    from tiengine.results import Conditioning, ScheduledConditioning
    from tiengine.text.tokenizer import ClipTokenizer
    from tiengine.text.vocabulary import EmbeddingVocabulary

FAMILY_PAD_IDS = {"sd1": (49407,), "sd2": (0,), "sdxl": (49407, 0)}  # per text encoder, in order
CONDITIONING_METADATA_KEY = "tiengine"  # the safetensors metadata key holding the JSON report


def parse_report(prompt: str, steps: int, *, second_order: bool = False,
                 limits: PromptLimits = DEFAULT_LIMITS) -> dict:
    """Tags removed -> AND parts -> per-part schedule -> per-entry attention fragments, as the encoder reads
    `prompt` over `steps` sampling steps."""
    stripped = strip_extra_networks(prompt, limits=limits)
    parts = []
    for text, weight in split_and(stripped.text, limits=limits):
        schedule = [
            {
                "until_step": until_step,
                "text": scheduled_text,
                "fragments": [list(fragment) for fragment in parse_prompt_attention(scheduled_text, limits=limits)],
            }
            for until_step, scheduled_text in prompt_schedule(text, steps, second_order=second_order, limits=limits)
        ]
        parts.append({"text": text, "weight": weight, "schedule": schedule})
    return {
        "prompt": prompt,
        "text": stripped.text,
        "extra_networks": [extra_network_report(tag) for tag in stripped.tags],
        "parts": parts,
    }


def extra_network_report(tag: ExtraNetworkTag) -> dict:
    """One tag as a JSON object (tiengine.cli.parse's docstring); raises NetworkError on a bad value."""
    record: dict = {"kind": tag.kind, "name": tag.name, "where": tag.where, "text": tag.text,
                    "start": tag.start, "end": tag.end}
    if tag.kind in LORA_KINDS:
        arguments = lora_arguments(tag)
        record.update(te_multiplier=arguments.te_multiplier, unet_multiplier=arguments.unet_multiplier,
                      dyn_dim=arguments.dyn_dim)
    elif tag.kind in HYPERNET_KINDS:
        name, multiplier = hypernet_arguments(tag)
        record.update(name=name, multiplier=multiplier)  # A1111's hypernet name is items[0], "=" or not
    else:
        record["items"] = list(tag.items)
        known = ", ".join(LORA_KINDS + HYPERNET_KINDS)
        record["note"] = f"unknown extra network kind {tag.kind!r} (known: {known}): removed, not applied"
    if not record["name"] and "note" not in record:
        record["note"] = "names no network (the first argument that is not key=value is the name): not applied"
    return record


def tokenize_report(prompt: str, tokenizer: ClipTokenizer, vocabulary: EmbeddingVocabulary, *, family: str,
                    options: EncodeOptions, limits: PromptLimits = DEFAULT_LIMITS) -> dict:
    """`prompt`'s chunks as `tokenizer` (holding `vocabulary`'s embeddings) reads it for a `family` model.

    Token ids are those of the family's first encoder; SDXL adds `tokens_2` for its second encoder's padding.
    `options.clip_skip` plays no part (it changes the encoder's output, not its input)."""
    stripped = strip_extra_networks(prompt, limits=limits)
    result = tokenize_texts([stripped.text], tokenizer, options, limits=limits)[0]
    chunks = []
    for chunk in result.chunks:
        record = {}
        for index, pad_id in enumerate(FAMILY_PAD_IDS[family]):
            ids = encoder_token_ids([chunk], pad_id, torch.device("cpu"))[0].tolist()  # (77,)
            record["tokens" if index == 0 else f"tokens_{index + 1}"] = ids
        record["weights"] = [round(weight, 6) for weight in chunk.weights]
        record["embeddings"] = [[e.slot, e.name, e.n_vectors] for e in chunk.embeddings]
        chunks.append(record)
    extra_networks = [extra_network_report(tag) for tag in stripped.tags]
    for record in extra_networks:
        if "items" in record and record["kind"] in vocabulary.embeddings:
            record["note"] += f"; {record['kind']} is an embedding: write it without <...> to use it"
    return {
        "prompt": prompt,
        "text": stripped.text,
        "extra_networks": extra_networks,
        "token_count": result.token_count,
        "chunks": chunks,
        "unresolved": result.unresolved,
        "skipped": [[m.name, m.reason] for m in vocabulary.skipped_mentions(stripped.text)],
        "warnings": result.warnings,
    }


def conditioning_tensors(conditioning: Conditioning) -> dict[str, torch.Tensor]:
    """`positive.<part>.<entry>.context` (1, 77*k, C) [and `.pooled` (1, P)], `negative.<entry>....`; CPU."""
    tensors: dict[str, torch.Tensor] = {}
    for part_index, (scheduled, _) in enumerate(conditioning.positive):
        _add_tensors(tensors, f"positive.{part_index}", scheduled)
    _add_tensors(tensors, "negative", conditioning.negative)
    return tensors


def conditioning_metadata(engine: Engine, conditioning: Conditioning, prompt: str, negative_prompt: str, *,
                          steps: int, second_order: bool, options: EncodeOptions) -> dict:
    """The report `tiengine encode` stores under the metadata key `tiengine` (tiengine.cli.encode)."""
    defaults = EncodeOptions()
    return {
        "prompt": prompt,
        "negative_prompt": negative_prompt,
        "steps": steps,
        "second_order": second_order,
        "clip_skip": options.clip_skip,
        "emphasis": options.emphasis,
        # the other encode options, where they differ from A1111's
        **{name: getattr(options, name) for name in ("comma_backtrack", "bare_names", "explicit_embedding_syntax",
                                                      "keep_embeddings_on_backtrack")
           if getattr(options, name) != getattr(defaults, name)},
        "parts": [{"weight": weight, "schedule": _schedule(scheduled)} for scheduled, weight in conditioning.positive],
        "negative": {"schedule": _schedule(conditioning.negative)},
        "applied_embeddings": [
            {"name": a.name, "short_hash": a.short_hash, "prompt": a.prompt, "part": a.part,
             "schedule_entry": a.schedule_entry, "chunk": a.chunk, "slot": a.slot, "vectors": a.n_vectors,
             "weight": a.weight}
            for a in conditioning.applied
        ],
        "skipped_embeddings": [{"name": m.name, "reason": m.reason} for m in conditioning.skipped],
        "extra_networks": [report.as_dict() for report in conditioning.networks],
        "lora_hashes": conditioning.active_networks.lora_hashes(),
        "warnings": conditioning.warnings,
        "model": valid_text(str(engine.model_path)) if engine.model_path else None,
        "model_hash": engine.model_hash(),
    }


def conditioning_file(tensors: dict[str, torch.Tensor], metadata: dict) -> bytes:
    """The safetensors bytes of `tiengine encode --out`: the tensors and the report as JSON."""
    return save(tensors, metadata={CONDITIONING_METADATA_KEY: json.dumps(metadata, ensure_ascii=False)})


def _schedule(scheduled: ScheduledConditioning) -> list:
    """[last_step, text, token count] per schedule entry."""
    return [[last_step, text, count] for (last_step, _, _), text, count in
            zip(scheduled.entries, scheduled.texts, scheduled.token_counts)]


def _add_tensors(tensors: dict[str, torch.Tensor], prefix: str, scheduled: ScheduledConditioning) -> None:
    for entry_index, (_, context, pooled) in enumerate(scheduled.entries):
        tensors[f"{prefix}.{entry_index}.context"] = context.detach().contiguous().cpu()
        if pooled is not None:
            tensors[f"{prefix}.{entry_index}.pooled"] = pooled.detach().contiguous().cpu()
