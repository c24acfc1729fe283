"""Prompt tags -> networks applied to the model: resolution, reports, and weight patching that undoes exactly.

`NetworkResolver.resolve(tags)` turns the extra-network tags of a prompt (tiengine.text.extra_networks)
into an `ActiveNetworks` set and one `NetworkReport` per tag. AUTOMATIC1111's rules:
- kinds `lora` and `lyco` (an alias A1111 registers for LyCORIS files) name LoRA / LyCORIS files;
  `hypernet` names a hypernetwork; other kinds are removed from the text and reported as unknown;
- only the positive prompt's tags are removed and activate networks (A1111 parses the prompts, not the
  negative prompts, for them); a tag in the negative prompt stays text there and is reported as not
  applied;
- `<lora:name:te:unet:dyn>` multipliers (te default 1, unet default te), `<hypernet:name:strength>`;
- the same network named twice is applied twice (A1111 keeps every mention);
- a name found in no folder, a file that fails to load or does not fit the model: the tag is skipped with
  the reason, as embeddings are; generation goes on.
Loaded networks are cached by file (path, size, modification time), so a prompt that names the same file
again costs nothing.

`NetworkPatcher.activate(active)` makes the modules carry exactly `active`: LoRA updates are added to the
weights in place, in tag order (A1111's `weight += updown`, in the weight's dtype), after a copy of every
changed weight is kept; hypernetworks are set as the UNet attention's key/value context transform.
Activating another set first restores the kept copies (bit-equal to the base weights), so switching costs
the changed layers' arithmetic, not a model reload. An empty set restores the base model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from tiengine.embeddings.embedding import Embedding
from tiengine.errors import NetworkError, TiengineError
from tiengine.networks.hashes import lora_file_hash
from tiengine.networks.hypernetwork import (
    Hypernetwork,
    apply_hypernetworks,
    load_hypernetwork,
)
from tiengine.networks.library import FileSignature, NetworkFile, NetworkLibrary
from tiengine.networks.lora import LayerUpdate, LoraNetwork, load_lora
from tiengine.text.extra_networks import (
    HYPERNET_KINDS,
    LORA_KINDS,
    ExtraNetworkTag,
    hypernet_arguments,
    lora_arguments,
)

SHORT_HASH_DIGITS = 12  # A1111's Lora shorthash (network.py NetworkOnDisk.shorthash)
TEXT_ENCODER_COMPONENTS = ("text_encoder", "text_encoder_2")


@dataclass(frozen=True)
class ActiveLora:
    network: LoraNetwork
    file_state: tuple[str, FileSignature]  # (path, (mtime_ns, size)) of the file the network was read from
    name: str  # as written in the prompt (A1111's mentioned_name, used in `Lora hashes`)
    short_hash: str
    te_multiplier: float
    unet_multiplier: float
    dyn_dim: int | None


@dataclass(frozen=True)
class ActiveHypernetwork:
    network: Hypernetwork
    file_state: tuple[str, FileSignature]
    name: str
    multiplier: float


@dataclass(frozen=True)
class ActiveNetworks:
    """The networks one sampling run uses, in tag order."""

    loras: tuple[ActiveLora, ...] = ()
    hypernetworks: tuple[ActiveHypernetwork, ...] = ()

    @property
    def key(self) -> tuple:
        """Identity of the set: which file versions, with which multipliers, in which order."""
        return (
            tuple((lora.file_state, lora.te_multiplier, lora.unet_multiplier, lora.dyn_dim) for lora in self.loras),
            tuple((hyper.file_state, hyper.multiplier) for hyper in self.hypernetworks),
        )

    @property
    def bundled_embeddings(self) -> dict[str, Embedding]:
        """Embeddings carried inside the active LoRA files (usable while the LoRA is in the prompt)."""
        found: dict[str, Embedding] = {}
        for lora in self.loras:
            for name, embedding in lora.network.bundled_embeddings.items():
                found.setdefault(name, embedding)
        return found

    def lora_hashes(self) -> dict[str, str]:
        """Infotext `Lora hashes`: name as written -> short hash, first mention first (A1111 drops ':' and ','
        from the names there)."""
        hashes: dict[str, str] = {}
        for lora in self.loras:
            hashes.setdefault(lora.name.translate(str.maketrans("", "", ":,")), lora.short_hash)
        return hashes

    def __bool__(self) -> bool:
        return bool(self.loras or self.hypernetworks)


@dataclass(frozen=True)
class NetworkReport:
    """What happened to one extra-network tag of a prompt."""

    tag: str  # as written
    kind: str
    name: str
    where: str  # "positive" or "negative"
    applied: bool
    reason: str | None = None  # why it was not applied
    te_multiplier: float | None = None
    unet_multiplier: float | None = None
    dyn_dim: int | None = None
    multiplier: float | None = None  # hypernetworks
    file: str | None = None  # relative path in its folder
    short_hash: str | None = None
    layers: int = 0  # weights (LoRA) or attention widths (hypernetwork) changed
    unmatched_keys: int = 0

    def as_dict(self) -> dict[str, object]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}


@dataclass
class _Loaded:
    signature: FileSignature
    network: LoraNetwork | Hypernetwork | None
    short_hash: str | None
    error: str | None


@dataclass
class NetworkResolver:
    """Names in tags -> loaded networks of one model, cached by file state."""

    modules: Mapping[str, nn.Module]
    family: str
    loras: NetworkLibrary | None = None
    hypernetworks: NetworkLibrary | None = None
    _cache: dict[Path, _Loaded] = field(default_factory=dict)

    def resolve(self, tags: Sequence[ExtraNetworkTag]) -> tuple[ActiveNetworks, list[NetworkReport]]:
        loras: list[ActiveLora] = []
        hypernetworks: list[ActiveHypernetwork] = []
        reports = []
        for tag in tags:
            try:
                report, active = self._resolve_one(tag)
            except TiengineError as error:  # unreadable arguments: the tag is skipped, as in A1111
                report, active = NetworkReport(tag.text, tag.kind, tag.name, tag.where, False, str(error)), None
            reports.append(report)
            if isinstance(active, ActiveLora):
                loras.append(active)
            elif isinstance(active, ActiveHypernetwork):
                hypernetworks.append(active)
        return ActiveNetworks(tuple(loras), tuple(hypernetworks)), reports

    def _resolve_one(self, tag: ExtraNetworkTag) -> tuple[NetworkReport, ActiveLora | ActiveHypernetwork | None]:
        base = NetworkReport(tag.text, tag.kind, tag.name, tag.where, False)
        if tag.where != "positive":
            return _replace(base, reason="in the negative prompt: not applied and read as words, as A1111 does "
                                         "(it takes extra networks from the positive prompt only)"), None
        if tag.kind in LORA_KINDS:
            arguments = lora_arguments(tag)
            base = _replace(base, name=arguments.name, te_multiplier=arguments.te_multiplier,
                            unet_multiplier=arguments.unet_multiplier, dyn_dim=arguments.dyn_dim)
            library, folder_option = self.loras, "--loras"
        elif tag.kind in HYPERNET_KINDS:
            name, multiplier = hypernet_arguments(tag)
            base = _replace(base, name=name, multiplier=multiplier)
            library, folder_option = self.hypernetworks, "--hypernetworks"
        else:
            return _replace(base, reason=f"unknown extra network kind {tag.kind!r} (tiengine applies "
                                         f"{', '.join(LORA_KINDS + HYPERNET_KINDS)}); removed from the text"), None
        if not base.name:
            return _replace(base, reason="the tag names no network"), None
        if library is None:
            return _replace(base, reason=f"no {library_kind(tag.kind)} folder is set ({folder_option})"), None
        found = library.lookup(base.name)
        if found is None:
            return _replace(base, reason=f"no {library_kind(tag.kind)} named {base.name!r} in {library.folder}"), None
        loaded = self._load(found, tag.kind)
        base = _replace(base, file=found.relative_path, short_hash=loaded.short_hash)
        if loaded.network is None:
            return _replace(base, reason=loaded.error), None
        if isinstance(loaded.network, Hypernetwork):
            assert base.multiplier is not None
            widths = len(loaded.network.sizes)
            return _replace(base, applied=True, layers=widths), \
                ActiveHypernetwork(loaded.network, (str(found.path), found.signature), base.name, base.multiplier)
        assert base.te_multiplier is not None and base.unet_multiplier is not None
        network = loaded.network
        return (
            _replace(base, applied=True, layers=len(network.updates), unmatched_keys=len(network.unmatched)),
            ActiveLora(network, (str(found.path), found.signature), base.name, loaded.short_hash or "", base.te_multiplier, base.unet_multiplier,
                       base.dyn_dim),
        )

    def _load(self, found: NetworkFile, kind: str) -> _Loaded:
        cached = self._cache.get(found.path)
        if cached is not None and cached.signature == found.signature:
            return cached
        try:
            if kind in LORA_KINDS:
                network: LoraNetwork | Hypernetwork = load_lora(found.path, self.modules, family=self.family)
                short_hash = lora_file_hash(found.path)[:SHORT_HASH_DIGITS]
            else:
                weight = next(self.modules["unet"].parameters())  # the hypernetwork runs where the UNet runs
                network = load_hypernetwork(found.path, device=weight.device, dtype=weight.dtype)
                short_hash = network.short_hash
            loaded = _Loaded(found.signature, network, short_hash, None)
        except (TiengineError, OSError) as error:
            loaded = _Loaded(found.signature, None, None, _without_path(str(error), found.path))
        self._cache[found.path] = loaded
        return loaded


def library_kind(kind: str) -> str:
    return "hypernetwork" if kind in HYPERNET_KINDS else "LoRA"


class NetworkPatcher:
    """Adds LoRA updates to a model's weights and sets hypernetworks, undoing the previous set exactly.

    A copy of each weight is taken the first time a network changes it and kept (A1111 keeps its
    `network_weights_backup` the same way): later sets write `copy + their updates` straight into the
    weight (one pass, no allocation), and layers the new set leaves alone get their copy back."""

    def __init__(self, modules: Mapping[str, nn.Module]) -> None:
        self.modules = modules
        self._backups: dict[tuple[str, str], torch.Tensor] = {}  # (component, module) -> base weight copy
        self._changed: set[tuple[str, str]] = set()  # layers that differ from their copy now
        self._active_key: tuple = ActiveNetworks().key
        self.active = ActiveNetworks()

    def activate(self, active: ActiveNetworks) -> None:
        """Make the modules carry exactly `active` (no work when they already do)."""
        if active.key == self._active_key:
            self.active = active
            return
        plan: dict[tuple[str, str], list[tuple[ActiveLora, LayerUpdate, float]]] = {}
        for lora in active.loras:
            for update in lora.network.updates:
                multiplier = lora.te_multiplier if update.component in TEXT_ENCODER_COMPONENTS else lora.unet_multiplier
                if multiplier != 0:  # 0: the base weight, bit for bit (W + 0 * delta would turn -0.0 into +0.0)
                    plan.setdefault((update.component, update.module), []).append((lora, update, multiplier))
        with torch.no_grad():
            for key in self._changed - plan.keys():
                self._layer_weight(key).copy_(self._backups[key])
            self._changed = set()
            for key, updates in plan.items():
                weight = self._layer_weight(key)
                if key not in self._backups:
                    self._backups[key] = weight.detach().clone()
                source = self._backups[key]  # the first update is added to the base copy, the next ones in place
                self._changed.add(key)
                for lora, update, multiplier in updates:
                    try:
                        _add_update(weight, source, update, multiplier, lora.dyn_dim)
                    except NetworkError as error:
                        self.restore()
                        raise NetworkError(f"{lora.network.path}: {error}") from None
                    source = weight
        apply_hypernetworks(self.modules["unet"], [(hyper.network, hyper.multiplier) for hyper in active.hypernetworks])
        self._active_key = active.key
        self.active = active

    def restore(self) -> None:
        """Put every changed weight back (bit-equal) and drop the hypernetworks."""
        with torch.no_grad():
            for key in self._changed:
                self._layer_weight(key).copy_(self._backups[key])
        self._changed = set()
        apply_hypernetworks(self.modules["unet"], [])
        self._active_key = ActiveNetworks().key
        self.active = ActiveNetworks()

    def release(self) -> None:
        """Restore the base model and free the kept weight copies (the next network copies again)."""
        self.restore()
        self._backups.clear()

    def _layer_weight(self, key: tuple[str, str]) -> torch.Tensor:
        component, module = key
        return self.modules[component].get_submodule(module).weight


def _add_update(weight: torch.Tensor, source: torch.Tensor, update: LayerUpdate, multiplier: float,
                dyn_dim: int | None) -> None:
    """weight := source + multiplier * update (source is the base copy or the weight itself).

    A plain LoRA / LoCon layer on an fp32 weight is one addmm (`source + m * scale * up @ down`, written into
    the weight with no weight-sized temporary); every other case adds `update.delta` in the weight's dtype
    (A1111's `weight += updown`)."""
    tensors = update.tensors
    out_features = weight.shape[0]
    plain = update.algorithm == "lora" and "lora_mid.weight" not in tensors and dyn_dim is None \
        and weight.dtype == torch.float32 and weight.is_contiguous() and source.is_contiguous()
    if plain:
        up = tensors["lora_up.weight"].flatten(1).to(weight.device, torch.float32)  # (out, rank)
        down = tensors["lora_down.weight"].flatten(1).to(weight.device, torch.float32)  # (rank, in * kh * kw)
        plain = (up.shape[0], down.shape[1]) == (out_features, weight[0].numel())  # else e.g. padded conv_in
    if plain:
        target = weight.view(out_features, -1)  # (out, in * kh * kw)
        if source is weight:
            target.addmm_(up, down, alpha=multiplier * update.scale)
        else:
            torch.addmm(source.view(out_features, -1), up, down, alpha=multiplier * update.scale, out=target)
        return
    delta = update.delta(weight, dyn_dim) * multiplier
    if not math.isfinite(float(delta.abs().max())):
        raise NetworkError(f"the update of {update.key} is not finite at multiplier {multiplier:g}")
    if source is not weight:
        weight.copy_(source)
    weight.add_(delta.to(weight.dtype))


def _replace(report: NetworkReport, **fields: object) -> NetworkReport:
    return NetworkReport(**{**report.as_dict(), **fields})  # type: ignore[arg-type]


def _without_path(message: str, path: Path) -> str:
    """A load error as a skip reason: the report names the file already."""
    return message[len(str(path)):].lstrip(": ") if message.startswith(str(path)) else message
