"""LoRA / LyCORIS file keys -> tiengine modules, and the model-family evidence in a file's keys and widths.

A LoRA file names each trained layer by a prefix and stores its tensors under that prefix. The layouts
found in the wild (names from kohya-ss sd-scripts `networks/lora.py`, AUTOMATIC1111
`extensions-builtin/Lora/networks.py`, LyCORIS, diffusers `loaders/lora_conversion_utils.py` and PEFT):

- kohya / A1111 / LyCORIS: `<prefix><module path with "." -> "_">.<tensor>`, prefixes `lora_te_` (the one
  text encoder of SD1/SD2; A1111 also takes `lora_te1_` there), `lora_te1_` / `lora_te2_` (SDXL's
  text_encoder / text_encoder_2), `lora_unet_`. Text-encoder paths are transformers' CLIP names
  (`text_model_encoder_layers_3_self_attn_q_proj`); UNet paths are diffusers' (SD1/SD2 files:
  `down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`, `down_blocks_0_resnets_0_conv1`) or the
  original LDM ones (kohya's SDXL files and some SD1 files: `input_blocks_4_1_transformer_blocks_0_attn1_to_q`,
  `middle_block_0_in_layers_2`, `output_blocks_2_2_conv`).
- diffusers / PEFT: dotted paths under a component prefix (`unet.`, `text_encoder.`, `text_encoder_2.`, or
  none, optionally behind PEFT's `base_model.model.`), tensors `lora_A.weight` / `lora_B.weight`; the older
  diffusers forms `<module>.lora.down.weight`, `<module>.lora_linear_layer.down.weight` and the attention
  processors' `attn1.processor.to_q_lora.down.weight` (`to_out_lora` is `to_out.0`; in text encoders
  `self_attn.to_q_lora` is `q_proj`, `to_out_lora` is `out_proj`).

Names are never parsed into paths. `LayerIndex` lists, once per model, every name each Linear / Conv2d layer
can have in any of these layouts (the LDM names come from `tiengine.weights_conv.rules.unet_module_table`
read backwards, built from the UNet's config), and a file's prefixes are looked up in it exactly. A name
that two layers could both have is ambiguous and matches neither.

Tensor names are normalised to kohya's (`lora_down.weight`, `lora_up.weight`, `alpha`, LyCORIS'
`hada_*` / `lokr_*` as they are); `split_key` does that with a fixed list of suffixes.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field

from torch import nn

from tiengine.weights_conv.rules import unet_module_table

UNET = "unet"
TEXT_ENCODER, TEXT_ENCODER_2 = "text_encoder", "text_encoder_2"
COMPONENTS = (TEXT_ENCODER, TEXT_ENCODER_2, UNET)
KOHYA_MARK = "lora_"  # every kohya / A1111 / LyCORIS layer name starts with it; no dotted path does
KOHYA_UNET = "lora_unet_"
KOHYA_SINGLE_TEXT = "lora_te_"  # SD1 / SD2: the model's only text encoder
KOHYA_TEXT_1, KOHYA_TEXT_2 = "lora_te1_", "lora_te2_"  # SDXL
PEFT_PREFIX = "base_model.model."
TEXT_MODEL_PREFIX = "text_model."  # transformers 4 CLIPTextModel; transformers 5 omits it
# Dotted-key endings -> kohya tensor names (first match wins; none of them is the end of another).
DOTTED_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".lora_A.weight", "lora_down.weight"),
    (".lora_B.weight", "lora_up.weight"),
    (".lora.down.weight", "lora_down.weight"),
    (".lora.up.weight", "lora_up.weight"),
    (".lora_linear_layer.down.weight", "lora_down.weight"),
    (".lora_linear_layer.up.weight", "lora_up.weight"),
    ("_lora.down.weight", "lora_down.weight"),  # attention processors: `...attn1.processor.to_q_lora.down.weight`
    ("_lora.up.weight", "lora_up.weight"),
    (".lora_down.weight", "lora_down.weight"),
    (".lora_up.weight", "lora_up.weight"),
    (".lora_mid.weight", "lora_mid.weight"),
    (".lora_magnitude_vector.weight", "lora_magnitude_vector"),
)
# Old diffusers attention-processor names: module leaf -> the name its `*_lora` tensors hang from.
UNET_PROCESSOR_ALIASES = {"to_q": "processor.to_q", "to_k": "processor.to_k", "to_v": "processor.to_v",
                          "to_out.0": "processor.to_out"}  # under attn1 / attn2
TEXT_PROCESSOR_ALIASES = {"q_proj": "to_q", "k_proj": "to_k", "v_proj": "to_v", "out_proj": "to_out"}  # under self_attn


def split_key(key: str) -> tuple[str, str]:
    """A file key -> (layer prefix as the file spells it, kohya tensor name).

    `lora_unet_x_y.lora_down.weight` -> ("lora_unet_x_y", "lora_down.weight");
    `unet.x.y.lora_A.weight` -> ("unet.x.y", "lora_down.weight"); `unet.x.y.alpha` -> ("unet.x.y", "alpha").
    """
    head, _, rest = key.partition(".")
    if head.startswith(KOHYA_MARK):
        return head, rest
    for suffix, tensor in DOTTED_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], tensor
    prefix, _, tensor = key.rpartition(".")
    return prefix, tensor


@dataclass(frozen=True)
class Target:
    """One Linear / Conv2d layer of the model."""

    component: str  # Engine.modules key
    module: str  # module path inside the component
    weight_shape: tuple[int, ...]  # (out, in) or (out, in, kh, kw)


class LayerIndex:
    """Every name a LoRA file may give each Linear / Conv2d layer of `modules` (module docstring).

    Built once per model from `named_modules()`; `resolve` is a dict lookup. Also records what the family
    check compares: the number of text encoders, the UNet's context width (`attn2.to_k` input) and each
    text encoder's width.
    """

    def __init__(self, modules: Mapping[str, nn.Module]):
        self.text_encoders = tuple(name for name in (TEXT_ENCODER, TEXT_ENCODER_2) if name in modules)
        self._names: dict[str, Target | None] = {}  # None: ambiguous
        self.context_width: int | None = None
        self.text_widths: dict[str, int] = {}
        for component in self.text_encoders:
            if component == TEXT_ENCODER_2:
                kohya: tuple[str, ...] = (KOHYA_TEXT_2,)
            else:  # A1111 also reads lora_te1_ names on a one-encoder model
                kohya = (KOHYA_TEXT_1,) if TEXT_ENCODER_2 in modules else (KOHYA_SINGLE_TEXT, KOHYA_TEXT_1)
            for path, target in _layers(modules[component], component):
                if path.endswith("self_attn.q_proj"):
                    self.text_widths.setdefault(component, target.weight_shape[1])
                # unprefixed dotted names (a PEFT state dict of one model) only where one encoder can be meant
                for name in _text_names(component, path, kohya, unprefixed=len(self.text_encoders) == 1):
                    self._add(name, target)
        if UNET in modules:
            unet = modules[UNET]
            ldm_paths = _ldm_paths(unet)
            for path, target in _layers(unet, UNET):
                if path.endswith("attn2.to_k") and self.context_width is None:
                    self.context_width = target.weight_shape[1]
                for name in _unet_names(path, ldm_paths.get(path)):
                    self._add(name, target)

    def resolve(self, prefix: str) -> Target | None:
        """The layer a file's key prefix names, or None (unknown here, or ambiguous)."""
        return self._names.get(prefix.removeprefix(PEFT_PREFIX))

    def _add(self, name: str, target: Target) -> None:
        known = self._names.get(name, target)
        self._names[name] = target if known == target else None


