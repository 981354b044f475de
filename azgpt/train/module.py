"""AzGPT: the LightningModule that trains a GPT (loss, AdamW groups, LR schedule, validation metrics)."""

from __future__ import annotations

import importlib.util
import inspect
import math
from dataclasses import asdict, fields, replace
from typing import Any, Literal, Optional, Union, get_type_hints

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch.optim.lr_scheduler import LambdaLR
from torchmetrics.aggregation import SumMetric

from azgpt.checkpoint import ARCHITECTURE_KEYS, CHECKPOINT_KEY, CONFIG_KEYS, azgpt_entry, upgrade_hyperparameters
from azgpt.train.resume import capture_rng_state, restore_rng_state
from azgpt.targets import PAD_TARGET
from azgpt.errors import AzGPTError
from azgpt.model import GPT, GPTConfig
from azgpt.train.muon import Muon, MuonWithAdamW, hidden_matrices
from azgpt.train.optim import RECIPE_OPTIMIZERS, OptimConfig
from azgpt.train.numerics import UpdateGuard
from azgpt.data.tokenizer import bits_per_byte, token_byte_lengths, tokenizer_from_json, tokenizer_sha256

DATA_SUMMARY_KEYS = ("source", "corpora", "normalization", "tokenizer_sha256")
OPTIM_KEYS = tuple(f.name for f in fields(OptimConfig))
# The architecture options a recipe may choose: AzGPT takes None (the recipe's choice) for them unless given.
RECIPE_KEYS = ("position", "norm", "qk_norm", "mlp", "tie_embeddings", "zero_init", "logit_softcap",
               "embedding_norm")
# model.compile: true, false, or "cuda" (compile when training on a CUDA GPU where Triton can build kernels).
CompileSetting = Union[bool, Literal["cuda"]]


def compile_decision(setting: CompileSetting, device: torch.device) -> tuple[bool, str | None]:
    """Whether ``setting`` compiles the model on ``device``, and why not where ``"cuda"`` had to fall back."""
    if isinstance(setting, bool):
        return setting, None
    if setting != "cuda":
        raise AzGPTError(f"model.compile must be true, false or cuda, got {setting!r}")
    if device.type != "cuda":
        return False, None  # "cuda" means: only on a GPU
    if importlib.util.find_spec("triton") is None:
        return False, "Triton is not installed, so torch.compile has no GPU backend"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 7:
        return False, f"this GPU's compute capability {major}.{minor} is below Triton's 7.0"
    return True, None


def warmup_cosine(step: int, warmup_steps: int, decay_steps: int, min_lr_ratio: float) -> float:
    """LR multiplier: linear warmup to 1, then cosine down to ``min_lr_ratio`` at ``decay_steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, decay_steps - warmup_steps))
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def warmup_stable_decay(step: int, warmup_steps: int, total_steps: int, cooldown_fraction: float,
                        min_lr_ratio: float, shape: str = "linear") -> float:
    """LR multiplier: linear warmup to 1, constant, then down to ``min_lr_ratio`` over the last
    ``cooldown_fraction`` of ``total_steps`` (linearly, or as 1 - sqrt of the progress), reaching it on the last
    step (``step`` counts scheduler steps from 0, so the last optimizer step is ``total_steps - 1``)."""
    cooldown = max(1, round(cooldown_fraction * total_steps))
    warm = (step + 1) / warmup_steps if step < warmup_steps else 1.0
    progress = min(1.0, max(0.0, (step + 1 - (total_steps - cooldown)) / cooldown))
    remaining = 1.0 - (math.sqrt(progress) if shape == "1-sqrt" else progress)
    return min(warm, min_lr_ratio + (1.0 - min_lr_ratio) * remaining)


def resolve_recipe(settings: dict[str, Any]) -> tuple[GPTConfig, OptimConfig]:
    """The architecture and optimizer that AzGPT's ``settings`` describe: what they leave at None comes from their
    ``recipe`` (see RECIPES and RECIPE_OPTIMIZERS), then from GPTConfig's and OptimConfig's defaults."""
    recipe = settings.get("recipe") or "gpt2"
    try:
        config = GPTConfig.from_recipe(recipe, **{key: settings.get(key) for key in CONFIG_KEYS})
        optim = OptimConfig(**{key: settings[key] for key in OPTIM_KEYS if key in settings})
    except ValueError as exc:
        message = str(exc)
        raise AzGPTError(message if message.startswith("model") else f"model: {message}") from None
    optim.optimizer = optim.optimizer or RECIPE_OPTIMIZERS[recipe]
    return config, optim


def with_recipe(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` with every value resolved as the model built from them has it (see ``resolve_recipe``)."""
    config, optim = resolve_recipe(settings)
    return {**settings, **asdict(config), "optimizer": optim.optimizer}


