"""The demo's textual-inversion recipe (tiengine.toyworld.demo), importable without torch so that
`tiengine demo --help` can name it."""

from __future__ import annotations

CONCEPT_NAME = "toyconcept"
CONCEPT_IMAGES = 5
INIT_TEXT = "blue"
TEMPLATE = "[filewords]"  # the captions hold [name] in the colour word's place
NEAREST_WORD = "purple"  # the English word, in no training caption (its token row is untrained)
TRAIN_STEPS = 1200
TRAIN_BATCH = 5
LEARNING_RATE = "0.05"