def _layers(module: nn.Module, component: str) -> Iterator[tuple[str, Target]]:
    for path, layer in module.named_modules():
        if isinstance(layer, (nn.Linear, nn.Conv2d)):
            yield path, Target(component, path, tuple(layer.weight.shape))


def _text_names(component: str, path: str, kohya_prefixes: tuple[str, ...], unprefixed: bool) -> Iterator[str]:
    for prefix in kohya_prefixes:
        yield prefix + path.replace(".", "_")
    dotted = [path]
    parent, _, leaf = path.rpartition(".")
    if parent.endswith("self_attn") and leaf in TEXT_PROCESSOR_ALIASES:
        dotted.append(f"{parent}.{TEXT_PROCESSOR_ALIASES[leaf]}")
    for name in dotted:
        for form in (name, name.removeprefix(TEXT_MODEL_PREFIX)):
            yield f"{component}.{form}"
            if unprefixed:
                yield form


def _unet_names(path: str, ldm_path: str | None) -> Iterator[str]:
    yield KOHYA_UNET + path.replace(".", "_")
    if ldm_path is not None:
        yield KOHYA_UNET + ldm_path.replace(".", "_")
    aliases = [path]
    for leaf, alias in UNET_PROCESSOR_ALIASES.items():
        if path.endswith((f"attn1.{leaf}", f"attn2.{leaf}")):
            aliases.append(path[: -len(leaf)] + alias)
    for dotted in aliases:
        yield f"{UNET}.{dotted}"
        yield dotted