def settings_parameters(cls: type, defaults: Any | None, optional: tuple[str, ...] = ()) -> list[inspect.Parameter]:
    """A keyword parameter for each field of the dataclass ``cls``, typed as the field; its default is the field's
    value in ``defaults`` (an instance), or None (``Optional``) where ``defaults`` is None or names it in
    ``optional``."""
    hints = get_type_hints(cls)
    parameters = []
    for field in fields(cls):
        if defaults is None or field.name in optional:
            default, hint = None, Optional[hints[field.name]]
        else:
            default, hint = getattr(defaults, field.name), hints[field.name]
        parameters.append(inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                            annotation=hint))
    return parameters


def settings_signature(*parameters: inspect.Parameter) -> inspect.Signature:
    """The signature of an ``__init__(self, **settings)`` that takes ``parameters`` by keyword: jsonargparse
    (LightningCLI's flags and configs), Lightning's ``load_from_checkpoint`` and ``inspect`` all read it."""
    return inspect.Signature([inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD), *parameters])


def bind_settings(signature: inspect.Signature, owner: object, settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` checked against ``signature`` as Python checks a call's arguments, with the defaults added."""
    try:
        bound = signature.bind(owner, **settings)
    except TypeError as exc:
        raise TypeError(f"{type(owner).__name__}(): {exc}") from None
    bound.apply_defaults()
    return {key: value for key, value in bound.arguments.items() if key != "self"}


def settings_doc(*classes: type) -> str:
    """The ``Args:`` sections of ``classes``' docstrings as one (jsonargparse's help text for each flag)."""
    sections = [inspect.cleandoc(cls.__doc__).partition("Args:\n")[2] for cls in classes]
    return "Settings by keyword.\n\nArgs:\n" + "\n".join(section.rstrip() for section in sections) + "\n"


# Recipe settings without weights that a run resumed from a checkpoint keeps as trained when its config leaves them
# to the recipe (None): the modern recipe turned embedding_norm on after checkpoints were trained without it.
KEPT_FROM_CHECKPOINT = ("embedding_norm",)


def kept_from_checkpoint(asked_for: dict[str, Any], saved: dict[str, Any]) -> dict[str, Any]:
    """``asked_for`` with each KEPT_FROM_CHECKPOINT setting it leaves to the recipe taken from ``saved``."""
    return {**asked_for, **{key: saved.get(key) for key in KEPT_FROM_CHECKPOINT if asked_for.get(key) is None}}


def check_same_architecture(saved: dict[str, Any], configured: dict[str, Any],
                            advice: str = "use the checkpoint's config (config.yaml beside its checkpoints/) or start "
                                          "a new run") -> None:
    """Refuse a checkpoint whose architecture differs from the configured one, naming each difference."""
    different = [k for k in ARCHITECTURE_KEYS if k in saved and k in configured and saved[k] != configured[k]]
    if different:
        details = ", ".join(f"{k}: checkpoint {saved[k]} vs config {configured[k]}" for k in different)
        raise AzGPTError(f"the checkpoint's architecture differs from the config ({details}): {advice}")


# Training settings a checkpoint records as resolved while a config may leave them None (the run's choice then).
RESOLVED_BY_THE_RUN = ("optimizer", "lr_schedule")


def changed_training_settings(saved: dict[str, Any], configured: dict[str, Any]) -> list[str]:
    """The optimizer, schedule and dropout settings ``configured`` gives other values than the checkpoint's
    ``saved``, each as "key value (checkpoint: value)"."""
    changed = []
    for key in (*OPTIM_KEYS, "dropout"):
        if key not in saved or key not in configured or saved[key] == configured[key]:
            continue
        if key in RESOLVED_BY_THE_RUN and configured[key] is None:
            continue
        changed.append(f"{key} {configured[key]} (checkpoint: {saved[key]})")
    return changed


def data_summary(meta: dict[str, Any]) -> dict[str, Any]:
    """The part of the data's meta.json worth keeping in a checkpoint: sources, normalisation, token counts."""
    summary = {key: meta[key] for key in DATA_SUMMARY_KEYS if key in meta}
    for split, counts in (meta.get("splits") or {}).items():
        summary[f"{split}_tokens"] = counts.get("tokens")
    return summary


def adamw_param_groups(module: torch.nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on the weights of Linear and Embedding layers, none on LayerNorm gains and biases.

    Chosen by module type rather than ``p.dim() >= 2``: FSDP flattens the parameters it shards to 1-D.
    """
    weights = {id(m.weight) for m in module.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))}
    params = [p for p in module.parameters() if p.requires_grad]
    return [{"params": [p for p in params if id(p) in weights], "weight_decay": weight_decay, "name": "decay"},
            {"params": [p for p in params if id(p) not in weights], "weight_decay": 0.0, "name": "no_decay"}]


def split_embedding_group(groups: list[dict[str, Any]], embedding: torch.nn.Parameter, lr: float,
                          weight_decay: float) -> list[dict[str, Any]]:
    """``groups`` with the token embedding moved out of its group into one of its own, with its own rate."""
    groups = [{**group, "params": [p for p in group["params"] if p is not embedding]} for group in groups]
    return groups + [{"params": [embedding], "lr": lr, "weight_decay": weight_decay, "name": "embedding"}]


def build_adamw(groups: list[dict[str, Any]], **kwargs: Any) -> torch.optim.AdamW:
    """Fused AdamW (one kernel per step) where torch has it for the parameters' device: CUDA, and CPU since
    torch 2.4, where it takes about a third of the time of the default per-tensor loop; else the default."""
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs)
    except RuntimeError:
        return torch.optim.AdamW(groups, **kwargs)


COMPILE = inspect.Parameter("compile", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=CompileSetting)
# AzGPT's arguments: GPTConfig's fields, the recipe, OptimConfig's fields and compile, each declared once there.
FIT_SIGNATURE = settings_signature(
    *settings_parameters(GPTConfig, GPTConfig(), optional=RECIPE_KEYS),
    inspect.Parameter("recipe", inspect.Parameter.KEYWORD_ONLY, default="gpt2", annotation=str),
    *settings_parameters(OptimConfig, OptimConfig()), COMPILE)


class AzGPT(L.LightningModule):
    """A GPT language model and how to train it.

    It takes, by keyword, each field of ``GPTConfig`` (the architecture) and of ``OptimConfig`` (the optimizer and
    schedule), with their defaults, plus ``recipe`` and ``compile``: ``--model.n_layer 4``, ``--model.learning_rate
    3e-4``. Its hyperparameters (and so its checkpoints) hold them flat; ``self.config`` and ``self.optim`` are the
    two descriptions built from them.

    Args:
        recipe: a named combination of architecture options and optimizer: ``gpt2`` (learned positions,
            LayerNorm, GELU, tied head, AdamW) or ``modern`` (RoPE, RMSNorm, SwiGLU, untied zero-initialised
            head and projections, normalised token embeddings, Muon). A setting given explicitly overrides the
            recipe's; those it may choose (``RECIPE_KEYS`` and ``optimizer``) default to None, the recipe's.
        compile: compile the model with ``torch.compile``: true, false, or ``cuda`` (only when training on a
            CUDA GPU that Triton supports; elsewhere it says why once and runs uncompiled).
    """

    def __init__(self, **settings: Any) -> None:
        # No super() here or in subclasses' __init__: the name gives the frame a __class__ cell, and Lightning's
        # save_hyperparameters then looks up each parameter of the generated signature among the frame's locals.
        L.LightningModule.__init__(self)
        settings = bind_settings(FIT_SIGNATURE, self, settings)
        self.config, self.optim = resolve_recipe(settings)
        self._left_to_recipe = {key for key in RECIPE_KEYS if settings[key] is None}
        compile_decision(settings["compile"], torch.device("cpu"))  # refuses an unknown setting before any work
        # Checkpoints record what was built, not None: they load without knowing what the recipe was then.
        self.save_hyperparameters({**settings, **{key: getattr(self.config, key) for key in RECIPE_KEYS},
                                   "optimizer": self.optim.optimizer})
        self.model = GPT(self.config)
        self.tokenizer_json: str | None = None  # carried in checkpoints so one .ckpt can write text
        self.data_summary: dict[str, Any] | None = None  # what it was trained on, for the exported model card
        self.chat_template: dict[str, Any] | None = None  # set by azgpt finetune (azgpt/data/chat.py)
        # float64 sums: the total no longer depends on how blocks are split into batches and ranks.
        # nan_strategy "disable": a diverged model must report a NaN val_loss, not silently drop the NaN batches
        # (the default); it also skips a per-update device sync.
        self.val_nll = SumMetric(nan_strategy="disable").set_dtype(torch.float64)
        self.val_tokens = SumMetric(nan_strategy="disable").set_dtype(torch.float64)
        self.val_bytes = SumMetric(nan_strategy="disable").set_dtype(torch.float64)
        # The same reduction over fixed training blocks (a second validation loader while fitting).
        self.train_eval_nll = SumMetric(nan_strategy="disable").set_dtype(torch.float64)
        self.train_eval_tokens = SumMetric(nan_strategy="disable").set_dtype(torch.float64)
        self.register_buffer("byte_lengths", torch.zeros(0, dtype=torch.long), persistent=False)
        self._loss_sum: torch.Tensor | None = None
        self._micro_batches = 0
        self._step_loss: torch.Tensor | None = None  # mean loss of the step being applied, for the guard
        self._guard = UpdateGuard()
        self._rng_to_restore: dict[str, Any] | None = None
        self._data_dir: str | None = None  # where tokenizer_json came from, once setup() has seen the data

    __init__.__signature__ = FIT_SIGNATURE
    __init__.__doc__ = settings_doc(GPTConfig, OptimConfig)

    # -- setup -----------------------------------------------------------------------------------------

    def configure_model(self) -> None:
        if getattr(self, "_compiled", False):
            return
        device = self.trainer.strategy.root_device if self._trainer is not None else self.device
        wanted, reason = compile_decision(self.hparams.compile, device)
        if reason:
            rank_zero_warn(f"azgpt: model.compile cuda: not compiling ({reason})")
        if wanted:
            self.model.compile()  # in place: state-dict keys stay clean
            self._compiled = True

    def setup(self, stage: str) -> None:
        if self._trainer is not None and self.trainer.strategy.root_device.type == "cuda":
            if torch.get_float32_matmul_precision() == "highest":  # the default: the user chose nothing
                torch.set_float32_matmul_precision("high")  # TF32 tensor cores for fp32 matmuls
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        data_tokenizer = getattr(datamodule, "tokenizer_json", None)
        if data_tokenizer is not None:
            if self.tokenizer_json is not None:
                self._check_same_tokenizer(self.tokenizer_json, "the model", data_tokenizer, datamodule.data_dir)
            self.tokenizer_json = data_tokenizer
            self._data_dir = str(datamodule.data_dir)
            self.data_summary = data_summary(datamodule.meta)
            meta_vocab = datamodule.meta["vocab_size"]
            if meta_vocab > self.hparams.vocab_size:
                raise AzGPTError(f"the data in {datamodule.data_dir} has vocab_size {meta_vocab} but the model has "
                                 f"{self.hparams.vocab_size}: their vocabularies must agree")
        if self.tokenizer_json is not None:
            lengths = token_byte_lengths(tokenizer_from_json(self.tokenizer_json))
            self.byte_lengths = torch.tensor(lengths, dtype=torch.long, device=self.device)
        if self._trainer is not None and self.trainer.strategy.root_device.type == "mps":
            for metric in self._eval_sums():
                metric.set_dtype(torch.float32)  # MPS has no float64

    @staticmethod
    def _check_same_tokenizer(model_json: str, model_origin: str, data_json: str, data_dir: object) -> None:
        """Refuse to train or evaluate a model on token ids of another tokenizer: they would mean other text."""
        if model_json == data_json:
            return
        model_sha = tokenizer_sha256(tokenizer_from_json(model_json))
        data_sha = tokenizer_sha256(tokenizer_from_json(data_json))
        if model_sha != data_sha:
            raise AzGPTError(
                f"{model_origin} was trained with another tokenizer (sha256 {model_sha[:12]}...) than the data in "
                f"{data_dir} (sha256 {data_sha[:12]}...): use data prepared with the checkpoint's tokenizer "
                f"(azgpt prepare --tokenizer), or start a new run without --ckpt_path")

    # -- training --------------------------------------------------------------------------------------

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        return self.model(idx, targets)

    def on_train_start(self) -> None:
        self._loss_sum, self._micro_batches = None, 0  # a run always starts on a step boundary

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        # Restored here, not at load time, so nothing between loading and the first step can draw from it.
        if self._rng_to_restore is not None:
            restore_rng_state(self._rng_to_restore)
            self._rng_to_restore = None

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        inputs, targets = batch
        _, loss = self.model(inputs, targets)
        # Log the mean over the accumulation window once per optimizer step, not one point per micro-batch.
        detached = loss.detach()
        self._loss_sum = detached if self._loss_sum is None else self._loss_sum + detached
        self._micro_batches += 1
        if self._micro_batches == self.trainer.accumulate_grad_batches:
            self._step_loss = self._loss_sum / self._micro_batches
            self.log("train_loss", self._step_loss, on_step=True, prog_bar=True)
            self._loss_sum, self._micro_batches = None, 0
        return loss

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip by global norm, log that norm (before clipping) as ``grad_norm``, and stop a non-finite step."""
        if gradient_clip_algorithm not in (None, "norm"):
            raise AzGPTError("only gradient_clip_algorithm: norm is supported")
        max_norm = gradient_clip_val if gradient_clip_val else float("inf")
        self._guard.unscale_for_clipping(self.trainer, optimizer)
        # FSDP's root module clips by the norm over all shards; the local norm would differ on every rank.
        sharded_clip = getattr(self.trainer.model, "clip_grad_norm_", None)
        if callable(sharded_clip):
            norm = sharded_clip(max_norm)
        else:
            norm = torch.nn.utils.clip_grad_norm_(self.parameters(), max_norm, foreach=True)
        self._guard.check(self.trainer, norm, self._step_loss)  # raises before the optimizer updates anything
        self.log("grad_norm", norm, on_step=True)

    def configure_optimizers(self) -> dict[str, Any]:
        hp = self.hparams
        # max_steps is checked here, the one place every fit (CLI or notebook) passes before training.
        decay_steps = hp.decay_steps or self.trainer.max_steps
        if self._trainer is not None and (self.trainer.max_steps is None or self.trainer.max_steps <= 0):
            raise AzGPTError(f"trainer.max_steps must be a positive number of optimizer steps, "
                             f"got {self.trainer.max_steps}")
        # A time budget (azgpt.train.time_budget) changes max_steps while training: read it at every step then.
        callbacks = getattr(self._trainer, "callbacks", ()) if self._trainer is not None else ()
        planned = any(getattr(callback, "plans_steps", False) for callback in callbacks)
        if planned and hp.decay_steps:
            raise AzGPTError(f"model.decay_steps must be null with --budget (the budget plans the steps), got "
                             f"{hp.decay_steps}")
        self.hparams.lr_schedule = hp.lr_schedule or ("wsd" if planned else "cosine")
        total = (lambda: self.trainer.max_steps) if planned else (lambda: decay_steps)
        optimizer, warmups = self.build_optimizer()
        if hp.lr_schedule == "wsd":
            rates = [lambda step, warmup=warmup: warmup_stable_decay(step, warmup, total(), hp.cooldown_fraction,
                                                                     hp.min_lr_ratio, hp.cooldown_shape)
                     for warmup in warmups]
        else:
            rates = [lambda step, warmup=warmup: warmup_cosine(step, warmup, total(), hp.min_lr_ratio)
                     for warmup in warmups]
        schedule = LambdaLR(optimizer, rates)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step", "frequency": 1}}

    def build_optimizer(self) -> tuple[torch.optim.Optimizer, list[int]]:
        """The optimizer, and the warmup length of each of its param groups."""
        hp = self.hparams
        groups = adamw_param_groups(self, hp.weight_decay)
        if hp.embedding_lr is not None:
            groups = split_embedding_group(groups, self.model.transformer.wte.weight, hp.embedding_lr,
                                           hp.weight_decay * hp.learning_rate / hp.embedding_lr)
        adamw_settings = dict(lr=hp.learning_rate, betas=(hp.beta1, hp.beta2), eps=hp.eps)
        if hp.optimizer == "adamw":
            return build_adamw(groups, **adamw_settings), [hp.warmup_steps] * len(groups)
        hidden = hidden_matrices(self.model)
        if any(p.dim() != 2 for p in hidden):
            raise AzGPTError("model.optimizer muon needs the blocks' weights as matrices, and this strategy "
                             "flattens them (FSDP): use optimizer adamw or the ddp strategy")
        taken = {id(p) for p in hidden}
        groups = [{**group, "params": [p for p in group["params"] if id(p) not in taken]} for group in groups]
        muon = Muon([{"params": hidden, "name": "muon"}], lr=hp.muon_lr, momentum=hp.muon_momentum,
                    weight_decay=hp.weight_decay)
        optimizer = MuonWithAdamW(muon, build_adamw(groups, **adamw_settings))
        return optimizer, [hp.muon_warmup_steps] + [hp.warmup_steps] * len(groups)

    # -- evaluation: total NLL / total tokens over every batch and rank --------------------------------

    def _eval_sums(self) -> tuple[SumMetric, ...]:
        return (self.val_nll, self.val_tokens, self.val_bytes, self.train_eval_nll, self.train_eval_tokens)

    def _evaluate_batch(self, batch: tuple[torch.Tensor, torch.Tensor], on_train_blocks: bool = False) -> None:
        inputs, targets = batch
        logits, _ = self.model(inputs)
        targets = targets.reshape(-1)
        counted = targets != PAD_TARGET  # padding blocks that even out the ranks' shares count for nothing
        token_nll = F.cross_entropy(logits.view(-1, logits.size(-1)).float(), targets, ignore_index=PAD_TARGET,
                                    reduction="none")
        dtype = self.val_nll.dtype
        if on_train_blocks:
            self.train_eval_nll.update(token_nll.to(dtype).sum())
            self.train_eval_tokens.update(counted.sum().to(dtype))
            return
        self.val_nll.update(token_nll.to(dtype).sum())
        self.val_tokens.update(counted.sum().to(dtype))
        if self.byte_lengths.numel():
            self.val_bytes.update((self.byte_lengths[targets.clamp(min=0)] * counted).sum().to(dtype))

    def _log_evaluation(self) -> None:
        nll = self.val_nll.compute()
        tokens = self.val_tokens.compute()
        loss = nll / tokens
        metrics = {"val_loss": loss, "val_ppl": torch.exp(loss)}
        if self.byte_lengths.numel():
            metrics["val_bpb"] = bits_per_byte(nll, self.val_bytes.compute())
        self.log_dict(metrics, prog_bar=True, add_dataloader_idx=False)
        if self.train_eval_tokens.update_called:  # only while fitting: the training blocks are a second loader then
            train_loss = self.train_eval_nll.compute() / self.train_eval_tokens.compute()
            self.log_dict({"train_eval_loss": train_loss, "train_eval_ppl": torch.exp(train_loss),
                           "overfit_gap": loss - train_loss}, add_dataloader_idx=False)
        for metric in self._eval_sums():
            metric.reset()

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int,
                        dataloader_idx: int = 0) -> None:
        self._evaluate_batch(batch, on_train_blocks=dataloader_idx == 1)

    def on_validation_epoch_end(self) -> None:
        self._log_evaluation()

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        self._evaluate_batch(batch)

    def on_test_epoch_end(self) -> None:
        self._log_evaluation()

    # -- checkpoints -----------------------------------------------------------------------------------

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        metrics = {}
        if self._trainer is not None:  # the last validation's metrics, for the model card of an export
            metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items() if k.startswith("val_")}
        checkpoint[CHECKPOINT_KEY] = azgpt_entry(self.tokenizer_json, self.data_summary, metrics,
                                                 capture_rng_state(), self._micro_batches, self.chat_template)

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        stored = checkpoint.get("hyper_parameters", {})
        saved = upgrade_hyperparameters(stored)
        if "activation" not in stored and self.hparams.activation != saved["activation"]:
            # An older checkpoint: adopt the activation its model was trained with (it has no weights).
            self.hparams.activation = saved["activation"]
            self.model.use_activation(saved["activation"])
            self.config = self.model.config
        for key in KEPT_FROM_CHECKPOINT:
            if key in self._left_to_recipe and self.hparams[key] != saved[key]:
                # A checkpoint older than the setting, built here by today's recipe: the model is read at each
                # forward and has no weights for it, so it takes the checkpoint's value.
                self.hparams[key] = saved[key]
                self.model.config = replace(self.model.config, **{key: saved[key]})
                self.config = self.model.config
        check_same_architecture(saved, self.hparams)
        carried = checkpoint.get(CHECKPOINT_KEY, {})
        if self._data_dir is not None and carried.get("tokenizer") and self.tokenizer_json:
            # setup() ran first and took the data's tokenizer: it must be the one the checkpoint was trained with.
            origin = f"checkpoint {self.trainer.ckpt_path}" if self._trainer is not None else "the checkpoint"
            self._check_same_tokenizer(carried["tokenizer"], origin, self.tokenizer_json, self._data_dir)
        else:
            self.tokenizer_json = carried.get("tokenizer") or self.tokenizer_json
            self.data_summary = carried.get("data") or self.data_summary
        self.chat_template = carried.get("chat_template") or self.chat_template
        trainer = self._trainer
        if trainer is None or trainer.state.fn != "fit":
            return
        step, max_steps = checkpoint.get("global_step", 0), trainer.max_steps
        if max_steps is not None and 0 < max_steps <= step:
            raise AzGPTError(f"the checkpoint is already at step {step} and trainer.max_steps is {max_steps}: "
                             f"raise trainer.max_steps to train further")
        saved_rate = stored.get("embedding_lr")  # absent: written before the setting, so no group of its own
        if (saved_rate is None) != (self.hparams.embedding_lr is None):
            saved_text, asked_text = ("null" if rate is None else rate
                                      for rate in (saved_rate, self.hparams.embedding_lr))
            raise AzGPTError(f"the checkpoint was trained with model.embedding_lr {saved_text} and this run has "
                             f"{asked_text}: its optimizer state does not fit (the embedding has a param group of "
                             f"its own only with a rate); resume with model.embedding_lr {saved_text} or start a "
                             f"new run")
        self._rng_to_restore = carried.get("rng")
        if carried.get("micro_batch"):
            rank_zero_warn(f"azgpt: this checkpoint was written in the middle of an optimizer step (micro-batch "
                           f"{carried['micro_batch']} of {trainer.accumulate_grad_batches}): the resumed run "
                           f"will not match an uninterrupted one exactly")
