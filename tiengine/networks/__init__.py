"""Extra networks: LoRA / LyCORIS files and A1111 hypernetworks, read safely and applied to a loaded model.

A stage after `tiengine.weights_conv` (whose LDM -> diffusers module tables name the layers of kohya's
SDXL files) and before `tiengine.training`; it changes the models' weights and attention inputs. The prompt side (finding and removing `<lora:...>` tags) lives in
`tiengine.text.extra_networks`; this package turns the tags' names into files and the files into weight
updates.
"""