def _ldm_paths(unet: nn.Module) -> dict[str, str]:
    """diffusers module path -> LDM module path for the UNet's Linear / Conv2d layers (those with one).

    `unet_module_table` maps LDM module prefixes to diffusers prefixes with leaf renames (UNET_RESNET:
    `in_layers.2` -> `conv1`, ...) or unchanged leaves; this reads it backwards. A UNet without tiengine's
    `config` has no LDM names.
    """
    config = getattr(unet, "config", None)
    if config is None or not hasattr(config, "down_block_types"):
        return {}
    table = unet_module_table(
        config.layers_per_block,
        [kind.startswith("CrossAttn") for kind in config.down_block_types],
        [kind.startswith("CrossAttn") for kind in config.up_block_types],
        config.addition_embed_type == "text_time",
    )
    backwards = {}  # diffusers prefix -> (LDM prefix, {diffusers leaf: LDM leaf}, unlisted leaves kept)
    for ldm_prefix, rule in table.items():
        leaves = {
            leaf_rule.targets[0].removesuffix(".weight"): source.removesuffix(".weight")
            for source, leaf_rule in rule.leaves.rules.items()
            if source.endswith(".weight")
        }
        backwards[rule.target] = (ldm_prefix, leaves, rule.leaves.passthrough)
    paths = {}
    for path, layer in unet.named_modules():
        if not isinstance(layer, (nn.Linear, nn.Conv2d)):
            continue
        parts = path.split(".")
        for cut in range(len(parts), 0, -1):
            found = backwards.get(".".join(parts[:cut]))
            if found is None:
                continue
            ldm_prefix, leaves, passthrough = found
            leaf = ".".join(parts[cut:])
            if leaf in leaves:
                paths[path] = f"{ldm_prefix}.{leaves[leaf]}"
            elif passthrough:
                paths[path] = f"{ldm_prefix}.{leaf}" if leaf else ldm_prefix
            break
    return paths


# Family evidence ------------------------------------------------------------------------------------

FAMILY_LABELS = {"sd1": "SD1", "sd2": "SD2", "sdxl": "SDXL"}
CONTEXT_FAMILIES = {768: "sd1", 1024: "sd2", 2048: "sdxl"}  # UNet cross-attention context of each release
SINGLE_TEXT_FAMILIES = {768: "sd1", 1024: "sd2"}  # CLIP-L, OpenCLIP-H
CONTEXT_LAYER_ENDINGS = ("attn2_to_k", "attn2.to_k", "attn2.processor.to_k")
TEXT_WIDTH_LAYER_ENDINGS = ("self_attn_q_proj", "self_attn.q_proj", "self_attn.to_q")


@dataclass
class FamilyEvidence:
    """What a file's keys and tensor widths say about the model it was made for (each with a key)."""

    two_encoders: str | None = None  # a te1/te2 or text_encoder_2 key
    one_encoder: str | None = None  # a lora_te_ key
    context: tuple[int, str] | None = None  # (width, key) of a cross-attention to_k input
    text_widths: dict[str, tuple[int, str]] = field(default_factory=dict)  # component -> (width, key), q_proj input

    def guess(self) -> str | None:
        """The release family the evidence points to, from the widths of the released models."""
        if self.two_encoders is not None:
            return "sdxl"
        if self.context is not None and self.context[0] in CONTEXT_FAMILIES:
            return CONTEXT_FAMILIES[self.context[0]]
        single = self.text_widths.get(TEXT_ENCODER)
        if self.one_encoder is not None and single is not None:
            return SINGLE_TEXT_FAMILIES.get(single[0])
        return None

    def summary(self) -> list[str]:
        """Human-readable pieces of evidence ("te1/te2 keys", "2048-wide context", ...)."""
        found = []
        if self.two_encoders is not None:
            found.append("te1/te2 keys")
        if self.one_encoder is not None:
            found.append("lora_te_ keys (one text encoder)")
        if self.context is not None:
            found.append(f"{self.context[0]}-wide context")
        for component, (width, _) in sorted(self.text_widths.items()):
            found.append(f"{component} {width} wide")
        return found


