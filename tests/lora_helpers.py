"""Helpers for the LoRA tests: PEFT adapters with non-zero random factors on tiny local models, and
the expected merged weights computed with PEFT itself (merge_and_unload)."""
from __future__ import annotations

from pathlib import Path

import torch


def make_adapter(base_folder, out: Path, seed: int, scale: float = 0.1, **lora_kw) -> Path:
    """Save a PEFT LoRA adapter of ``base_folder`` whose lora_* parameters are random (B is not zero)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base_folder)
    pm = get_peft_model(model, LoraConfig(**lora_kw))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_" in n or "modules_to_save" in n:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    pm.save_pretrained(out)
    return out


def peft_merged(base_folder, adapter) -> dict:
    """State dict of base + adapter merged by PEFT (merge_and_unload)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_folder), str(adapter))
    return {k: v.detach().clone() for k, v in pm.merge_and_unload().state_dict().items()}


def expected_sum(base_folder, adapters, weights) -> dict:
    """W0 + Σ w_i ΔW_i, each ΔW_i taken from PEFT's own merge."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_folder).state_dict()
    out = {k: v.clone() for k, v in base.items()}
    for a, w in zip(adapters, weights):
        for k, v in peft_merged(base_folder, a).items():
            if k in out:
                out[k] += w * (v - base[k])
    return out


def logits_with_adapter(base_folder, adapter, ids) -> torch.Tensor:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    pm = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_folder), str(adapter)).eval()
    with torch.no_grad():
        return pm(ids).logits


def logits_with_state(base_folder, state: dict, ids) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(base_folder).eval()
    m.load_state_dict(state, strict=False)
    with torch.no_grad():
        return m(ids).logits
