"""Stage 1, text to token blocks: corpus -> tokenizer -> prepare (token files) -> datamodule."""
