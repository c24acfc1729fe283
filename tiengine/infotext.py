"""An AUTOMATIC1111 infotext (a picture's `parameters` text) read as A1111 reads it, and turned into settings.

`parse_infotext(text)` reads it as A1111's `parse_generation_parameters` does (modules/infotext_utils.py,
restated in tiengine.io.metadata: `parse_parameters` for the lines and pairs, `generation_parameters` for
the fields A1111 derives: WxH split into KEY-1 / KEY-2, defaults, compatibility flags).

`Infotext.to_settings(facts)` gives GenerateSettings and one `Note` per key written: "mapped" (to a
setting), "checked" (Model hash, TI hashes, Lora hashes against what the engine has: a mismatch is a
"warning" naming both hashes), "not reproduced: KEY (why)", or "info" (no effect on the pixels);
`plan_reproduction` adds "overridden" for what the caller gives instead. Labels are
A1111's: samplers as it writes them, with the old combined names ("DPM++ 2M Karras") split by its rule
(sd_samplers.py, `get_sampler_and_scheduler`: a name ending in " " + a schedule's label, name or alias
names that schedule); schedule labels (sd_schedulers.py); emphasis labels (sd_emphasis.py). An infotext
without "Schedule type" comes from A1111 before v1.9, whose plain sampler names ran the model's own
(Uniform) schedule, so that is what they map to. No "RNG" field means GPU noise: "gpu" on a CUDA device,
else "nv" (NVIDIA's Philox stream computed on the CPU, tiengine.diffusion.rng). The hires-fix fields map
to GenerateSettings' hires fields (tiengine.diffusion.hires); other upscalers than A1111's latent modes
are models tiengine does not have, so the latent one runs and a note says so.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from tiengine.diffusion.names import schedule_name, split_sampler_name
from tiengine.diffusion.rng import settings_from_infotext
from tiengine.diffusion.schedules import SamplingError
from tiengine.errors import TiengineError
from tiengine.io.metadata import (
    MetadataError,
    generation_parameters,
    parse_parameters,
    parse_ti_hashes,
)
from tiengine.results import GenerationResult
from tiengine.settings import (
    ENCODE_OPTION_NAMES,
    SETTING_NAMES,
    GenerateSettings,
    settings_with,
)
from tiengine.text.extra_networks import strip_extra_networks
from tiengine.weights_conv.source import (
    MODEL_HASH_LENGTH,
    OLD_HASH_LENGTH,
    model_name,
    old_model_hash,
)

# tiengine's emphasis names -> A1111's infotext labels (sd_emphasis.py)
EMPHASIS_LABELS = {"original": "Original", "no_norm": "No norm", "ignore": "Ignore", "none": "None", "lerp": "Lerp"}
A1111_DEFAULT_SAMPLER = "DPM++ 2M"  # A1111's samplers[0], its choice for a name it does not know
HIRES_SETTINGS = {"Hires upscale": "hires_scale", "Hires steps": "hires_steps", "Hires upscaler": "hires_upscaler",
                  "Hires resize": "hires_resize"}
HIRES_KEYS = (*HIRES_SETTINGS, "First pass size")
INFO_KEYS = {"Version": "the program version that wrote it", "User": "who made it",
             "Template": "the prompt template that produced the prompt above",
             "Negative Template": "the template that produced the negative prompt above"}
NOT_REPRODUCED = {
    "Face restoration": "face restoration models (GFPGAN, CodeFormer) are not part of tiengine",
    "Tiling": "seamless tiling (circular padding) is not implemented",
    "Refiner": "switching to a refiner checkpoint during sampling is not implemented",
    "Refiner switch at": "switching to a refiner checkpoint during sampling is not implemented",
    "Image CFG scale": "image guidance is for instruct-pix2pix models, which tiengine does not run",
    "Conditional mask weight": "inpainting-model conditioning is not implemented",
    "Token merging ratio": "token merging (ToMe) is not implemented",
    "Token merging ratio hr": "token merging (ToMe) is not implemented",
    "Init image hash": "an img2img picture: its init image is not in the infotext",
    "NGMS": "skipping the negative prompt at low sigma (negative guidance minimum sigma) is not implemented",
    "Skip Early CFG": "skipping guidance in the first steps is not implemented",
    "FP8 weight": "fp8 weight storage is not implemented: weights run in fp32, fp16 or bf16",
    "Cache FP16 weight for LoRA": "fp8 weight storage is not implemented",
    "Schedule max sigma": "custom schedule bounds are not implemented: the model's sigma range is used",
    "Schedule min sigma": "custom schedule bounds are not implemented: the model's sigma range is used",
    "Schedule rho": "a custom Karras rho is not implemented: rho is 7",
    "SGM noise multiplier": "SGM's noise multiplier is not implemented",
    "Discard penultimate sigma": "dropping the next-to-last sigma is done for DPM2 only (A1111's default)",
    "Pad conds": "padding prompt and negative prompt to one length (pad_cond_uncond) is not implemented",
    "Pad conds v0": "padding prompt and negative prompt as A1111 before v1.6 did for DDIM is not implemented",
    "Downcast alphas_cumprod": "A1111 before v1.7.0-225 rounded the noise schedule to fp16; tiengine's is fp32",
    "Old prompt editing timelines": "A1111 before v1.6 read a [from:to:when] of 1.0 or more as a step number "
                                    "and counted hires steps with the first pass; tiengine reads them as v1.6+",
    "Refiner switch by sampling steps": "switching to a refiner checkpoint during sampling is not implemented",
    "VAE Encoder": "the tiny TAESD encoder is not implemented: the full VAE is used",
    "VAE Decoder": "the tiny TAESD decoder is not implemented: the full VAE is used",
    "Noise multiplier": "img2img's extra noise multiplier is not implemented",
}
NOT_REPRODUCED_PREFIXES = {
    "ControlNet": "ControlNet (an A1111 extension) is not part of tiengine",
    "ADetailer": "ADetailer (an A1111 extension that redraws detected faces and hands) is not part of tiengine",
    "Hires ": "tiengine's hires pass uses the first pass's sampler, prompts, guidance and model",
    "Mask": "inpainting is not implemented", "Inpaint": "inpainting is not implemented",
    "sigma ": "the k-diffusion churn / tmin / tmax / noise options are not implemented: A1111's defaults are used",
}


@dataclass(frozen=True)
class Note:
    """What became of one infotext key: kind "mapped", "checked", "warning", "not reproduced", "info" or
    "overridden"; printed as "KIND: KEY (TEXT)"."""

    kind: str
    key: str
    text: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.key} ({self.text})"


@dataclass(frozen=True)
class EngineFacts:
    """What an infotext is checked against (None: not known, so not compared): the model's A1111 hashes and
    name, the loaded embeddings' and the prompt's LoRAs' short hashes, and the device noise is drawn on."""

    model_hash: str | None = None
    old_model_hash: str | None = None
    model_name: str | None = None
    embedding_hashes: Mapping[str, str | None] | None = None
    lora_hashes: Mapping[str, str] | None = None
    device_type: str = "cpu"