def component_of(prefix: str) -> str | None:
    """The component a file's layer prefix belongs to by its naming alone (None: unprefixed dotted)."""
    name = prefix.removeprefix(PEFT_PREFIX)
    if name.startswith((KOHYA_TEXT_2, f"{TEXT_ENCODER_2}.")):
        return TEXT_ENCODER_2
    if name.startswith((KOHYA_SINGLE_TEXT, KOHYA_TEXT_1, f"{TEXT_ENCODER}.")):
        return TEXT_ENCODER
    if name.startswith((KOHYA_UNET, f"{UNET}.")):
        return UNET
    return None


def collect_evidence(layer_inputs: Mapping[str, tuple[int | None, str]]) -> FamilyEvidence:
    """Evidence from {layer prefix: (input width of the layer or None, one of its keys)}."""
    evidence = FamilyEvidence()
    for prefix, (width, key) in layer_inputs.items():
        name = prefix.removeprefix(PEFT_PREFIX)
        component = component_of(prefix)
        # a second text encoder proves SDXL; lora_te1_ alone does not (A1111 reads it on SD1 too)
        if evidence.two_encoders is None and component == TEXT_ENCODER_2:
            evidence.two_encoders = key
        if evidence.one_encoder is None and name.startswith(KOHYA_SINGLE_TEXT):
            evidence.one_encoder = key
        if width is None:
            continue
        if evidence.context is None and name.endswith(CONTEXT_LAYER_ENDINGS):
            evidence.context = (width, key)
        if component in (TEXT_ENCODER, TEXT_ENCODER_2) and name.endswith(TEXT_WIDTH_LAYER_ENDINGS):
            evidence.text_widths.setdefault(component, (width, key))
    return evidence


def family_mismatch(evidence: FamilyEvidence, index: LayerIndex, family: str) -> str | None:
    """Why a file with this evidence was made for another model than `index`'s, or None if nothing says so."""
    found, key = [], None
    encoders = len(index.text_encoders)
    if evidence.two_encoders is not None and encoders == 1:
        found.append("te1/te2 keys")
        key = key or evidence.two_encoders
    if evidence.one_encoder is not None and encoders == 2:
        found.append("lora_te_ keys (one text encoder)")
        key = key or evidence.one_encoder
    context = evidence.context
    if context is not None and index.context_width is not None and context[0] != index.context_width:
        found.append(f"{context[0]}-wide context")
        key = key or context[1]
    for component, (width, width_key) in sorted(evidence.text_widths.items()):
        model_width = index.text_widths.get(component)
        if model_width is not None and width != model_width:
            found.append(f"{component} {width} wide")
            key = key or width_key
    if not found:
        return None
    guess = evidence.guess()
    made_for = FAMILY_LABELS[guess] if guess is not None else "another model"
    model = [f"{'two text encoders' if encoders == 2 else 'one text encoder'}"]
    if index.context_width is not None:
        model.append(f"{index.context_width}-wide context")
    model += [f"{component} {width} wide" for component, width in sorted(index.text_widths.items())]
    return (f"made for {made_for} ({', '.join(found)}), this model is "
            f"{FAMILY_LABELS.get(family, family)} ({', '.join(model)}); e.g. key {key!r}")


def metadata_family(metadata: Mapping[str, str]) -> str | None:
    """The family sd-scripts' training metadata names (ss_base_model_version, ss_v2, modelspec.architecture)."""
    version = metadata.get("ss_base_model_version", "")
    architecture = metadata.get("modelspec.architecture", "")
    if version.startswith("sdxl") or architecture.startswith("stable-diffusion-xl"):
        return "sdxl"
    if version.startswith("sd_v2") or architecture.startswith("stable-diffusion-v2") or metadata.get("ss_v2") == "True":
        return "sd2"
    if version.startswith("sd_v1") or architecture.startswith("stable-diffusion-v1"):
        return "sd1"
    return None
