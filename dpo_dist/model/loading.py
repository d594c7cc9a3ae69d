"""Finding and loading the tokenizer, the policy (full or LoRA) and the frozen reference.

A model is a local Hugging Face folder or a hub id (`org/name`, optionally `org/name@revision`),
resolved through the hub cache: with `HF_HUB_OFFLINE=1`, as on compute nodes, only what is already
cached is used; online, the weights, config and tokenizer files are downloaded once into it.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
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
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
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
        if (folder / "adapter_config.json").is_file():
            raise UserError(f"{key}={name} is a LoRA adapter, not a whole model; name its base model (or export "
                            "with model.lora.save_merged=true and use final/merged)")
        raise UserError(f"{key}={name}: not a Hugging Face model folder (no config.json there)")
    check_model_folder(folder, key)
    return folder


def check_model_folder(folder: Path, key: str) -> None:
    """Refuses, before any long work, a model folder whose config or weights cannot be read whole:
    an unparsable config.json, no weights, a shard the index names but the folder lacks, a
    safetensors file cut short (a copy or download that did not finish)."""
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise UserError(f"{key}: {folder / 'config.json'} is not readable JSON ({err})") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise UserError(f"{key}: {folder / 'config.json'} names no model_type; is this a Hugging Face model folder?")
    weights = sorted(folder.glob("*.safetensors"))
    for index in folder.glob("*.safetensors.index.json"):
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            raise UserError(f"{key}: {index} is not a readable weight index ({err})") from None
        missing = sorted(shard for shard in shards if not (folder / shard).is_file())
        if missing:
            raise UserError(f"{key}: {folder} lacks {len(missing)} weight file(s) its index names ({', '.join(missing[:3])})")
    if not weights and not any(any(folder.glob(pattern)) for pattern in ("*.bin", "*.pt", "*.pth")):
        raise UserError(f"{key}={folder} holds no weight files (*.safetensors, *.bin)")
    for path in weights:
        problem = safetensors_damage(path)
        if problem:
            raise UserError(f"{key}: {path} is damaged ({problem}); copy or download it again")


def safetensors_damage(path: Path) -> str | None:
    """What is wrong with a safetensors file's framing, from its header alone (None: whole)."""
    size = path.stat().st_size
    try:
        with path.open("rb") as f:
            length = int.from_bytes(f.read(8), "little")
            if size < 8 or 8 + length > size:
                return f"{size} bytes, shorter than its header"
            header = json.loads(f.read(length))
        end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    except (ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
        return f"unreadable header: {err}"
    if 8 + length + end != size:
        return f"{size} bytes where its header describes {8 + length + end}: cut short"
    return None


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

    folder = policy_path(cfg)
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise UserError(f"model.policy={folder} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); save the "
                        "tokenizer there too (tokenizer.save_pretrained)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except (OSError, ValueError, TypeError) as err:
        raise UserError(f"model.policy={folder}: its tokenizer does not load ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''})") from None
    if tokenizer.eos_token is None:
        raise UserError(f"model.policy={folder}: its tokenizer has no eos_token (responses end with it); set "
                        "tokenizer.eos_token and save the tokenizer again")
    if tokenizer.pad_token_id is None:  # padding is masked out; any id will do
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def check_vocabularies(cfg: ModelConfig, tokenizer) -> None:
    """Refuses a policy or reference that cannot score the policy tokenizer's ids: an embedding
    smaller than the vocabulary, or a reference that ships another vocabulary (its numbers would be
    log-probs of other tokens)."""
    for key, folder in (("model.policy", policy_path(cfg)), ("model.reference", reference_path(cfg))):
        size = json.loads((folder / "config.json").read_text()).get("vocab_size")
        if isinstance(size, int) and size < len(tokenizer):
            raise UserError(f"{key}={folder} has {size} token embeddings, fewer than the tokenizer's {len(tokenizer)} "
                            "tokens; use the tokenizer it was trained with")
    reference = reference_path(cfg)
    if reference != policy_path(cfg) and any((reference / name).is_file() for name in TOKENIZER_FILES):
        from transformers import AutoTokenizer

        try:
            theirs = AutoTokenizer.from_pretrained(reference)
        except (OSError, ValueError, TypeError) as err:
            raise UserError(f"model.reference={reference}: its tokenizer does not load ({type(err).__name__})") from None
        if theirs.get_vocab() != tokenizer.get_vocab():
            raise UserError(f"model.reference={reference} has another vocabulary than model.policy's tokenizer "
                            f"({len(theirs)} vs {len(tokenizer)} tokens, or other ids); DPO needs the reference to "
                            "score the same tokens: use the SFT model of this policy")


def load_causal_lm(path: Path, cfg: ModelConfig, *, empty: bool = False) -> torch.nn.Module:
    """A causal LM whose LM head can score response tokens only (see `logprobs.install_response_head`).
    `empty`: built on the meta device from its config, no weight read (a sharded engine fills it)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        if empty:
            from accelerate import init_empty_weights

            with init_empty_weights(include_buffers=False):  # buffers (rotary frequencies) are computed, not stored
                model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=DTYPES[cfg.dtype],
                                                         attn_implementation=cfg.attn_implementation)
            model.tie_weights()  # from_config on the meta device leaves a tied head untied
        else:
            model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[cfg.dtype],
                                                         attn_implementation=cfg.attn_implementation)
    except (OSError, ValueError, KeyError) as err:  # e.g. a model type this transformers lacks, weights that do not fit
        raise UserError(f"{path}: transformers cannot load this model ({type(err).__name__}: "
                        f"{str(err).splitlines()[0] if str(err) else ''})") from None
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


def load_policy(cfg: ModelConfig, *, seed: int, empty: bool = False) -> torch.nn.Module:
    """The policy to train: the whole model, or the model with new LoRA adapters (made by
    `initial_adapter_weight` from `seed`). `empty`: on the meta device (see `load_causal_lm`)."""
    model = load_causal_lm(policy_path(cfg), cfg, empty=empty)
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
        try:
            model = get_peft_model(model, lora)
        except ValueError as err:
            if "not found" not in str(err) and "Target modules" not in str(err):
                raise
            names = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                            if isinstance(module, torch.nn.Linear)})
            raise UserError(f"model.lora.target_modules={cfg.lora.target_modules} matches no module of "
                            f"{cfg.policy}; its linear layers are: {', '.join(names)}") from None
        # Adapters train in float32 even when the base runs in bf16: mixed dtypes inside one
        # ZeRO parameter group break its flat buffers.
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.data = p.data.float()
                if not empty:
                    with torch.no_grad():
                        p.copy_(initial_adapter_weight(name, p.shape, seed))
    return model.train()


# peft's own initialisation of each adapter weight (LoRA's defaults), by the name it ends in.
ADAPTER_INITS = {
    "lora_A": lambda t, g: torch.nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=g),
    "lora_B": lambda t, g: torch.nn.init.zeros_(t),
    "lora_embedding_A": lambda t, g: torch.nn.init.zeros_(t),
    "lora_embedding_B": lambda t, g: torch.nn.init.normal_(t, generator=g),
}


def adapter_role(name: str) -> str | None:
    """Which kind of adapter weight the parameter `name` is (a key of ADAPTER_INITS), None for a
    weight of the base model."""
    return next((role for role in ADAPTER_INITS if f".{role}." in f".{name}."), None)


def initial_adapter_weight(name: str, shape: torch.Size, seed: int) -> torch.Tensor:
    """A new adapter's starting weight, whole, drawn as peft draws it but from a generator seeded by
    `seed` and the weight's name: the same on every rank and layout, whichever order or device
    (real or meta) the model was built in."""
    role = adapter_role(name)
    if role is None:
        raise ValueError(f"{name} is no adapter weight dpo_dist knows how to start ({', '.join(ADAPTER_INITS)})")
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    generator = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little"))
    return ADAPTER_INITS[role](torch.empty(shape), generator)