def engine_facts(engine: Any, prompt: str) -> EngineFacts:
    """The facts of a tiengine Engine for `prompt` (its `<lora:...>` tags resolved, nothing applied)."""
    path = engine.model_path
    tags = strip_extra_networks(prompt, "positive", limits=engine.prompt_limits).tags
    active, _ = engine.networks.resolve(tags)
    return EngineFacts(engine.model_hash(), None if path is None else old_model_hash(path),
                       None if path is None else model_name(path),
                       engine.vocabulary.short_hashes(engine.vocabulary.embeddings), active.lora_hashes(),
                       engine.device.type)


@dataclass(frozen=True)
class Infotext:
    """A parsed infotext: the prompts, `written` (the settings line's pairs as written, unquoted, in order)
    and `fields` (A1111's parse result without the prompts: WxH split, defaults and flags added)."""

    prompt: str
    negative_prompt: str
    written: dict[str, str]
    fields: dict[str, Any]
    where: str = "infotext"

    def to_settings(self, facts: EngineFacts | None = None, *, init_image: bool = False
                    ) -> tuple[GenerateSettings, list[Note]]:
        """GenerateSettings and one Note per written key (and per compatibility flag A1111 derived); `facts`
        None: nothing to check against. `init_image`: the run is img2img (Denoising strength then maps)."""
        return _Mapping(self, facts or EngineFacts(), init_image).run()

    def as_dict(self) -> dict[str, Any]:
        return {"prompt": self.prompt, "negative_prompt": self.negative_prompt, "written": self.written,
                "a1111_fields": self.fields}


