#!/usr/bin/env python3
"""Render a chat with a GGUF's own template the way Hugging Face transformers does.

Independent reference for isotope's minijinja rendering: the template and special
tokens are read with the `gguf` package (not through llama.cpp) and rendered with
`jinja2` configured as transformers' `apply_chat_template` configures it.

usage: chat_reference.py MODEL.gguf MESSAGES.json [--no-generation-prompt]
"""
import json
import sys

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from gguf import GGUFReader


def field(reader, key):
    f = reader.fields.get(key)
    return None if f is None else f.contents()


def main():
    model, messages_path = sys.argv[1], sys.argv[2]
    add_generation_prompt = "--no-generation-prompt" not in sys.argv[3:]
    reader = GGUFReader(model)
    template = field(reader, "tokenizer.chat_template")
    tokens = field(reader, "tokenizer.ggml.tokens")
    bos = tokens[field(reader, "tokenizer.ggml.bos_token_id")]
    eos = tokens[field(reader, "tokenizer.ggml.eos_token_id")]

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    with open(messages_path, encoding="utf-8") as f:
        messages = json.load(f)
    out = env.from_string(template).render(
        messages=messages,
        add_generation_prompt=add_generation_prompt,
        bos_token=bos,
        eos_token=eos,
    )
    sys.stdout.write(out)


if __name__ == "__main__":
    main()
