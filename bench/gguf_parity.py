"""GGUF export of a checkpoint: file size per outtype, and how far transformers' logits (loading the GGUF) are
from azgpt's on the same tokens; then how often the GGUF tokenizer gives azgpt's ids on real text.

    PYTHONPATH=. python bench/gguf_parity.py --ckpt lightning_logs/version_0/checkpoints/last.ckpt

Logit differences are max |transformers - azgpt| over a block of tokens from the sample corpus, against
(a) azgpt with the weights as the file stores them and tanh GELU: only float32 arithmetic differs;
(b) azgpt in float32 with tanh GELU: adds f16 / q8_0 rounding;
(c) azgpt exactly as trained: adds the tanh GELU llama.cpp's gpt2 computes, for a model trained with exact GELU.
Needs gguf, transformers and accelerate.
"""

from __future__ import annotations

import argparse
import copy
import shlex
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

from azgpt.checkpoint import load_checkpoint
from azgpt.data.corpus import iter_documents
from azgpt.model import GPT
from azgpt.use.gguf import OUTTYPES, context_length, export_gguf


def stored_as(model: GPT, outtype: str) -> GPT:
    """``model`` with tanh GELU and every matrix encoded to ``outtype`` and back, as the GGUF holds it."""
    import gguf

    model = copy.deepcopy(model)
    model.use_activation("gelu_tanh")
    qtype = gguf.GGMLQuantizationType[outtype.upper()]
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() == 2:
                decoded = gguf.quants.dequantize(gguf.quants.quantize(param.numpy(), qtype), qtype)
                param.copy_(torch.from_numpy(np.asarray(decoded, dtype=np.float32)).reshape(param.shape))
    return model


def logits(model: GPT, ids: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([ids]))[0][0, :, : model.config.vocab_size]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ckpt", required=True)
    parser.add_argument("--lines", type=int, default=2000, help="sample-corpus lines to compare token ids on")
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    checkpoint = load_checkpoint(args.ckpt)
    model, tokenizer = checkpoint.build_model(), checkpoint.tokenizer
    # the shipped sample corpus, normalised as azgpt reads it (NFC, Latin ə)
    lines = [line for doc in iter_documents(None) for line in doc.splitlines() if line.strip()][: args.lines]
    ids = tokenizer.encode(" ".join(lines[:50])).ids[: model.config.block_size]
    tanh = stored_as(model, "f32")
    print(f"model: {args.ckpt} ({model.config.n_layer} layers, n_embd {model.config.n_embd}, "
          f"activation {model.config.activation}); logits over {len(ids)} tokens, largest |logit| "
          f"{logits(model, ids).abs().max().item():.2f}")
    print(f"{'outtype':<8} {'bytes':>10}  {'(a) as stored':>14} {'(b) f32 tanh':>13} {'(c) as trained':>15}")
    with tempfile.TemporaryDirectory() as tmp:
        for outtype in OUTTYPES:
            path, _ = export_gguf(args.ckpt, Path(tmp) / outtype / "azgpt", outtype=outtype)
            hf = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32,
                                                      n_positions=context_length(model)).eval()
            with torch.no_grad():
                theirs = hf(torch.tensor([ids])).logits[0]
            diffs = [(theirs - logits(m, ids)).abs().max().item() for m in (stored_as(model, outtype), tanh, model)]
            print(f"{outtype:<8} {path.stat().st_size:>10,}  {diffs[0]:>14.1e} {diffs[1]:>13.1e} {diffs[2]:>15.1e}")
        hf_tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    same = sum(hf_tokenizer(line)["input_ids"] == tokenizer.encode(line).ids for line in lines)
    print(f"tokenizer: same ids on {same}/{len(lines)} sample-corpus lines")
    print(f"reproduce: PYTHONPATH=. python {shlex.join(sys.argv)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
