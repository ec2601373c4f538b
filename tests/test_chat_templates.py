"""Built-in chat templates (io/card.py): each renders the conversation format it names, through the same
Jinja settings transformers uses for chat templates, and an unknown name is a clear error."""
from __future__ import annotations

import pytest

from mergesmith.io.card import BUILTIN_CHAT_TEMPLATES, resolve_chat_template
from mergesmith.methods.base import MergeError

CHAT = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Bye"}]

EXPECTED = {
    "chatml": "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
              "<|im_start|>assistant\n",
    "llama3": "<s><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>"
              "\n\nHello<|eot_id|><|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
              "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "alpaca": "### Instruction:\nHi\n\n### Response:\nHello</s>\n\n### Instruction:\nBye\n\n### Response:\n",
    "mistral": "<s>[INST] Hi [/INST]Hello</s>[INST] Bye [/INST]",
    "exaone": "[|system|][|endofturn|]\n[|user|]Hi\n[|assistant|]Hello[|endofturn|]\n[|user|]Bye\n[|assistant|]",
}


def _render(template: str, messages: list) -> str:
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)  # transformers' settings
    return env.from_string(template).render(messages=messages, add_generation_prompt=True, bos_token="<s>",
                                            eos_token="</s>")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_builtin_template_renders_its_format(name):
    assert set(BUILTIN_CHAT_TEMPLATES) == set(EXPECTED)
    assert _render(resolve_chat_template(name, []), CHAT) == EXPECTED[name]


def test_exaone_keeps_a_given_system_turn():
    got = _render(BUILTIN_CHAT_TEMPLATES["exaone"], [{"role": "system", "content": "Be brief."}] + CHAT[:1])
    assert got == "[|system|]Be brief.[|endofturn|]\n[|user|]Hi\n[|assistant|]"


def test_unknown_template_name_is_an_error():
    with pytest.raises(MergeError, match="neither auto, a built-in"):
        resolve_chat_template("vicuna", [])
