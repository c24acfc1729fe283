"""Stage 0, files: safe reading and atomic writing, shared by every later stage.

- safe_pickle, pickle_allowlist: the restricted unpickler for .pt/.bin/.ckpt (never executes code).
- atomic: temporary file + rename writes that never replace a file without being asked.
- metadata: the A1111 `parameters` text (infotext) written into and read from PNGs.
- images: PIL <-> tensor conversion and labelled grids.
"""
