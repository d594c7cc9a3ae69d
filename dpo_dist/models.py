"""Loading the tokenizer, the policy (full or LoRA) and the frozen reference from local folders."""

from __future__ import annotations

from pathlib import Path

import torch

from dpo_dist.config import ModelConfig
from dpo_dist.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _check_model_dir(path: str, key: str) -> Path:
    if not path:
        raise UserError(f"config: {key} is not set (a Hugging Face model folder)")
    folder = Path(path)
    if not (folder / "config.json").is_file():
        raise UserError(f"{key}={path}: not a Hugging Face model folder (no config.json there)")
    return folder


def reference_path(cfg: ModelConfig) -> Path:
    """The reference is `model.reference`, else the policy's starting weights (with LoRA: the base
    model with adapters disabled, which is the same function)."""
    if cfg.reference:
        return _check_model_dir(cfg.reference, "model.reference")
    return _check_model_dir(cfg.policy, "model.policy")


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(_check_model_dir(cfg.policy, "model.policy"))
    if tokenizer.pad_token_id is None:  # padding is masked out; any id will do
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(path: Path, cfg: ModelConfig) -> torch.nn.Module:
    """A causal LM whose LM head can score response tokens only (see logprobs.install_response_head)."""
    from transformers import AutoModelForCausalLM

    from dpo_dist.logprobs import install_response_head

    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[cfg.dtype], attn_implementation=cfg.attn_implementation)
    install_response_head(model)
    return model


def load_reference(cfg: ModelConfig) -> torch.nn.Module:
    model = load_causal_lm(reference_path(cfg), cfg)
    model.requires_grad_(False)
    return model.eval()


def load_policy(cfg: ModelConfig) -> torch.nn.Module:
    model = load_causal_lm(_check_model_dir(cfg.policy, "model.policy"), cfg)
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    if cfg.lora is not None:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=cfg.lora.r,
            lora_alpha=cfg.lora.alpha,
            lora_dropout=cfg.lora.dropout,
            target_modules=cfg.lora.target_modules,
            task_type="CAUSAL_LM",
        )
        model = get_peft_model(model, lora)
        # Adapters train in float32 even when the base runs in bf16: mixed dtypes inside one
        # ZeRO parameter group break its flat buffers.
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    return model.train()