def parse_infotext(text: str, where: str = "infotext") -> Infotext:
    """Read an infotext as A1111 does (tiengine.io.metadata.generation_parameters); `where` names it in
    errors (a file name)."""
    written = parse_parameters(text)
    fields = generation_parameters(written)
    prompt, negative = fields.pop("Prompt"), fields.pop("Negative prompt")
    del written["Prompt"], written["Negative prompt"]
    return Infotext(prompt, negative, written, fields, where)


class _Mapping:
    """One Infotext.to_settings call: the settings fields found so far and a note per key."""

    def __init__(self, infotext: Infotext, facts: EngineFacts, init_image: bool) -> None:
        self.infotext, self.facts, self.init_image = infotext, facts, init_image
        self.written, self.fields = infotext.written, infotext.fields
        self.values: dict[str, Any] = {}
        self.notes: dict[str, Note] = {}

    def note(self, kind: str, key: str, text: str) -> None:
        self.notes.setdefault(key, Note(kind, key, text))

    def number(self, key: str, kind: type, minimum: float | None = None) -> Any:
        """fields[key] read as `kind` (int or float), at least `minimum`; MetadataError naming the key."""
        text = str(self.fields.get(key)).strip()
        try:
            number = kind(text)
        except ValueError:
            number = None
        if number is None or (minimum is not None and number < minimum) or not math.isfinite(number):
            what = "an integer" if kind is int else "a number"
            bound = "" if minimum is None else f" >= {minimum:g}"
            raise MetadataError(f'{self.infotext.where}: "{key}": expected {what}{bound}, found {text!r}')
        return number

    def mapped(self, key: str, setting: str, value: Any, how: str = "") -> None:
        self.values[setting] = value
        self.note("mapped", key, f"{setting} = {value!r}" + (f"; {how}" if how else ""))

    def run(self) -> tuple[GenerateSettings, list[Note]]:
        written = self.written
        if "Steps" in written:
            self.mapped("Steps", "steps", self.number("Steps", int, minimum=1))
        self.sampler_and_schedule()
        if "CFG scale" in written:
            self.mapped("CFG scale", "cfg_scale", self.number("CFG scale", float))
        if "Seed" in written:
            self.mapped("Seed", "seed", self.number("Seed", int, minimum=0))
        if "Size-1" in self.fields:
            width, height = self.number("Size-1", int, minimum=1), self.number("Size-2", int, minimum=1)
            self.values.update(width=width, height=height)
            self.note("mapped", "Size", f"width, height = {width}, {height}")
        elif "Size" in written:
            raise MetadataError(f'{self.infotext.where}: "Size": expected WIDTHxHEIGHT, found {written["Size"]!r}')
        if "Clip skip" in written:  # A1111 fills in "1", tiengine's default too
            self.mapped("Clip skip", "clip_skip", self.number("Clip skip", int, minimum=1))
        for key in ("Eta", "Eta DDIM"):  # A1111 writes the one of its sampler when it differs from 1 / 0
            if key in written:
                self.mapped(key, "eta", self.number(key, float, minimum=0))
        self.emphasis()
        self.noise()
        self.hires_and_strength()
        self.checks()
        for key in written:
            self.classify_rest(key)
        for flag in ("Old prompt editing timelines", "Pad conds v0", "Downcast alphas_cumprod",
                     "Refiner switch by sampling steps"):
            if flag in self.fields:
                self.note("not reproduced", flag, NOT_REPRODUCED[flag] + f"; set by A1111 for Version "
                                                                         f"{self.fields['Version']}")
        try:
            settings = settings_with(GenerateSettings(), **self.values)
        except TiengineError as error:  # a value the settings refuse, named with the infotext it came from
            raise MetadataError(f"{self.infotext.where}: {error}") from None
        order = [*written, *(key for key in self.notes if key not in written)]
        return settings, [self.notes[key] for key in order if key in self.notes]

    def sampler_and_schedule(self) -> None:
        """Sampler and schedule: the Sampler note carries what its name decided (an alias, an old schedule
        suffix, the pre-v1.9 rule), the Schedule type note what a written schedule became."""
        written = self.written
        label = written.get("Schedule type")
        kind, remarks = "mapped", []
        try:
            name, schedule = split_sampler_name(written.get("Sampler") or A1111_DEFAULT_SAMPLER)
        except SamplingError:
            kind = "not reproduced"
            remarks.append(f"{written.get('Sampler')!r} is not a tiengine sampler; {A1111_DEFAULT_SAMPLER} runs, "
                           f"A1111's choice for a name it does not know")
            name, schedule = A1111_DEFAULT_SAMPLER, None
        self.values["sampler"] = name
        if schedule is None and label is not None:
            try:
                schedule = schedule_name(label)
            except SamplingError:
                self.note("not reproduced", "Schedule type",
                          f"{label!r} is not a schedule tiengine has; the sampler's own (Automatic) is used")
                schedule = "automatic"
        if schedule is None:  # no schedule written at all: A1111 before v1.9 ran the model's Uniform schedule
            schedule = "uniform"
            remarks.append("no Schedule type: written by A1111 before v1.9, where a plain sampler name ran the "
                           "model's own (Uniform) schedule")
        if schedule != "automatic":
            self.values["scheduler"] = schedule
        if label is not None and "Schedule type" not in self.notes:
            self.note("mapped", "Schedule type", f"scheduler = {schedule!r}"
                      + ("" if written.get("Sampler", name) == name else " (the sampler's name suffix wins)"))
        elif label is None:
            remarks.insert(0, f"scheduler = {schedule!r}")
        if "Sampler" in written:
            self.note(kind, "Sampler", "; ".join([f"sampler = {name!r}", *remarks]))

    def emphasis(self) -> None:
        if "Emphasis" not in self.written:
            return
        modes = {label: mode for mode, label in EMPHASIS_LABELS.items()}
        label = self.written["Emphasis"]
        if label in modes:
            self.mapped("Emphasis", "emphasis", modes[label])
        else:
            self.note("not reproduced", "Emphasis", f"{label!r} is not an emphasis mode tiengine has; A1111 "
                                                    f"itself falls back to Original, as tiengine does")

    def noise(self) -> None:
        try:
            noise = settings_from_infotext(self.written)
        except SamplingError as error:
            raise MetadataError(f"{self.infotext.where}: {error}") from None
        source, how = noise["source"], "" if "RNG" in self.written else "no RNG field: A1111's default, GPU noise"
        if source == "gpu" and self.facts.device_type != "cuda":
            source = "nv"
            how += (", " if how else "") + f"which needs a CUDA generator; this engine runs on " \
                f"{self.facts.device_type}, so NVIDIA's Philox stream is computed on the CPU (the same noise, to a " \
                f"few float32 ulps)"
        self.mapped("RNG", "rng", source, how)
        if noise["subseed"] is not None:
            self.mapped("Variation seed", "subseed", noise["subseed"])
        if "Variation seed strength" in self.written:
            self.mapped("Variation seed strength", "subseed_strength", noise["subseed_strength"])
        if "Seed resize from" in self.written:
            self.mapped("Seed resize from", "seed_resize_from", noise["seed_resize_from"])
        if "ENSD" in self.written:
            self.mapped("ENSD", "eta_noise_seed_delta", noise["eta_noise_seed_delta"])

    def hires_and_strength(self) -> None:
        hires = [key for key in HIRES_KEYS if key in self.written]
        if hires:
            self.hires_fields()
        if "Denoising strength" not in self.written:
            return
        if hires or self.init_image:
            self.mapped("Denoising strength", "strength", self.number("Denoising strength", float, minimum=0))
        else:
            self.note("not reproduced", "Denoising strength", "an img2img picture (or A1111's field without hires "
                                                              "fix): its init image is not in the infotext")

    def hires_fields(self) -> None:
        """The hires-fix keys, for a GenerateSettings that has hires_scale / steps / upscaler / resize."""
        for key, kind, minimum in (("Hires upscale", float, 1), ("Hires steps", int, 0)):
            if key in self.written:
                self.mapped(key, HIRES_SETTINGS[key], self.number(key, kind, minimum=minimum))
        if "Hires resize" in self.written or "First pass size" in self.written:  # A1111 moved the old one there
            size = (self.number("Hires resize-1", int, minimum=0), self.number("Hires resize-2", int, minimum=0))
            self.mapped("Hires resize" if "Hires resize" in self.written else "First pass size", "hires_resize", size)
        upscaler = self.written.get("Hires upscaler", "Latent")
        if upscaler.startswith("Latent"):
            self.mapped("Hires upscaler", "hires_upscaler", upscaler)
        else:
            self.values["hires_upscaler"] = "Latent"
            self.note("not reproduced", "Hires upscaler", f"{upscaler!r} is an upscaler model tiengine does not "
                                                          f"have; the second pass upscales the latents instead")

    def checks(self) -> None:
        facts, written = self.facts, self.written
        if "Model hash" in written:
            want = written["Model hash"].strip().lower()
            old = len(want) == OLD_HASH_LENGTH
            have = facts.old_model_hash if old else facts.model_hash
            want = want if old else want[:MODEL_HASH_LENGTH]
            era = "A1111's pre-v1.0 8-digit hash" if old else "A1111's hash"
            if have is None:
                self.note("warning", "Model hash", f"{want} ({era}) not compared: no such hash of this engine's "
                                                   f"model is known")
            elif have == want:
                self.note("checked", "Model hash", f"{want}: this engine's model")
            else:
                made = f"{written['Model']!r} [{want}]" if "Model" in written else f"[{want}]"
                self.note("warning", "Model hash", f"the picture was made with {made}; this engine's model is "
                                                   f"{facts.model_name!r} [{have}]: another checkpoint, another image")
        if "Model" in written:
            if facts.model_name is None:
                self.note("info", "Model", "not compared: no model to compare with")
            elif facts.model_name == written["Model"]:
                self.note("checked", "Model", "this engine's model's name")
            elif "Model hash" in written:
                self.note("info", "Model", f"this engine's model is named {facts.model_name!r}; the hash decides")
            else:
                self.note("warning", "Model", f"this engine's model is named {facts.model_name!r}, and there is no "
                                              f"hash to compare")
        for key, loaded, missing in (
                ("TI hashes", facts.embedding_hashes, "not loaded: the prompt reads the name as words"),
                ("Lora hashes", facts.lora_hashes, "no LoRA of that name applied (the folder: --loras)")):
            if key in written:
                self.hash_list(key, loaded, missing)
        vae = "not compared: tiengine does not record which VAE file it holds (load the picture's with --vae / " \
              "Engine.load(vae=...))"
        unrecorded = {"VAE": vae, "VAE hash": vae, "Hypernet hash": "not compared: the hypernetwork is found by its "
                                                                    "name in the <hypernet:...> tag"}
        for key, text in unrecorded.items():
            if key in written:
                self.note("warning", key, text)

    def hash_list(self, key: str, loaded: Mapping[str, str | None] | None, missing: str) -> None:
        wanted = parse_ti_hashes(self.written[key])
        if not wanted:
            self.note("warning", key, f"not compared: expected 'NAME: HASH, ...', found {self.written[key]!r}")
            return
        if loaded is None:
            self.note("warning", key, "not compared: no engine to compare with")
            return
        have = {name.replace(":", "").replace(",", ""): short for name, short in loaded.items()}
        problems = []
        for name, want in wanted.items():
            if name not in have:
                problems.append(f"{name} [{want}] {missing}")
            elif have[name] != want:
                problems.append(f"{name}: the picture's is [{want}], this engine's [{have[name] or 'no file'}]")
        if problems:
            self.note("warning", key, "; ".join(problems))
        else:
            self.note("checked", key, ", ".join(f"{name} [{want}]" for name, want in wanted.items()) + " match")

    def classify_rest(self, key: str) -> None:
        if key in self.notes:
            return
        if key in INFO_KEYS:
            self.note("info", key, INFO_KEYS[key])
        elif key in ("Hypernet", "Hypernet strength"):
            self.note("mapped", key, "as a <hypernet:...> tag at the end of the prompt, as A1111 adds it")
        elif key in NOT_REPRODUCED:
            self.note("not reproduced", key, NOT_REPRODUCED[key])
        else:
            prefix = next((prefix for prefix in NOT_REPRODUCED_PREFIXES if key.lower().startswith(prefix.lower())),
                          None)
            reason = NOT_REPRODUCED_PREFIXES[prefix] if prefix else \
                "not a setting tiengine knows (an extension's or a newer A1111's); its effect is not applied"
            self.note("not reproduced", key, reason)


