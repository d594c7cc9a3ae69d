"""Loading a frozen model straight into ZeRO-3 partitions: each rank reads only its own slice.

transformers' ZeRO-3 loading has rank 0 read the whole checkpoint into host memory and hand each
layer out through collective gathers: rank 0 then holds the whole model after all (measured on a
363 MB model: rank 0 peaked at 1056 MiB, above the 846 MiB of one process holding it whole). Here
the model is built empty and partitioned (`deepspeed.zero.Init`, no random init), and each rank
copies its flat range `[r·P, (r+1)·P)` of every weight from the safetensors files with plain reads,
so no rank ever holds, reads or receives more than its 1/N of the weights (`model.weight_files`).
"""

from __future__ import annotations

from pathlib import Path

import torch

from dpo_dist.model.weight_files import NotSliceable, StoredTensor, checkpoint_index


def load_partitions(model: torch.nn.Module, stored: dict[str, StoredTensor], rank: int) -> None:
    """Copies this rank's slice of every ZeRO-3 parameter (and any stored buffer, whole) from disk.

    DeepSpeed keeps partition r of a parameter with n elements as `ds_tensor`, P = ceil(n / N)
    elements holding flat elements [r·P, min((r+1)·P, n)), zero-padded at the end.
    """
    params = dict(model.named_parameters())  # tied weights appear once
    missing = [n for n in params if n not in stored]
    wrong = [n for n, p in params.items() if n in stored and stored[n].numel != p.ds_numel]
    if missing or wrong:
        raise NotSliceable(f"parameter names or shapes differ from the checkpoint ({(missing + wrong)[:3]} ...)")
    for name, param in params.items():
        part = param.ds_tensor
        start = rank * part.numel()
        count = max(0, min(part.numel(), param.ds_numel - start))
        with torch.no_grad():
            part[:count].copy_(stored[name].read_flat(start, count))
            part[count:].zero_()
    for name, buffer in model.named_buffers():
        if name in stored:
            with torch.no_grad():
                buffer.copy_(stored[name].read_flat(0, stored[name].numel).view(stored[name].shape))


def build_partitioned(folder: Path, dtype: torch.dtype, attn_implementation: str, ds_config: dict, rank: int):
    """The model in `folder`, partitioned by ZeRO-3 as `ds_config` says (dtype, `offload_param`)
    from construction on, with its weights loaded slice by slice. Raises NotSliceable when the
    checkpoint cannot be read that way; the caller then loads it through transformers."""
    import deepspeed
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING, AutoConfig, AutoModelForCausalLM
    from transformers import initialization
    from transformers.integrations.deepspeed import prevent_arange_dtype_change

    if ds_config.get("zero_optimization", {}).get("offload_param", {}).get("device") == "nvme":
        raise NotSliceable("offload_param to NVMe swaps partitions out as they are made")
    stored = checkpoint_index(folder)  # before building: refuse cheaply
    config = AutoConfig.from_pretrained(folder)
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise NotSliceable(f"transformers has no causal-LM class for {type(config).__name__}")
    # Resolving the class imports its module here, outside zero.Init: a class first created inside
    # zero.Init gets back, when it exits, an __init__ without its class decorators' wrappers
    # (transformers >= 5.25 with `kernels`: every LlamaAttention built afterwards, the policy's
    # too, lacks `_kernel_funcs`).
    MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]

    class PartitionWithoutBroadcast(deepspeed.zero.Init):
        """zero.Init sends rank 0's value of every new parameter to all ranks so that they agree; here
        each is overwritten from disk next, so that would send the whole model, unused, through rank 0."""

        def _zero_init_param(self, param):
            self._convert_to_deepspeed_param(param)
            param.partition()

    # No random init (every weight is overwritten), RoPE buffers kept in their own dtype (as
    # transformers does under zero.Init), parameters partitioned as each module is created.
    with initialization.no_init_weights(), prevent_arange_dtype_change(), PartitionWithoutBroadcast(config_dict_or_path=ds_config):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation=attn_implementation)
    load_partitions(model, stored, rank)
    return model
