"""The one target id every loss skips, shared by the model that computes the loss and the data that writes it.

Padding rows and blocks, the prompt tokens of instruction data, special tokens and tokens an earlier evaluation
window already scored all get it: they add nothing to a loss, a token count or a byte count. It sits below both the
model and the data (tests/test_layering.py), which may not import each other.
"""

PAD_TARGET = -1
