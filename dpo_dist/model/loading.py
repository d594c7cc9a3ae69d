"""Finding and loading the tokenizer, the policy (full or LoRA) and the frozen reference.

A model is a local Hugging Face folder or a hub id (`org/name`, optionally `org/name@revision`),
resolved through the hub cache: with `HF_HUB_OFFLINE=1`, as on compute nodes, only what is already
cached is used; online, the weights, config and tokenizer files are downloaded once into it.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import torch

from dpo_dist.config import ModelConfig
from dpo_dist.errors import UserError
from dpo_dist.model import attention
from dpo_dist.model.logprobs import install_response_head
from dpo_dist.precision import DTYPES

HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?(@[\w./-]+)?$")
# What a causal LM needs from a hub repo: never the duplicate `original/*.pth` of some repos.
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.tiktoken", "*.txt", "*.jinja"]


@functools.lru_cache(maxsize=None)
def resolve_model_dir(name: str, key: str) -> Path:
    """The local folder of `name` (a folder, or a hub id resolved in the hub cache); `key` is the
    config key it came from, for the error message."""
    if not name:
        raise UserError(f"config: {key} is not set (a Hugging Face model folder or hub id)")
    folder = Path(name).expanduser()
    if not folder.exists() and HUB_ID.match(name):
        folder = _snapshot(name, key)
    if not (folder / "config.json").is_file():
        raise UserError(f"{key}={name}: not a Hugging Face model folder (no config.json there)")
    return folder


def _snapshot(name: str, key: str) -> Path:
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError, LocalEntryNotFoundError

    repo_id, _, revision = name.partition("@")
    try:
        return Path(snapshot_download(repo_id, revision=revision or None, allow_patterns=HUB_FILES))
    except LocalEntryNotFoundError:
        raise UserError(
            f"{key}={name}: not a local folder, and not in the Hugging Face cache ({constants.HF_HUB_CACHE}) "
            f"while offline; download it first where there is network: `hf download {repo_id}`"
        ) from None
    except (HfHubHTTPError, HFValidationError, OSError) as err:
        raise UserError(f"{key}={name}: not a local folder, and the hub could not provide it ({err})") from None


def reference_path(cfg: ModelConfig) -> Path:
    """The reference is `model.reference`, else the policy's starting weights (with LoRA: the base
    model with adapters disabled, which is the same function)."""
    if cfg.reference:
        return resolve_model_dir(cfg.reference, "model.reference")
    return policy_path(cfg)


def policy_path(cfg: ModelConfig) -> Path:
    return resolve_model_dir(cfg.policy, "model.policy")


def load_tokenizer(cfg: ModelConfig):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(policy_path(cfg))
    if tokenizer.pad_token_id is None:  # padding is masked out; any id will do
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(path: Path, cfg: ModelConfig) -> torch.nn.Module:
    """A causal LM whose LM head can score response tokens only (see `logprobs.install_response_head`)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[cfg.dtype], attn_implementation=cfg.attn_implementation)
    install_response_head(model)
    return model


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.requires_grad_(False)
    return model.eval()


def load_reference(cfg: ModelConfig) -> torch.nn.Module:
    """The whole reference model (one process, or ZeRO-0/1/2: it fits on a device)."""
    return freeze(load_causal_lm(reference_path(cfg), cfg))


def checkpoint_layers(model: torch.nn.Module) -> None:
    """Gradient checkpointing: each layer recomputed in backward, with the layout mask its forward
    was handed (`attention.recompute_context`)."""
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={
        "use_reentrant": False, "context_fn": attention.recompute_context})
    model.config.use_cache = False


def load_policy(cfg: ModelConfig) -> torch.nn.Module:
    model = load_causal_lm(policy_path(cfg), cfg)
    if cfg.gradient_checkpointing:
        checkpoint_layers(model)
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
