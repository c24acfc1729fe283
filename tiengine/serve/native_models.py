"""Request and response bodies of tiengine's own endpoints (`/tiengine/v1/...`), as pydantic models.

Field names are the CLI's option names in snake_case (`tiengine parse --second-order` -> `second_order`,
`tiengine encode --clip-skip` -> `clip_skip`; `--negative` is `negative_prompt`, the name the encode report
uses) with the CLI's defaults; the training fields are those of
tiengine.training.textual_inversion.TrainEmbeddingSettings with its defaults. Unlike A1111's endpoints these
bodies are strict: an unknown field (a typo would otherwise be silently dropped) or a value of the wrong type
("20" for an integer) is a 422 naming the field. Caps from ServeLimits are checked by `check_*` and raise
RequestRefused (a 422 naming the cap).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from tiengine.serve.config import RequestRefused, ServeLimits
from tiengine.text.chunking import DEFAULT_COMMA_BACKTRACK
from tiengine.text.conditioning import EncodeOptions
from tiengine.training.data import BUILTIN_TEMPLATES
from tiengine.training.textual_inversion import TrainEmbeddingSettings

TEMPLATE_CHOICES = ("auto", *BUILTIN_TEMPLATES)  # a template file is a path: the service takes template_lines
_DEFAULTS = TrainEmbeddingSettings()


class StrictBody(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ParseRequest(StrictBody):
    """`tiengine parse TEXT --steps N [--second-order]`."""

    prompt: str
    steps: int = Field(20, ge=1)
    second_order: bool = False


class EncodeOptionFields(StrictBody):
    """The encode options every prompt-taking command offers (tiengine.cli.add_encode_options)."""

    emphasis: str = "original"
    comma_backtrack: int = Field(DEFAULT_COMMA_BACKTRACK, ge=0)
    explicit_embedding_syntax: bool = False
    explicit_only: bool = False
    keep_embeddings_on_backtrack: bool = False

    def encode_options(self, clip_skip: int = 1) -> EncodeOptions:
        """As tiengine.cli.encode_options builds them (raises ConditioningError on a bad emphasis)."""
        return EncodeOptions(clip_skip=clip_skip, emphasis=self.emphasis, comma_backtrack=self.comma_backtrack,
                             bare_names=not self.explicit_only,
                             explicit_embedding_syntax=self.explicit_embedding_syntax,
                             keep_embeddings_on_backtrack=self.keep_embeddings_on_backtrack)


class TokenizeRequest(EncodeOptionFields):
    """`tiengine tokenize TEXT [encode options]`, with the served model's family and embeddings."""

    prompt: str


class EncodeRequest(EncodeOptionFields):
    """`tiengine encode PROMPT --negative TEXT --steps N --sampler NAME --clip-skip N [encode options]`."""

    prompt: str
    negative_prompt: str = ""
    steps: int = Field(20, ge=1)
    sampler: str = "Euler a"
    clip_skip: int = Field(1, ge=1)


class TrainEmbeddingRequest(StrictBody):
    """A textual-inversion training job: the images (base64 PNG, JPEG or WebP, optionally as data URLs),
    optional captions (one per image; `[filewords]`), optional template lines (instead of a template file),
    `load` (bind the result in the served engine when done) and TrainEmbeddingSettings' fields."""

    name: str = Field(min_length=1, max_length=200)
    images: list[str] = Field(min_length=1)
    captions: list[str] | None = None
    template_lines: list[str] | None = None
    load: bool = False
    vectors: int = _DEFAULTS.vectors
    init_text: str = _DEFAULTS.init_text
    steps: int = _DEFAULTS.steps
    batch_size: int = _DEFAULTS.batch_size
    grad_accum: int = _DEFAULTS.grad_accum
    learning_rate: str | float = _DEFAULTS.learning_rate  # a rate or A1111's schedule "0.005:100, 1e-3"
    template: str = _DEFAULTS.template
    seed: int = _DEFAULTS.seed
    resolution: int | None = _DEFAULTS.resolution
    flip: bool = _DEFAULTS.flip
    alpha_weight: bool = _DEFAULTS.alpha_weight
    grad_clip: float | None = _DEFAULTS.grad_clip
    grad_clip_mode: str = _DEFAULTS.grad_clip_mode
    weight_decay: float = _DEFAULTS.weight_decay
    mixed_precision: str = _DEFAULTS.mixed_precision
    clip_skip: int = _DEFAULTS.clip_skip
    emphasis: str = _DEFAULTS.emphasis
    allow_word_name: bool = _DEFAULTS.allow_word_name

    def settings(self) -> TrainEmbeddingSettings:
        """The run's settings (raises TrainingError naming a bad value). No checkpoints or previews: the
        service keeps the final embedding only."""
        fields = self.model_dump(exclude={"name", "images", "captions", "template_lines", "load"})
        fields["learning_rate"] = str(fields["learning_rate"])
        return TrainEmbeddingSettings(**fields, save_every=0, preview_every=0)


