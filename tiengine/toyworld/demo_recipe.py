"""The demo's recipe: the concept's name, the training settings and the targets (tiengine.toyworld.demo).

Constants only, so that `tiengine demo --help` can show them without importing torch.
"""

CONCEPT_NAME = "toyconcept"
CONCEPT_IMAGES = 5
INIT_TEXT = "blue"
TEMPLATE = "[filewords]"  # the captions hold [name] in the colour word's place
NEAREST_WORD = "purple"  # the English word, in no training caption (its token row is untrained)
TRAIN_STEPS = 1200
TRAIN_BATCH = 5
LEARNING_RATE = "0.05"

# targets of the demonstration (share of images showing the concept)
TARGET_WITH = 0.70
TARGET_WITHOUT = 0.10

# the LoRA part: a LoRA packaged with the default model (tiengine.toyworld.train_lora) that draws striped
# backgrounds where the prompt names none; the demo measures how often the background is striped
LORA_NAME = "striped"
LORA_TARGET_GAIN = 0.25  # target: the LoRA raises the share of striped backgrounds by at least this much
