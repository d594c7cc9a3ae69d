"""What precision every forward runs in, and fp32 master weights where the weights are bf16 / fp16.

`train.mixed_precision` is the one source of truth: `auto` is bf16 on a GPU that has it, else fp32.
Without DeepSpeed a bf16 / fp16 run autocasts over the weights as loaded (accelerate's native amp);
under DeepSpeed it fills the JSON's "auto" bf16 / fp16 blocks and DeepSpeed casts the weights. The
reference pass runs in the same precision, and the reference cache's fingerprint records it.
"""

from __future__ import annotations

import torch

from dpo_dist.config import Config
from dpo_dist.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
LOW = {"bf16": torch.bfloat16, "fp16": torch.float16}
ACCELERATE_NAMES = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


def resolve_precision(cfg: Config) -> str:
    """train.mixed_precision with `auto` decided for this machine: fp32, bf16 or fp16."""
    choice = cfg.train.mixed_precision
    cuda = torch.cuda.is_available()
    if choice == "auto":
        return "bf16" if cuda and torch.cuda.is_bf16_supported() else "fp32"
    if choice == "fp16" and not cuda:
        raise UserError("train.mixed_precision=fp16 needs a CUDA GPU (fp16 autocast needs its loss scaler there); "
                        "use bf16 or fp32 here")
    return choice


def check_deepspeed_precision(ds_config: dict, cfg: Config, precision: str, source: str) -> None:
    """A DeepSpeed JSON may leave bf16 / fp16 on "auto" (filled from train.mixed_precision) or state
    what train.mixed_precision resolves to; anything else is refused with both values named."""
    for name in LOW:
        enabled = ds_config.get(name, {}).get("enabled", "auto")
        if enabled == "auto":
            continue
        if bool(enabled) != (precision == name):
            raise UserError(
                f"{source} sets {name}.enabled={str(enabled).lower()}, but train.mixed_precision="
                f"{cfg.train.mixed_precision} means {precision} here; set \"enabled\": \"auto\" in the JSON "
                f"(train.mixed_precision then decides) or train.mixed_precision={name if enabled else 'fp32'}")
    loaded = cfg.model.dtype
    if loaded != "float32" and LOW.get(precision) != DTYPES[loaded]:
        raise UserError(f"model.dtype={loaded} under DeepSpeed needs train.mixed_precision="
                        f"{'bf16' if loaded == 'bfloat16' else 'fp16'} (DeepSpeed keeps the fp32 master weights "
                        f"then), not {precision}")


def export_dtype(cfg: Config) -> torch.dtype:
    """What final/ and best/ are written in: export.dtype, else as loaded (a LoRA adapter as it
    trained, float32)."""
    if cfg.export.dtype is not None:
        return DTYPES[cfg.export.dtype]
    return torch.float32 if cfg.model.lora is not None else DTYPES[cfg.model.dtype]


def forward_dtypes(cfg: Config, precision: str, deepspeed: bool) -> tuple[torch.dtype, torch.dtype | None]:
    """(dtype of the weights a forward reads, autocast dtype or None): a sharding engine (`deepspeed`:
    DeepSpeed or FSDP2) casts the weights to bf16 / fp16 itself; otherwise they stay as loaded and a
    bf16 / fp16 run autocasts."""
    low = LOW.get(precision)
    if deepspeed:
        return low or DTYPES[cfg.model.dtype], None
    return DTYPES[cfg.model.dtype], low


def fp32_master_copies(cfg: Config, deepspeed: bool) -> bool:
    """Whether the optimizer steps fp32 copies of low-precision trainable weights: a full fine-tune of
    bf16 / fp16 weights without a sharding engine (`deepspeed`: DeepSpeed or FSDP2, which keep their
    own fp32 masters; LoRA adapters are fp32)."""
    return not deepspeed and cfg.model.lora is None and cfg.model.dtype != "float32"


class MasterWeightAdamW(torch.optim.AdamW):
    """AdamW that steps float32 master copies of low-precision (bf16 / fp16) weights.

    A DPO learning rate is below half an ulp of most bf16 weights: AdamW stepping them in place
    rounds almost every update away (tiny Llama, lr 1e-6, 8 steps: 1.5% of the weights moved, 81.9%
    in fp32). Here the model keeps its low-precision weights for the forward; the fp32 masters take
    every update and are written back after each step. They are part of the state dict, so a resumed
    run continues from them, not from the rounded weights. (DeepSpeed does the same for its runs.)
    """

    def __init__(self, params, **kwargs):
        self.model_params = list(params)
        super().__init__([p.detach().float().clone() for p in self.model_params], **kwargs)

    def masters(self) -> list[torch.Tensor]:
        return [master for group in self.param_groups for master in group["params"]]

    @torch.no_grad()
    def step(self, closure=None):
        for param, master in zip(self.model_params, self.masters()):
            master.grad = None if param.grad is None else param.grad.float()
        loss = super().step(closure)
        for param, master in zip(self.model_params, self.masters()):
            param.copy_(master)
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        for param in self.model_params:
            param.grad = None

    def state_dict(self) -> dict:
        return {**super().state_dict(), "master_weights": self.masters()}

    @torch.no_grad()
    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        for param, master, saved in zip(self.model_params, self.masters(), state_dict.pop("master_weights")):
            master.copy_(saved)
            param.copy_(master)
        super().load_state_dict(state_dict)
