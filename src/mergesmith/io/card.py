"""Everything in an output folder besides the weights: config.json, tokenizer files, chat template,
model card (README.md), the recipe as run, and a provenance record."""
from __future__ import annotations

import json
import platform
import shutil
import time
from collections import Counter
from pathlib import Path

from ..methods.base import MergeError

TOKENIZER_FILES = (
    "tokenizer_config.json", "special_tokens_map.json", "tokenizer.json", "tokenizer.model", "added_tokens.json",
    "merges.txt", "vocab.json", "vocab.txt", "spiece.model", "chat_template.jinja", "chat_template.json",
    "generation_config.json", "preprocessor_config.json",
)

BUILTIN_CHAT_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
        " + message['content'] | trim + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "alpaca": (
        "{% for message in messages %}{% if message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'assistant' %}{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}"
        "{% else %}{{ message['content'] + '\\n\\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
    ),
    "mistral": (
        "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
        "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}{% endif %}{% endfor %}"
    ),
    # LG AI's EXAONE 3.x turn format (mergekit's built-in `exaone`): a system turn first (an empty one if the
    # conversation has none), a newline after user turns, [|endofturn|] after the others
    "exaone": (
        "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
        "{{ '[|system|][|endofturn|]\n' }}{% endif %}{{ '[|' + message['role'] + '|]' + message['content'] }}"
        "{% if message['role'] == 'user' %}{{ '\n' }}{% else %}{{ '[|endofturn|]\n' }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}"
    ),
}


def resolve_chat_template(value: str | None, folders: list[Path]) -> str | None:
    """`auto`: the most common template among inputs; a built-in name; or a literal Jinja string."""
    if value is None:
        return None
    if value == "auto":
        found = []
        for f in folders:
            tc = f / "tokenizer_config.json"
            jinja = f / "chat_template.jinja"
            if jinja.exists():
                found.append(jinja.read_text())
            elif tc.exists():
                t = json.loads(tc.read_text()).get("chat_template")
                if isinstance(t, str):
                    found.append(t)
        return Counter(found).most_common(1)[0][0] if found else None
    if value in BUILTIN_CHAT_TEMPLATES:
        return BUILTIN_CHAT_TEMPLATES[value]
    if len(value) >= 20 and "{" in value:
        return value
    raise MergeError(f"chat_template '{value}' is neither auto, a built-in ({', '.join(BUILTIN_CHAT_TEMPLATES)}) nor a Jinja template")


def write_extras(plan, folder: Path, seconds: float = 0.0) -> None:
    from .. import __version__

    folder = Path(folder)
    if plan.config is not None:
        (folder / "config.json").write_text(json.dumps(plan.config, indent=2, sort_keys=True) + "\n")
    donor = plan.tokenizer_donor
    copied = []
    if plan.tokenizer is not None:  # built (tokenizer_source: union)
        copied = sorted(Path(f).name for f in plan.tokenizer.save_pretrained(str(folder)))
    elif donor is not None and donor.folder is not None:
        for name in TOKENIZER_FILES:
            src = donor.folder / name
            if src.exists():
                shutil.copyfile(src, folder / name)
                copied.append(name)
    recipe = plan.recipe
    if recipe is not None and recipe.chat_template:
        folders = [c.folder for c in plan.inputs if c.folder is not None]
        template = resolve_chat_template(recipe.chat_template, folders)
        if template is not None:
            (folder / "chat_template.jinja").write_text(template)
            tc = folder / "tokenizer_config.json"
            if tc.exists():
                data = json.loads(tc.read_text())
                data["chat_template"] = template
                tc.write_text(json.dumps(data, indent=2))
    recipe_yaml = recipe_text(plan)
    (folder / "mergesmith_recipe.yml").write_text(recipe_yaml)
    provenance = {
        "mergesmith_version": __version__,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "method": plan.method.name,
        "seed": plan.seed,
        "parameters": recipe.parameters if recipe is not None else {},
        "inputs": [c.identity() for c in plan.inputs],
        "tokenizer_files": copied,
        "tensors": len(plan.jobs),
        "output_bytes": plan.output_bytes,
        "seconds": round(seconds, 3),
        "torch": _torch_version(),
        "python": platform.python_version(),
    }
    (folder / "mergesmith_provenance.json").write_text(json.dumps(provenance, indent=2, default=str) + "\n")
    (folder / "README.md").write_text(model_card(plan, recipe_yaml))


def _torch_version() -> str:
    import torch

    return torch.__version__


def recipe_text(plan) -> str:
    import yaml

    if plan.recipe is None:
        return yaml.safe_dump({"merge_method": plan.method.name}, sort_keys=False)
    data = plan.recipe.model_dump(by_alias=True, exclude_none=True, exclude_defaults=False)
    data = {k: v for k, v in data.items() if v not in ({}, None)}
    data["random_seed"] = plan.seed
    return yaml.safe_dump(data, sort_keys=False)


def model_card(plan, recipe_yaml: str) -> str:
    import yaml

    base = None
    if plan.recipe is not None and plan.recipe.base_model:
        base = plan.recipe.base_model
    labels = [c.label for c in plan.inputs]
    front = {
        "base_model": [base] if base else labels,
        "tags": ["merge", "mergesmith", plan.method.name],
        "library_name": "transformers",
    }
    lines = ["---", yaml.safe_dump(front, sort_keys=False).strip(), "---", "",
             "# Merged model", "",
             f"This model was merged with [mergesmith](https://pypi.org/project/mergesmith/) using the "
             f"**{plan.method.name}** method ({plan.method.paper}).", "", "## Inputs", ""]
    for label in labels:
        lines.append(f"- `{label}`" + (" (base)" if label == base else ""))
    lines += ["", "## Method", "", f"`{plan.method.math.strip()}`", "", "## Recipe", "", "```yaml", recipe_yaml.strip(), "```", ""]
    return "\n".join(lines)
