"""Stage 3, models: the networks, in plain PyTorch, with names that mirror diffusers and HF CLIP.

- config: ModelConfig (family, prediction, text encoders, UNet, VAE, noise schedule) and its JSON form.
- text_encoder: CLIP-L, OpenCLIP-H and OpenCLIP-bigG text transformers.
- unet, vae, layers: the UNet2DConditionModel and AutoencoderKL with their building blocks.
- attention: the attention dispatcher (PyTorch SDPA, or tiengine.kernels' Triton kernels on CUDA).
Loading weights into these modules is tiengine.weights_conv's job (`load_models`).
"""