@dataclass(frozen=True)
class Reproduction:
    """What to run for an infotext: its prompts and settings (overrides applied) and the notes."""

    infotext: Infotext
    prompt: str
    negative_prompt: str
    settings: GenerateSettings
    notes: tuple[Note, ...]

    def as_dict(self) -> dict[str, Any]:
        return {**self.infotext.as_dict(), "settings": _settings_dict(self.settings),
                "notes": [dataclasses.asdict(note) for note in self.notes]}


def plan_reproduction(infotext: Infotext, facts: EngineFacts | None = None, *, init_image: bool = False,
                      **overrides: object) -> Reproduction:
    """`infotext.to_settings(facts)` with `overrides` (prompt=, negative_prompt= and GenerateSettings /
    EncodeOptions fields) put over it, each noted as "overridden"."""
    settings, notes = infotext.to_settings(facts, init_image=init_image)
    prompt = overrides.pop("prompt", infotext.prompt)
    negative = overrides.pop("negative_prompt", infotext.negative_prompt)
    settings = settings_with(settings, **overrides)  # names every unknown field
    given = {"prompt": prompt, "negative_prompt": negative, **overrides}
    notes += [Note("overridden", name, f"{value!r}, given in place of the infotext's") for name, value in given.items()
              if name in overrides or value != getattr(infotext, name)]
    return Reproduction(infotext, str(prompt), str(negative), settings, tuple(notes))


def _settings_dict(settings: GenerateSettings) -> dict[str, Any]:
    return {**{name: getattr(settings, name) for name in SETTING_NAMES},
            **{name: getattr(settings.encode, name) for name in ENCODE_OPTION_NAMES}}


@dataclass
class InfotextResult(GenerationResult):
    """`Engine.generate_from_infotext`'s result: a GenerationResult with the Reproduction it ran (its notes)."""

    reproduction: Reproduction | None = None

    @property
    def notes(self) -> tuple[Note, ...]:
        return () if self.reproduction is None else self.reproduction.notes
