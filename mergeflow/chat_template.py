"""mergekit's `chat_template` key: the chat template the merged model's tokenizer carries.

`auto` takes the template most of the merged models (base first, then the models as listed)
carry, ties going to the first; a name from NAMED_TEMPLATES (as mergekit names its built-in
ones) gives that format; a Jinja template is used as given. Without the key the
tokenizer files are copied as they are. A model's template is what transformers loads: its
`chat_template.jinja` file, else the `chat_template` of its tokenizer_config.json (the entry
named "default" where that holds a list of named templates).

The output gets the template in both places transformers reads (chat_template.jinja wins in
transformers 5, older versions read only tokenizer_config.json); the tokenizer source's own
chat_template.jinja and processor chat_template.json are not copied.
"""

from __future__ import annotations

import json
from collections import Counter

from mergeflow.checkpoint import Checkpoint
from mergeflow.errors import CheckpointError, ConfigError

JINJA = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"
REPLACED = (JINJA, "chat_template.json")  # not copied from the tokenizer source when a template is set

# The common formats by name. They set the template only: the tokenizer must already know the
# format's special tokens (<|im_start|>, <|eot_id|>, ...), as with mergekit's named templates.
NAMED_TEMPLATES = {
    "chatml": (
        "{% for message in messages %}"
        "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
    ),
    "llama3": (
        "{{ bos_token }}{% for message in messages %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"
        " + message['content'] | trim + '<|eot_id|>' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "alpaca": (
        "{% for message in messages %}"
        "{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
        "{% elif message['role'] == 'user' %}{{ '### Instruction:\\n' + message['content'] + '\\n\\n' }}"
        "{% else %}{{ '### Response:\\n' + message['content'] + eos_token + '\\n\\n' }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '### Response:\\n' }}{% endif %}"
    ),
    # Mistral's instruct format: no system role (a system message opens the first user turn),
    # user and assistant alternating, and the assistant speaks next without a prompt.
    "mistral": (
        "{{ bos_token }}"
        "{% set opens_with_system = messages and messages[0]['role'] == 'system' %}"
        "{% set system = messages[0]['content'] + '\\n\\n' if opens_with_system else '' %}"
        "{% set turns = messages[1:] if opens_with_system else messages %}"
        "{% for message in turns %}"
        "{% if (message['role'] == 'user') != (loop.index0 is even) %}"
        "{{ raise_exception('mistral: roles alternate user/assistant after an optional system message') }}"
        "{% elif message['role'] == 'user' %}"
        "{{ ' [INST] ' + (system if loop.first else '') + message['content'] + ' [/INST]' }}"
        "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}"
        "{% endfor %}"
    ),
    # EXAONE's format: every conversation opens with a system turn, empty when none is given.
    "exaone": (
        "{% if not messages or messages[0]['role'] != 'system' %}"
        "{{ '[|system|][|endofturn|]\\n' }}"
        "{% endif %}"
        "{% for message in messages %}"
        "{{ '[|' + message['role'] + '|]' + message['content'] }}"
        "{{ '\\n' if message['role'] == 'user' else '[|endofturn|]\\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}"
    ),
}


def chosen_chat_template(setting: str | None, models: list[Checkpoint], tokenizer: Checkpoint) -> str | None:
    """The template to write, or None to copy the tokenizer files unchanged; checked before the
    merge: the tokenizer source must have a tokenizer_config.json to carry it."""
    if setting is None:
        return None
    if setting == "auto":
        templates = [t for t in (model_chat_template(m) for m in models) if t]
        if not templates:
            return None
        template = Counter(templates).most_common(1)[0][0]
    else:
        template = NAMED_TEMPLATES.get(setting, setting)
    if TOKENIZER_CONFIG not in tokenizer.file_names:
        raise ConfigError(
            f"chat_template: the tokenizer source '{tokenizer.ref}' has no {TOKENIZER_CONFIG} to carry it"
        )
    _tokenizer_config(tokenizer)  # readable: the output's copy gets the template
    return template


def model_chat_template(model: Checkpoint) -> str | None:
    """The template transformers would load with this model's tokenizer, stripped; or None."""
    if JINJA in model.file_names:
        text = model.location.child(JINJA).read_bytes().decode("utf-8", errors="replace")
        return text.strip() or None
    if TOKENIZER_CONFIG not in model.file_names:
        return None
    template = _tokenizer_config(model).get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        template = next(
            (t.get("template") for t in template if isinstance(t, dict) and t.get("name") == "default"), None
        )
    return (template.strip() or None) if isinstance(template, str) else None


def with_chat_template(files: list[tuple[str, bytes]], template: str) -> list[tuple[str, bytes]]:
    """The tokenizer files to write, carrying `template`."""
    written = []
    for name, data in files:
        if name in REPLACED:
            continue
        if name == TOKENIZER_CONFIG:
            config = json.loads(data)
            config["chat_template"] = template
            data = json.dumps(config, indent=2, ensure_ascii=False).encode()
        written.append((name, data))
    return [*written, (JINJA, template.encode())]


def _tokenizer_config(model: Checkpoint) -> dict:
    location = model.location.child(TOKENIZER_CONFIG)
    try:
        config = json.loads(location.read_bytes())
    except ValueError as exc:
        raise CheckpointError(f"{location.uri}: not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"{location.uri}: expected a JSON object")
    return config
