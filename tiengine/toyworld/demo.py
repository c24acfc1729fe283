"""End-to-end textual inversion on the default model: learn a concept the captions never named.

The toy world (tiengine.toyworld.world) colours the objects of a fifth of its scenes with any hue and then
names no colour; purple (toyworld.CONCEPT_HUE, halfway between blue and red) is among those hues, but no
caption ever has a word for it. The default model can draw it but nothing in a prompt selects it.
`run_demo`:

1. renders `CONCEPT_IMAGES` scenes of purple objects with toyworld.concept_examples and writes them as
   PNG files with their captions into OUT/concept_images/; a caption names count, size, shape and
   position and puts `[name]` where a colour word would stand ("three small [name] triangles on the
   left");
2. trains a textual-inversion embedding on them with the engine (tiengine.training.textual_inversion, exactly what
   `tiengine train-embedding` runs; the printed command reproduces it) using the template `TEMPLATE`
   ("[filewords]": the caption is the whole prompt, the name in the colour word's place), starting from
   the vector of `INIT_TEXT`;
3. generates every evaluation prompt three ways from the same seeds, with the colour word's place left
   empty ("a small circle on the left"), holding the English word the model was never taught ("a small
   purple circle on the left") and holding the embedding's name ("a small toyconcept circle on the left");
4. detects the concept (every object within toyworld.CONCEPT_HUE_TOLERANCE of purple) and the prompt's
   named attributes in each image (toyworld_eval.adherence_report), writes OUT/demo_grid.png and
   OUT/scores.json;
5. when the default model's LoRA `LORA_NAME` is packaged (tiengine.toyworld.train_lora), generates the
   plain prompts again with `<lora:striped:1>` and `<lora:striped:0>`: the share of striped backgrounds
   (tiengine.toyworld.detector) with the LoRA against the prompt alone, and whether every `:0` image is the
   prompt-alone image bit for bit (the base weights are restored exactly).

Evaluation prompts are the canonical captions of toyworld.held_out_combinations(): object groups the
model never saw in training, so the concept has to transfer to new scenes. Without a colour word the
model picks a hue of its own, so the prompt alone shows how often it draws purple by chance.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from tiengine.default_model import DEFAULT_MODEL_CFG_SCALE
from tiengine.embeddings.embedding import file_sha256
from tiengine.errors import TiengineError
from tiengine.io.atomic import atomic_write, atomic_write_bytes, ensure_folder
from tiengine.io.images import labelled_grid
from tiengine.io.metadata import format_name_hashes, format_parameters, save_png
from tiengine.toyworld.demo_recipe import (
    CONCEPT_IMAGES,
    CONCEPT_NAME,
    INIT_TEXT,
    LEARNING_RATE,
    LORA_NAME,
    LORA_TARGET_GAIN,
    NEAREST_WORD,
    TARGET_WITH,
    TARGET_WITHOUT,
    TEMPLATE,
    TRAIN_BATCH,
    TRAIN_STEPS,
)
from tiengine.toyworld.detector import adherence_report, detect
from tiengine.toyworld.evaluation import (
    DEFAULT_SAMPLER,
    DEFAULT_STEPS,
    held_out_prompts,
    load_engine,
)
from tiengine.toyworld.world import concept_examples
from tiengine.training.data import NAME_PLACEHOLDER
from tiengine.training.textual_inversion import TrainEmbeddingSettings

if TYPE_CHECKING:
    from PIL import Image

    from tiengine.engine import Engine

GRID_ROWS = 8
STAGES = ("rendering images", "training", "generating", "generating LoRA images", "scoring and writing")  # in order
GRID_SCALE = 2  # grid cells are the 64 px images scaled up by this factor (nearest neighbour)


class DemoError(TiengineError):
    """The demo cannot run: an output folder that would be overwritten, or bad settings."""


@dataclass
class ArmScore:
    """One way of prompting: its colour word, how often the concept appeared, how often the prompt was followed."""

    label: str
    colour_word: str
    concept_rate: float
    prompt_adherence: float


@dataclass
class LoraScore:
    """The LoRA part: share of striped backgrounds with `<lora:NAME:1>` and without any tag, and whether
    `<lora:NAME:0>` gave every prompt-alone image bit for bit."""

    name: str
    short_hash: str
    striped_with: float
    striped_without: float
    zero_is_base: bool


@dataclass
class DemoReport:
    name: str
    arms: list[ArmScore]
    images_per_arm: int
    train_steps: int
    train_seconds: float
    total_seconds: float
    embedding_path: str
    grid_path: str
    train_command: str
    outputs: list[str] = field(default_factory=list)
    lora: LoraScore | None = None

    def arm(self, label: str) -> ArmScore:
        return next(arm for arm in self.arms if arm.label == label)

    def summary_lines(self) -> list[str]:
        lines = [f"concept present in generated images ({self.images_per_arm} images each, held-out prompts):"]
        for arm in self.arms:
            lines.append(
                f"  {arm.label:<22} {arm.concept_rate:6.1%}   (prompt followed {arm.prompt_adherence:.1%})"
            )
        with_rate = self.arm("with the embedding").concept_rate
        without_rate = self.arm("prompt alone").concept_rate
        verdict = "met" if with_rate >= TARGET_WITH and without_rate < TARGET_WITHOUT else "NOT met"
        lines.append(
            f"targets (>= {TARGET_WITH:.0%} with the embedding, < {TARGET_WITHOUT:.0%} without): {verdict}"
        )
        if self.lora is not None:
            lines.append(f"LoRA <lora:{self.lora.name}:1> [{self.lora.short_hash}]: striped backgrounds "
                         f"{self.lora.striped_with:.1%} (prompt alone {self.lora.striped_without:.1%}); "
                         f"<lora:{self.lora.name}:0> gives the prompt-alone images bit for bit: "
                         f"{'yes' if self.lora.zero_is_base else 'NO'}")
            gain = self.lora.striped_with - self.lora.striped_without
            lines.append(f"LoRA target (striped share up by >= {LORA_TARGET_GAIN:.0%}, :0 bit for bit): "
                         f"{'met' if gain >= LORA_TARGET_GAIN and self.lora.zero_is_base else 'NOT met'}")
        lines.append(f"training: {self.train_steps} steps in {self.train_seconds:.0f} s; whole demo "
                     f"{self.total_seconds / 60:.1f} min")
        return lines


def _lora_part(engine: Engine, prompts: list[str], base_images: list[Image.Image], seed: int,
               report: Callable[[str, int, int], None]) -> LoraScore | None:
    """Step 5 of the module docstring (None when the model has no LoRA named LORA_NAME)."""
    import numpy as np

    if engine.networks.loras is None or engine.networks.loras.lookup(LORA_NAME) is None:
        return None
    images: dict[float, list[Image.Image]] = {}
    short_hash = ""
    report("generating LoRA images", 0, 2 * len(prompts))
    for number, multiplier in enumerate((1.0, 0.0)):
        images[multiplier] = []
        for index, prompt in enumerate(prompts):
            generated = engine.generate(f"{prompt} <lora:{LORA_NAME}:{multiplier:g}>", steps=DEFAULT_STEPS,
                                        sampler=DEFAULT_SAMPLER, cfg_scale=DEFAULT_MODEL_CFG_SCALE, seed=seed + index)
            (network,) = generated.conditioning.networks
            if not network.applied:
                raise DemoError(f"<lora:{LORA_NAME}:{multiplier:g}> was not applied: {network.reason}")
            short_hash = network.short_hash or ""
            images[multiplier] += generated.images
            report("generating LoRA images", number * len(prompts) + index + 1, 2 * len(prompts))
    engine.apply_networks("")  # the base weights back

    def striped(batch: list[Image.Image]) -> float:
        return sum(detect(np.asarray(image.convert("RGB"))).background == "stripes" for image in batch) / len(batch)

    zero_is_base = all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(images[0.0], base_images))
    return LoraScore(LORA_NAME, short_hash, striped(images[1.0]), striped(base_images), zero_is_base)


def evaluation_prompts(colour_word: str = "") -> list[str]:
    """The canonical caption of every held-out combination with `colour_word` in the colour word's place
    (empty: none), sorted (a fixed list)."""
    return held_out_prompts(1, colour_word=colour_word)


def write_concept_images(folder: Path, seed: int, *, overwrite: bool) -> list[Path]:
    """CONCEPT_IMAGES renders of the concept as NN.png + NN.txt (caption with [name]) in `folder`."""
    from PIL import Image

    images, captions = concept_examples(seed, CONCEPT_IMAGES, colour_word=NAME_PLACEHOLDER)  # (n, 64, 64, 3) uint8
    ensure_folder(folder)
    written = []
    for index, (pixels, caption) in enumerate(zip(images, captions), start=1):
        image = Image.fromarray(pixels)
        path = folder / f"{index:02d}.png"
        atomic_write(path, lambda temporary, image=image: image.save(temporary, format="PNG"), overwrite=overwrite)
        atomic_write_bytes(folder / f"{index:02d}.txt", caption.encode("utf-8"), overwrite=overwrite)
        written.append(path)
    return written


def _grid(columns: list[tuple[str, list[Image.Image]]], row_labels: list[str]) -> Image.Image:
    """The first GRID_ROWS images of each column, scaled up, each row labelled with its held-out prompt."""
    from PIL import Image

    scaled = [
        (label, [image.resize((image.width * GRID_SCALE, image.height * GRID_SCALE), Image.NEAREST)
                 for image in images[:GRID_ROWS]])
        for label, images in columns
    ]
    rows = max(len(images) for _, images in scaled)
    return labelled_grid(scaled, row_labels=row_labels[:rows])


def grid_parameters(
    columns: list[str], prompts: int, rows: int, seed: int, size: tuple[int, int], embedding_hash: str | None
) -> str:
    """The demo grid's `parameters` text: what its columns and rows are and how the images were made."""
    description = (
        f"tiengine demo grid. Columns: {', '.join(columns)}. Row k (from 0): held-out prompt k of {prompts} "
        f"(label on the left; the first {rows} are shown), generated with seed {seed}+k; the first column "
        f"holds the {CONCEPT_IMAGES} training images, one per row, unrelated to the row's prompt."
    )
    settings = {
        "Steps": DEFAULT_STEPS, "Sampler": DEFAULT_SAMPLER, "CFG scale": f"{DEFAULT_MODEL_CFG_SCALE:g}",
        "Seed": seed, "Size": f"{size[0]}x{size[1]}", "Model": "tiengine default model",
        "TI hashes": format_name_hashes({CONCEPT_NAME: embedding_hash}),
    }
    return format_parameters(description, "", settings)


