"""Stage 1, embeddings: textual-inversion files in every layout found in the wild.

- embedding: the Embedding type, `load_embedding` / `save_embedding` (.pt, .bin, .safetensors, PNG/WebP).
- layouts: how each known file layout stores its vectors (A1111, diffusers, SDXL clip_l/clip_g, bundles).
- image: embeddings hidden in PNG/WebP images (text chunk and pixel carriers).
- library: a scanned folder of embeddings with name collisions resolved and unreadable files reported.
"""
