"""What the Engine returns: conditioning (per step, per AND part, with the embeddings report) and images.

`Conditioning` is `Engine.encode`'s result; `GenerationResult` is that of `generate`, `generate_batch` and
`img2img`, and `save` writes its images as PNG files with their A1111 `parameters` text
(tiengine.io.metadata). `stackable` says whether several prompts' conditioning can share one UNet batch;
`GenerationResult.join` puts the results of several sampling runs together in order.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from tiengine.errors import EngineError
from tiengine.io.atomic import WriteError, ensure_folder
from tiengine.io.metadata import format_name_hashes, format_parameters, save_png
from tiengine.networks.active import ActiveNetworks, NetworkReport
from tiengine.text.chunking import TokenizedPrompt
from tiengine.text.vocabulary import SkippedMention

if TYPE_CHECKING:
    from PIL import Image


@dataclass(frozen=True)
class AppliedEmbedding:
    """An embedding placed in an encoded text: which prompt, schedule entry, chunk and slots, weight."""

    name: str
    short_hash: str | None
    prompt: str  # "positive" or "negative"
    part: int  # AND part (0 for the negative prompt)
    schedule_entry: int
    chunk: int
    slot: int  # first slot in the chunk (BOS is 0)
    n_vectors: int
    weight: float


@dataclass
class ScheduledConditioning:
    """A prompt's conditioning per sampling step: entries (last_step, context (1, T, C), pooled (1, P) | None).

    The entry for denoiser call i (0-based) is the first with i <= last_step (A1111's rule)."""

    entries: list[tuple[int, torch.Tensor, torch.Tensor | None]]
    texts: list[str]
    token_counts: list[int]

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> ScheduledConditioning:
        """The same schedule with its tensors on `device` / in `dtype` (None: unchanged)."""
        def move(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.to(device=device, dtype=dtype)

        entries = [(last_step, move(context), move(pooled)) for last_step, context, pooled in self.entries]
        return ScheduledConditioning(entries, self.texts, self.token_counts)


@dataclass
class Conditioning:
    """`Engine.encode`'s result: AND parts with weights, the negative prompt, what happened to embeddings, and
    the extra-network tags of both prompts (`networks`: one report per tag; `active_networks`: those applied,
    whose text-encoder part this conditioning was computed with)."""

    positive: list[tuple[ScheduledConditioning, float]]
    negative: ScheduledConditioning
    applied: list[AppliedEmbedding] = field(default_factory=list)
    skipped: list[SkippedMention] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    networks: list[NetworkReport] = field(default_factory=list)
    active_networks: ActiveNetworks = field(default_factory=ActiveNetworks)

    def record(self, prompts: Sequence[TokenizedPrompt], hashes: Mapping[str, str | None], which: str,
               part: int) -> None:
        """Add one schedule's report: each entry's warnings, unresolved `embedding:NAME` references and
        placed embeddings (`which`: "positive" or "negative"; `part`: the AND part)."""
        for entry_index, tokenized in enumerate(prompts):
            self.warnings.extend(tokenized.warnings)
            self.warnings.extend(f"embedding:{name} names no loaded embedding" for name in tokenized.unresolved)
            for chunk_index, chunk in enumerate(tokenized.chunks):
                for placed in chunk.embeddings:
                    weight = chunk.weights[min(placed.slot, len(chunk.weights) - 1)]
                    self.applied.append(AppliedEmbedding(placed.name, hashes.get(placed.name), which, part, entry_index,
                                                         chunk_index, placed.slot, placed.n_vectors, weight))

    def add_skipped(self, mentions: Sequence[SkippedMention]) -> None:
        """Add skipped mentions, one per name (the first)."""
        seen = {mention.name for mention in self.skipped}
        for mention in mentions:
            if mention.name not in seen:
                seen.add(mention.name)
                self.skipped.append(mention)

    def ti_hashes(self) -> dict[str, str | None]:
        """Name -> short hash of each embedding used, in order of first use."""
        return {applied.name: applied.short_hash for applied in self.applied}

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> Conditioning:
        """The same conditioning with every tensor on `device` / in `dtype` (None: unchanged)."""
        return Conditioning(
            [(scheduled.to(device, dtype), weight) for scheduled, weight in self.positive],
            self.negative.to(device, dtype), self.applied, self.skipped, self.warnings, self.networks,
            self.active_networks,
        )


def stackable(conditionings: list[Conditioning]) -> bool:
    """Whether different prompts can share one UNet batch: the same AND weights and, per AND part, one
    context shape across every prompt and schedule entry."""
    weights = [[weight for _, weight in conditioning.positive] for conditioning in conditionings]
    if any(w != weights[0] for w in weights):
        return False
    for index in range(len(weights[0])):
        shapes = {(tuple(context.shape), None if pooled is None else tuple(pooled.shape))
                  for conditioning in conditionings for _, context, pooled in conditioning.positive[index][0].entries}
        if len(shapes) > 1:
            return False
    return True


def image_parameters(prompts: Sequence[str], negative_prompt: str, seeds: Sequence[int],
                     conditionings: Sequence[Conditioning], settings: Mapping[str, object],
                     per_image: Sequence[Mapping[str, object]] | None = None) -> list[str]:
    """Each image's `parameters` text: `settings` (in order, None left out) with its "Seed", "TI hashes" and
    its own `per_image` fields (keys listed in `settings` keep their place there)."""
    per_image = per_image or [{} for _ in prompts]
    return [
        format_parameters(prompt, negative_prompt,
                          {**settings, "Seed": seed, "TI hashes": format_name_hashes(conditioning.ti_hashes()),
                           **own})
        for prompt, seed, conditioning, own in zip(prompts, seeds, conditionings, per_image)
    ]


@dataclass
class GenerationResult:
    """Images with their seeds and the `parameters` text written into each PNG.

    `conditionings` holds image i's conditioning; `conditioning` is the first image's (the only one of a
    `generate` or `img2img` call)."""

    images: list[Image.Image]
    seeds: list[int]
    parameters: list[str]
    conditioning: Conditioning
    conditionings: list[Conditioning] = field(default_factory=list)

    @classmethod
    def join(cls, results: list[GenerationResult]) -> GenerationResult:
        """Several runs' results as one, in order (the first run's `conditioning`)."""
        if len(results) == 1:
            return results[0]
        return cls(
            [image for result in results for image in result.images],
            [seed for result in results for seed in result.seeds],
            [text for result in results for text in result.parameters],
            results[0].conditioning,
            [conditioning for result in results for conditioning in result.conditionings],
        )

    def save(self, path_or_dir: str | os.PathLike[str], *, overwrite: bool = False) -> list[Path]:
        """Write each image as PNG with its `parameters` text; the paths written.

        A path ending in .png names the file (several images: STEM-0.png, STEM-1.png, ... as the CLI
        writes them); any other path is a folder (created if missing) that gets 00000-SEED.png, ...
        Nothing is written when a target exists and `overwrite` is False."""
        target = Path(path_or_dir)
        if target.suffix.lower() == ".png":
            paths = [target] if len(self.images) == 1 else [
                target.with_name(f"{target.stem}-{index}{target.suffix}") for index in range(len(self.images))
            ]
        else:
            paths = [target / f"{index:05d}-{seed}.png" for index, seed in enumerate(self.seeds)]
        for path in paths:
            if path.is_dir():
                raise WriteError(f"{path}: cannot write (is a directory)")
        existing = [str(path) for path in paths if path.exists()]
        if existing and not overwrite:
            raise EngineError(f"{', '.join(existing)} already exist(s); pass overwrite=True to replace")
        ensure_folder(paths[0].parent)
        return [save_png(image, path, parameters, overwrite=overwrite)
                for image, path, parameters in zip(self.images, paths, self.parameters)]