def run_demo(
    out: str | os.PathLike[str],
    *,
    model: str | os.PathLike[str] | None = None,
    seed: int = 0,
    train_steps: int = TRAIN_STEPS,
    overwrite: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
) -> DemoReport:
    """Run the demonstration into the folder `out` (see the module docstring); returns the scores.

    progress(stage, done, total) is called as each stage starts (done = 0) and as its work completes, stages
    in order: STAGES ("rendering images", "training", "generating", "generating LoRA images" (when the
    model has the LoRA), "scoring and writing").
    """
    import numpy as np

    if train_steps < 1:
        raise DemoError(f"training steps must be >= 1, got {train_steps}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise DemoError(f"{out}: exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise DemoError(f"{out}: the folder is not empty; pick another --out or pass --overwrite to replace its files")
    started = time.perf_counter()
    report = progress or (lambda stage, done, total: None)

    images_dir = out / "concept_images"
    report("rendering images", 0, CONCEPT_IMAGES)
    outputs = [str(path) for path in write_concept_images(images_dir, seed, overwrite=overwrite)]
    report("rendering images", CONCEPT_IMAGES, CONCEPT_IMAGES)
    template_path = atomic_write_bytes(out / "template.txt", (TEMPLATE + "\n").encode("utf-8"), overwrite=overwrite)
    embedding_path = out / f"{CONCEPT_NAME}.safetensors"

    engine = load_engine(model)  # no embeddings folder: the demo never reads $TIENGINE_EMBEDDINGS
    settings = TrainEmbeddingSettings(
        vectors=1, init_text=INIT_TEXT, steps=train_steps, batch_size=TRAIN_BATCH, learning_rate=LEARNING_RATE,
        template=str(template_path), seed=seed, save_every=0,
    )
    train_command = (
        f"tiengine train-embedding {images_dir} --name {CONCEPT_NAME} --init-text {INIT_TEXT} "
        f"--steps {train_steps} --batch-size {TRAIN_BATCH} --lr '{LEARNING_RATE}' --template {template_path} "
        f"--seed {seed} --save-every 0 --out {embedding_path}"
    )
    train_started = time.perf_counter()
    report("training", 0, train_steps)
    result = engine.train_embedding(
        images_dir, CONCEPT_NAME, out=embedding_path, overwrite=overwrite,
        callback=lambda step: report("training", step.step, step.steps), **asdict(settings),
    )
    train_seconds = time.perf_counter() - train_started
    if result.embedding is None:
        raise DemoError(f"the model's text encoder widths {engine.encoder_widths} fit no embedding file")
    outputs += [str(path) for path in result.outputs]
    engine.add_embedding(result.embedding)

    arm_words = [("prompt alone", ""), ("nearest word", NEAREST_WORD), ("with the embedding", CONCEPT_NAME)]
    plain_prompts = evaluation_prompts()
    columns = []
    arms = []
    generated_images: list[list[Image.Image]] = []
    total_images = len(plain_prompts) * len(arm_words)
    report("generating", 0, total_images)
    for number, (label, colour_word) in enumerate(arm_words):
        images = []
        for index, prompt in enumerate(evaluation_prompts(colour_word)):
            generated = engine.generate(prompt, steps=DEFAULT_STEPS, sampler=DEFAULT_SAMPLER,
                                        cfg_scale=DEFAULT_MODEL_CFG_SCALE, seed=seed + index)
            images += generated.images
            report("generating", number * len(plain_prompts) + index + 1, total_images)
        generated_images.append(images)
    lora = _lora_part(engine, plain_prompts, generated_images[0], seed, report)
    report("scoring and writing", 0, len(arm_words) + 2)
    for number, ((label, colour_word), images) in enumerate(zip(arm_words, generated_images)):
        # the named attributes are scored against the prompt without its colour word: the colour is the concept's
        scores = adherence_report([np.asarray(image.convert("RGB")) for image in images], plain_prompts)
        arms.append(ArmScore(label, colour_word, scores.concept_rate, scores.score))
        columns.append((colour_word or label, images))
        report("scoring and writing", number + 1, len(arm_words) + 2)

    from PIL import Image

    training_images = [Image.open(path).convert("RGB") for path in sorted(images_dir.glob("*.png"))]
    grid_columns = [("training images", training_images)] + columns
    grid = _grid(grid_columns, plain_prompts)
    parameters = grid_parameters([label for label, _ in grid_columns], len(plain_prompts),
                                 min(GRID_ROWS, len(plain_prompts)), seed, columns[0][1][0].size,
                                 file_sha256(embedding_path)[:12])
    grid_path = save_png(grid, out / "demo_grid.png", parameters, overwrite=overwrite)
    report("scoring and writing", len(arm_words) + 1, len(arm_words) + 2)
    scores_path = out / "scores.json"
    demo = DemoReport(
        name=CONCEPT_NAME, arms=arms, images_per_arm=len(plain_prompts), train_steps=result.steps_done,
        train_seconds=train_seconds, total_seconds=time.perf_counter() - started, embedding_path=str(embedding_path),
        grid_path=str(grid_path), train_command=train_command, outputs=[*outputs, str(grid_path), str(scores_path)],
        lora=lora,
    )
    atomic_write_bytes(scores_path, (json.dumps(asdict(demo), indent=2) + "\n").encode("utf-8"), overwrite=overwrite)
    report("scoring and writing", len(arm_words) + 2, len(arm_words) + 2)
    return demo
