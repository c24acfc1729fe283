"""Fused Triton kernels for Stable Diffusion's hot spots, each beside its PyTorch reference.

Installed as `tiengine.kernels` (setuptools package-dir). Modules:
- attention: flash-attention forward and backward for (batch, heads, tokens, head_dim) inputs.
- groupnorm: GroupNorm followed by SiLU (UNet resnet blocks, VAE).
- geglu: the GEGLU feed-forward projection of SD transformer blocks, matmul and gate fused.

Every kernel module imports triton, so nothing here is imported by `import tiengine`; the dispatchers
import them only for CUDA tensors: tiengine/models/attention.py (attention) and tiengine/models/fusions.py
(groupnorm and geglu, for the UNet's and VAE's GroupNorm(+SiLU) and the transformer feed-forward's GEGLU). Each module
has `supports(...)` (may the Triton kernel run these tensors), a `*_reference` in plain PyTorch with fp32
statistics, and a launcher that validates its inputs and raises KernelInputError with the argument name,
what was expected and what was found.
"""