class JobStatus(BaseModel):
    """A background job as GET /tiengine/v1/jobs/{id} reports it."""

    id: str
    kind: str
    name: str
    state: str  # "queued", "running", "done", "failed", "cancelled"
    progress: float  # fraction in [0, 1]
    step: int
    steps: int
    eta: float | None  # seconds, while running
    text: str | None  # the last step's note (the loss)
    error: str | None  # why it failed
    cancel_requested: bool
    warnings: list[str]
    status_url: str
    result_url: str | None  # when done: the embedding file


def check_prompt_length(limits: ServeLimits, **prompts: str) -> None:
    for field, text in prompts.items():
        if len(text) > limits.max_prompt_chars:
            raise RequestRefused(f"{field}: {len(text)} characters, over the service's limit of "
                                 f"{limits.max_prompt_chars} (serve limit max_prompt_chars)")


def check_steps(limits: ServeLimits, steps: int) -> None:
    if steps > limits.max_steps:
        raise RequestRefused(f"steps: {steps}, over the service's limit of {limits.max_steps} (serve limit max_steps)")


def check_training(limits: ServeLimits, request: TrainEmbeddingRequest) -> None:
    """The training caps and the fields the service reads differently from the CLI (no template files)."""
    name = request.name
    if name != name.strip() or name in (".", "..") or any(c in name for c in "/\\") or \
            any(ord(c) < 32 for c in name):
        raise RequestRefused(f"name {name!r}: no leading/trailing spaces, slashes or control characters, not '.' "
                             "or '..' (the name is also the file name)")
    if len(request.images) > limits.max_training_images:
        raise RequestRefused(f"images: {len(request.images)}, over the service's limit of "
                             f"{limits.max_training_images} (serve limit max_training_images)")
    if request.captions is not None and len(request.captions) != len(request.images):
        raise RequestRefused(f"captions: expected one per image ({len(request.images)}), found {len(request.captions)}")
    if request.steps > limits.max_training_steps:
        raise RequestRefused(f"steps: {request.steps}, over the service's training limit of "
                             f"{limits.max_training_steps} (serve limit max_training_steps)")
    if request.batch_size > limits.max_batch_size:
        raise RequestRefused(f"batch_size: {request.batch_size}, over the service's limit of "
                             f"{limits.max_batch_size} (serve limit max_batch_size)")
    if request.resolution is not None and request.resolution ** 2 > limits.max_pixels:
        raise RequestRefused(f"resolution: {request.resolution}x{request.resolution} pixels, over the service's "
                             f"limit of {limits.max_pixels} pixels (serve limit max_pixels)")
    if request.template not in TEMPLATE_CHOICES:
        raise RequestRefused(f"template: expected one of {', '.join(TEMPLATE_CHOICES)} (the service reads no "
                             f"template files; send template_lines instead), found {request.template!r}")
    if request.template_lines is not None:
        if request.template != _DEFAULTS.template:
            raise RequestRefused(f"template_lines and template {request.template!r}: give one of them")
        if not any(line.strip() for line in request.template_lines):
            raise RequestRefused("template_lines: expected at least one non-blank line")
    for field, texts in (("captions", request.captions or []), ("template_lines", request.template_lines or [])):
        check_prompt_length(limits, **{f"{field}[{index}]": text for index, text in enumerate(texts)})
