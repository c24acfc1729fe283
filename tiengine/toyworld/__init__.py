"""The toy world behind the built-in default model, outside the engine's data flow.

- world: the procedural generator of 64x64 scenes of coloured shapes and their captions.
- detector: a rule-based detector that scores whether an image shows what its prompt says.
- model_card, evaluation: prompt adherence of a model on held-out prompts, and the model card.
- train_base: trains the default model from scratch (`python -m tiengine.toyworld.train_base`).
- demo: `tiengine demo`, textual inversion end to end on the default model.
Everything here generates through tiengine.engine.Engine, the same path users take.
"""
