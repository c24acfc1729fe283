"""Guidance wrappers: a conditional denoiser ``(x, sigma, cond) -> x0`` becomes a denoiser ``(x, sigma) -> x0``.

Classifier-free guidance (A1111's CFGDenoiser): ``guided_denoiser`` computes
``denoised = uncond + sum_j (cond_j - uncond) * w_j * cfg_scale`` with every cond and the uncond in one
batched call; positive conds of different token counts are padded to the longest by repeating their
last token vector (A1111's ``stack_conds``); an uncond of another token count is run as its own call
(A1111's default). AND composition is the sum over the (cond_j, w_j) parts.

Prompt schedules: ``scheduled_guided_denoiser`` picks, for denoiser call number i (0-based, one per
call, so second-order samplers advance twice per step), the first (last_step, cond) entry with
``i <= last_step`` (A1111's ``reconstruct_cond_batch``, including its fallback to the first entry).
``unet_schedule`` turns a prompt's per-step text-encoder outputs into the UNet's conds (SDXL's pooled
output and size vector become "y"); ``stack_schedules`` joins per-image schedules into one batched
schedule, so that different prompts share one sampling run (the Engine's generate_batch).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import torch

from tiengine.diffusion.schedules import Cond, CondDenoiser, Denoiser, SamplingError

if TYPE_CHECKING:
    from tiengine.models.unet import UNet2DConditionModel

PromptSchedule = Sequence[tuple[int, Cond]]  # (last_step, cond) pairs, last_step increasing


def _cond_items(cond: Cond) -> dict[str, torch.Tensor]:
    return dict(cond) if isinstance(cond, Mapping) else {"": cond}


def _cond_from_items(items: dict[str, torch.Tensor], like: Cond) -> Cond:
    return items if isinstance(like, Mapping) else items[""]


def _check_batch(cond: Cond, batch: int, what: str) -> None:
    for key, value in _cond_items(cond).items():
        if value.ndim < 1 or value.shape[0] != batch:
            name = f"{what}[{key!r}]" if key else what
            raise SamplingError(f"{name}: expected batch size {batch} (the latent's), found shape {tuple(value.shape)}")


def _stack_positive(conds: Sequence[Cond]) -> Cond:
    """Concatenate along batch: (K*B, ...). Token axes (dim 1 of 3-D tensors) are padded to the longest
    by repeating each cond's last token vector (A1111's stack_conds)."""
    keys = list(_cond_items(conds[0]))
    stacked = {}
    for key in keys:
        values = []
        for cond in conds:
            items = _cond_items(cond)
            if list(items) != keys:
                raise SamplingError(f"conds: every cond needs the keys {keys}, found {list(items)}")
            values.append(items[key])
        longest = max(v.shape[1] for v in values) if values[0].ndim == 3 else None
        if longest is not None:
            values = [
                torch.cat([v, v[:, -1:].expand(-1, longest - v.shape[1], -1)], dim=1) if v.ndim == 3 else v
                for v in values
            ]  # each (B, longest, C)
        if any(v.shape[1:] != values[0].shape[1:] for v in values):
            raise SamplingError(f"conds[{key!r}]: shapes differ: {[tuple(v.shape) for v in values]}")
        stacked[key] = torch.cat(values)
    return _cond_from_items(stacked, conds[0])


def _same_layout(a: Cond, b: Cond) -> bool:
    items_a, items_b = _cond_items(a), _cond_items(b)
    return list(items_a) == list(items_b) and all(items_a[k].shape[1:] == items_b[k].shape[1:] for k in items_a)


def _concat(a: Cond, b: Cond) -> Cond:
    items_a, items_b = _cond_items(a), _cond_items(b)
    return _cond_from_items({k: torch.cat([items_a[k], items_b[k]]) for k in items_a}, a)


def _guide(
    denoiser: CondDenoiser, x: torch.Tensor, sigma: torch.Tensor, uncond: Cond,
    conds: Sequence[tuple[Cond, float]], cfg_scale: float,
) -> torch.Tensor:
    if not conds:
        raise SamplingError("guidance: expected at least one positive cond")
    batch, count = x.shape[0], len(conds)
    _check_batch(uncond, batch, "uncond")
    for j, (cond, _) in enumerate(conds):
        _check_batch(cond, batch, f"conds[{j}]")
    positive = _stack_positive([cond for cond, _ in conds])  # (K*B, ...)
    x_pos = x.repeat(count, *([1] * (x.ndim - 1)))  # (K*B, C, H, W)
    sigma_pos = sigma.repeat(count)  # (K*B,)
    if _same_layout(positive, uncond):
        out = denoiser(torch.cat([x_pos, x]), torch.cat([sigma_pos, sigma]), _concat(positive, uncond))
        out_pos, out_uncond = out[: count * batch], out[count * batch :]
    else:
        out_pos, out_uncond = denoiser(x_pos, sigma_pos, positive), denoiser(x, sigma, uncond)
    denoised = out_uncond.clone()
    for j, (_, weight) in enumerate(conds):
        denoised += (out_pos[j * batch : (j + 1) * batch] - out_uncond) * (weight * cfg_scale)
    return denoised


def guided_denoiser(
    denoiser: CondDenoiser, uncond: Cond, conds: Sequence[tuple[Cond, float]], cfg_scale: float
) -> Denoiser:
    """Classifier-free guidance with AND composition: uncond + sum_j (cond_j - uncond) * w_j * cfg_scale.

    ``conds`` are (cond, weight) pairs, one per AND part; every cond and the uncond have the latent's
    batch size B (image b's conditioning at row b).
    """

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return _guide(denoiser, x, sigma, uncond, conds, cfg_scale)

    return denoise


def scheduled_cond(schedule: PromptSchedule, call_index: int) -> Cond:
    """The cond for denoiser call `call_index` (0-based): the first entry with call_index <= last_step,
    else the first entry (A1111's reconstruct_cond_batch)."""
    if not schedule:
        raise SamplingError("prompt schedule: expected at least one (last_step, cond) entry")
    for last_step, cond in schedule:
        if call_index <= last_step:
            return cond
    return schedule[0][1]


def scheduled_guided_denoiser(
    denoiser: CondDenoiser, uncond: PromptSchedule, conds: Sequence[tuple[PromptSchedule, float]],
    cfg_scale: float,
) -> Denoiser:
    """``guided_denoiser`` whose uncond and AND parts follow per-call prompt schedules.

    Each schedule is a list of (last_step, cond) pairs (a constant cond is ``[(steps, cond)]``). The
    returned denoiser counts its calls, so use one per sampling run.
    """
    calls = 0

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        index, calls = calls, calls + 1
        chosen = [(scheduled_cond(schedule, index), weight) for schedule, weight in conds]
        return _guide(denoiser, x, sigma, scheduled_cond(uncond, index), chosen, cfg_scale)

    return denoise


def stack_schedules(schedules: Sequence[PromptSchedule]) -> list[tuple[int, Cond]]:
    """Per-image schedules of (1, ...) conds -> one schedule of (B, ...) conds, image i at row i.

    The entries are the union of the images' step boundaries; the entry for boundary s holds each
    image's cond for denoiser call s, which is its cond for every call that entry covers (A1111's
    first-entry-with-call <= last_step rule). One schedule repeated B times is expanded, not copied."""
    batch = len(schedules)
    if all(schedule is schedules[0] for schedule in schedules):
        return [
            (last_step, _cond_from_items({key: value.expand(batch, *value.shape[1:])
                                          for key, value in _cond_items(cond).items()}, cond))
            for last_step, cond in schedules[0]
        ]  # (B, ...) views of (1, ...)
    boundaries = sorted({last_step for schedule in schedules for last_step, _ in schedule})
    stacked = []
    for last_step in boundaries:
        conds = [_cond_items(scheduled_cond(schedule, last_step)) for schedule in schedules]
        joined = {key: torch.cat([cond[key] for cond in conds]) for key in conds[0]}  # (B, ...)
        stacked.append((last_step, _cond_from_items(joined, scheduled_cond(schedules[0], last_step))))
    return stacked


def unet_schedule(
    entries: Sequence[tuple[int, torch.Tensor, torch.Tensor | None]],
    unet: UNet2DConditionModel,
    size_ids: Sequence[float] | None,
    *,
    dtype: torch.dtype,
) -> list[tuple[int, dict[str, torch.Tensor]]]:
    """[(last_step, context (1, T, C), pooled (1, P) | None)] -> [(last_step, {"context": (1, T, C)[, "y"]})].

    With `size_ids` (SDXL's size conditioning, tiengine.models.config.size_time_ids) each entry also gets
    "y" = unet.text_time_conditioning(pooled, sizes) (1, 2816), computed in float32 and cast to `dtype`."""
    schedule = []
    for last_step, context, pooled in entries:
        cond = {"context": context}
        if size_ids is not None:
            if pooled is None:
                raise SamplingError("unet_schedule: size conditioning needs the pooled text output, found None")
            time_ids = torch.tensor([list(size_ids)], dtype=torch.float32, device=context.device)  # (1, K)
            cond["y"] = unet.text_time_conditioning(pooled.to(torch.float32), time_ids).to(dtype)  # (1, 2816)
        schedule.append((last_step, cond))
    return schedule
