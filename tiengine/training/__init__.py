"""Stage 8, training: textual inversion and LoRA on a frozen model.

- textual_inversion: the recipe (settings, initial vectors, the denoising loss) and the result types.
- data: image folders, captions, templates and learning-rate schedules.
- state: checkpoints and the loss log, for bit-exact resume.
- run: the training loop and its entry point `train_embedding(engine, images, name, settings, ...)`.
- lora: low-rank adapters on a frozen model's layers, their training loop and kohya-format files.
"""
