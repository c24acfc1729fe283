"""Stage 5, training: textual inversion on a frozen model.

- textual_inversion: the recipe (settings, initial vectors, the denoising loss) and the result types.
- data: image folders, captions, templates and learning-rate schedules.
- state: checkpoints and the loss log, for bit-exact resume.
- run: the training loop and its entry point `train_embedding(engine, images, name, settings, ...)`.
"""
