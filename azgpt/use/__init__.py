"""Stage 3, using a trained model: generate text and export it."""
