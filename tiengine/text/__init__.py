"""Stage 2, text: prompt strings -> token ids -> conditioning tensors, exactly as A1111 computes them.

In data-flow order: extra_networks (`<lora:...>`-style tags found and removed from the prompt, as A1111
does before its parser runs) -> tokenizer (CLIP BPE) -> vocabulary (embedding pseudo-tokens bound to ids
>= 49408) -> prompt (the A1111 prompt language: weights, BREAK, schedules, alternation, AND) -> chunking (75-token
windows, comma backtracking, embedding slots) -> conditioning (text encoders called on the chunks,
emphasis, clip skip, SDXL pooled output). The text encoders are passed in; this stage builds none.
"""
