"""Chat templates: a conversation (a list of {"role", "content"} messages) -> the text a model reads.

    template = load_chat_template("chatml")                   # a built-in by name
    template = load_chat_template("my.jinja")                 # a Jinja file, or a tokenizer_config.json
    template = load_chat_template(None, dirs=[adapter_dir, model_dir], tokenizer=tok)  # what the checkpoint says
    text = template.render(messages, add_generation_prompt=True)
    ids, mask = chat_tokens(tok, template, messages)          # mask[i]: token i belongs to an assistant turn
    template.end_of_turn                                      # "<|im_end|>": what ends an answer

Built-in templates (`BUILTIN`), each a Python function AND the Jinja source it equals (tests check
that both render the same text, so a run recorded with one renders identically with the other):
- "chatml":  <|im_start|>role\\ncontent<|im_end|>\\n           (Qwen2, SmolLM2, many fine-tunes)
- "llama2":  <s>[INST] <<SYS>>\\nsys\\n<</SYS>>\\n\\nuser [/INST] answer </s>   (Llama 2, Mistral-style)
- "llama3":  <|start_header_id|>role<|end_header_id|>\\n\\ncontent<|eot_id|>   (Llama 3)
- "plain":   User: ...\\nAssistant: ...<eos>\\n            (tiny models trained here: no special tokens needed)

A checkpoint's own template (a `chat_template.jinja` file, or `chat_template` in its
tokenizer_config.json) is rendered with jinja2, set up as transformers sets it up (sandboxed,
trim_blocks, lstrip_blocks, loop controls, raise_exception, strftime_now, tojson without ASCII
escapes, a pass-through {% generation %} tag), when jinja2 is installed (`pip install minilora[chat]`).
Without jinja2, or when a checkpoint has none, the built-in whose markers it uses stands in
(one warning line), else "plain" or the family's format guessed from the tokenizer's tokens.

Tokens. The rendered text is tokenized with special tokens allowed (the template's <|im_end|>
becomes one id where the tokenizer has it), as transformers does; each assistant answer (from the
end of the generation prompt through its end-of-turn text) is tokenized on its own, because that
is how its tokens came about at generation time. Training (loss mask), generate.py and the server
all call chat_tokens, so they see the same ids for the same conversation.
"""

import datetime
import json
import os
import sys
from dataclasses import dataclass, field

from minilora.errors import MiniloraError
from minilora.fileio import atomic_open

try:  # optional (extra "chat"): the checkpoint's own Jinja template; the built-ins work without it
    import jinja2
    import jinja2.ext
    import jinja2.nodes
    import jinja2.sandbox
except ImportError:
    jinja2 = None

ROLES = ("system", "user", "assistant")
TEMPLATE_FILE = "chat_template.jinja"  # written beside every trained adapter / model (transformers' name)


class ChatError(MiniloraError):
    """A conversation or template minilora refuses; the message names the problem and the fix."""


# ----------------------------------------------------------------------------- the built-ins

def _chatml(messages, add_generation_prompt, bos_token, eos_token):
    out = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return out + ("<|im_start|>assistant\n" if add_generation_prompt else "")


def _llama2(messages, add_generation_prompt, bos_token, eos_token):
    system, turns = (messages[0]["content"], messages[1:]) if messages and messages[0]["role"] == "system" else (None, messages)
    out = ""
    for k, m in enumerate(turns):
        if (m["role"] == "user") != (k % 2 == 0):
            raise ChatError("Conversation roles must alternate user/assistant/user/assistant/...")
        content = m["content"]
        if k == 0 and system is not None:
            content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}"
        if m["role"] == "user":
            out += f"{bos_token}[INST] {content.strip()} [/INST]"
        else:
            out += f" {content.strip()} {eos_token}"
    return out  # the generation prompt is the [/INST] already there


def _llama3(messages, add_generation_prompt, bos_token, eos_token):
    out = bos_token if messages else ""
    out += "".join(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>" for m in messages)
    return out + ("<|start_header_id|>assistant<|end_header_id|>\n\n" if add_generation_prompt else "")


def _plain(messages, add_generation_prompt, bos_token, eos_token):
    out = ""
    for m in messages:
        if m["role"] == "system":
            out += f"{m['content']}\n\n"
        elif m["role"] == "user":
            out += f"User: {m['content']}\n"
        else:
            out += f"Assistant: {m['content']}{eos_token}\n"
    return out + ("Assistant:" if add_generation_prompt else "")


# The same formats in Jinja, as checkpoints write them (ChatML as Qwen's without the default system
# line; Llama 2 and 3 as Meta's tokenizer_config.json). Jinja's str.strip() / trim = Python's .strip().
JINJA = {
    "chatml": ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
               "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"),
    "llama2": ("{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = "
               "messages[0]['content'] %}{% else %}{% set loop_messages = messages %}{% set system_message = false %}"
               "{% endif %}{% for message in loop_messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
               "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
               "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + "
               "'\\n<</SYS>>\\n\\n' + message['content'] %}{% else %}{% set content = message['content'] %}{% endif %}"
               "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
               "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}"),
    "llama3": ("{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = "
               "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + "
               "'<|eot_id|>' %}{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}"
               "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"),
    "plain": ("{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] + '\\n\\n' }}"
              "{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\\n' }}"
              "{% else %}{{ 'Assistant: ' + message['content'] + eos_token + '\\n' }}{% endif %}{% endfor %}"
              "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"),
}
BUILTIN = {"chatml": _chatml, "llama2": _llama2, "llama3": _llama3, "plain": _plain}
# What ends an assistant turn in each format (None: the tokenizer's end-of-sequence text)
END_OF_TURN = {"chatml": "<|im_end|>", "llama2": None, "llama3": "<|eot_id|>", "plain": None}
# Markers that say which built-in a foreign template is (the stand-in when jinja2 is missing)
MARKERS = (("<|im_start|>", "chatml"), ("<|start_header_id|>", "llama3"), ("[INST]", "llama2"))


# ----------------------------------------------------------------------------- Jinja, as transformers sets it up

class _Generation(jinja2.ext.Extension if jinja2 else object):
    """transformers' {% generation %} ... {% endgeneration %} (TRL's assistant-mask marker): renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers' tojson: Jinja's own escapes HTML characters and writes non-ASCII as \\u escapes
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _compile(source, where):
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                       extensions=[_Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.exceptions.TemplateError as e:
        raise ChatError(f"{where}: the chat template is not valid Jinja ({e}); fix it or pass --chat_template NAME") from None


# ----------------------------------------------------------------------------- the template object

@dataclass
class ChatTemplate:
    """A chat format: render(messages) -> text. name: a built-in's name, or where the Jinja came from."""

    name: str
    source: str                   # Jinja source (a built-in's equivalent for built-ins): what gets recorded
    bos_token: str = ""
    eos_token: str = ""
    end_of_turn: str = ""         # the text that ends an assistant answer (stop here when generating)
    builtin: str | None = None    # rendered by this built-in function (no Jinja needed)
    _compiled: object = field(default=None, repr=False, compare=False)

    def render(self, messages, add_generation_prompt=False):
        messages = check_messages(messages)
        if self.builtin is not None:
            return BUILTIN[self.builtin](messages, add_generation_prompt, self.bos_token, self.eos_token)
        if self._compiled is None:
            self._compiled = _compile(self.source, self.name)
        try:
            return self._compiled.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token, eos_token=self.eos_token)
        except jinja2.exceptions.TemplateError as e:
            raise ChatError(f"chat template {self.name}: {e}") from None

    def assistant_spans(self, messages):
        """Character spans [(start, end), ...] of each assistant answer in render(messages): from the end of
        the generation prompt before it through its end-of-turn text (what the model must produce)."""
        text, spans = self.render(messages), []
        for i, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt, full = self.render(messages[:i], add_generation_prompt=True), self.render(messages[:i + 1])
            if not (full.startswith(prompt) and text.startswith(full)):
                raise ChatError(f"chat template {self.name} renders a conversation's beginning differently from the "
                                "whole, so the answers cannot be located; use a built-in --chat_template")
            end = full.rfind(self.end_of_turn, len(prompt)) if self.end_of_turn else -1
            spans.append((len(prompt), end + len(self.end_of_turn) if end >= 0 else len(full)))
        return spans

    def to_dict(self):
        return {"name": self.name, "builtin": self.builtin}


def check_messages(messages):
    """The messages as plain dicts, or ChatError naming what is wrong (callers prefix file:line)."""
    if not isinstance(messages, list) or not messages:
        raise ChatError("'messages' must be a non-empty list of {\"role\", \"content\"} objects")
    out = []
    for k, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ChatError(f"message {k} is not an object with 'role' and 'content'")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ChatError(f"message {k} has role {role!r}; use one of {', '.join(ROLES)}")
        if isinstance(content, list):  # OpenAI's content parts: the text ones, joined
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
                raise ChatError(f"message {k}: only text content parts ({{\"type\": \"text\", \"text\": ...}}) are supported")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise ChatError(f"message {k} ({role}) has no 'content' string")
        out.append({"role": role, "content": content})
    return out


def chat_tokens(tokenizer, template, messages, add_generation_prompt=False):
    """(ids, mask): the conversation's token ids, and for each id whether it belongs to an assistant answer.

    Text outside the answers is tokenized as one piece per stretch, each answer on its own (see the module doc)."""
    messages = check_messages(messages)
    text = template.render(messages, add_generation_prompt)
    cuts = template.assistant_spans(messages) if any(m["role"] == "assistant" for m in messages) else []
    ids, mask, at = [], [], 0
    for start, end in cuts + [(len(text), len(text))]:
        for piece, is_answer in ((text[at:start], False), (text[start:end], True)):
            if piece:
                new = tokenizer.encode(piece, allow_special=True)
                ids += new
                mask += [is_answer] * len(new)
        at = end
    return ids, mask


def stop_tokens(tokenizer, template):
    """(eos ids, stop strings) that end an answer: the tokenizer's EOS ids, plus the template's end-of-turn
    as an id when it is one special token of this tokenizer, else as a stop string."""
    eos, stops = list(tokenizer.eos_token_ids), []
    if template.end_of_turn and template.end_of_turn != template.eos_token:
        ids = tokenizer.encode(template.end_of_turn, allow_special=True)
        if len(ids) == 1:
            eos = list(dict.fromkeys(eos + ids))
        else:
            stops.append(template.end_of_turn)
    return eos, stops


# ----------------------------------------------------------------------------- finding a template

def _special_texts(tokenizer):
    bos = tokenizer.decode([tokenizer.bos_token]) if tokenizer is not None and tokenizer.bos_token is not None else ""
    eos = tokenizer.decode([tokenizer.eot_token]) if tokenizer is not None and tokenizer.eot_token is not None else ""
    return bos, eos


def _guess(tokenizer):
    """The built-in a checkpoint without a template most likely speaks, from its tokens."""
    for marker, name in MARKERS:
        if tokenizer is not None and len(tokenizer.encode(marker, allow_special=True)) == 1:
            return name
    return "plain"


def _builtin(name, tokenizer, where=None):
    bos, eos = _special_texts(tokenizer)
    end = END_OF_TURN[name] if END_OF_TURN[name] is not None else eos
    return ChatTemplate(where or name, JINJA[name], bos, eos, end, builtin=name)


def from_source(source, where, tokenizer=None):
    """A ChatTemplate for Jinja `source`: the built-in when it is one's exact source, jinja2 otherwise,
    and without jinja2 the built-in whose markers it uses (with one warning line)."""
    for name, src in JINJA.items():
        if source == src:
            return _builtin(name, tokenizer)
    bos, eos = _special_texts(tokenizer)
    end = next((m for m in ("<|im_end|>", "<|eot_id|>", "<end_of_turn>", "<|end|>") if m in source), eos)
    if jinja2 is None:
        name = next((n for marker, n in MARKERS if marker in source), "plain")
        print(f"warning: {where}: jinja2 is not installed (pip install 'minilora[chat]'), so its chat template is "
              f"rendered with the built-in {name!r} instead", file=sys.stderr)
        return _builtin(name, tokenizer, where=f"{name} (standing in for {where})")
    template = ChatTemplate(where, source, bos, eos, end)
    template._compiled = _compile(source, where)  # a syntax error fails now, not at the first request
    return template


def _read(path):
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ChatError(f"cannot read chat template {path}: {e}") from None


def _config_source(path):
    """The Jinja source in a tokenizer_config.json's chat_template, or None."""
    try:
        cfg = json.loads(_read(path))
    except ValueError as e:
        raise ChatError(f"{path} is not valid JSON ({e})") from None
    source = cfg.get("chat_template") if isinstance(cfg, dict) else None
    if isinstance(source, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default")
    if source is not None and not isinstance(source, str):
        raise ChatError(f"{path}: chat_template must be a string (or a list of named ones with a 'default')")
    return source


def _from_tokenizer_config(path, tokenizer):
    source = _config_source(path)
    return None if source is None else from_source(source, path, tokenizer)


def template_source(directory):
    """(Jinja source, the file it is in) that a directory carries (chat_template.jinja, then
    tokenizer_config.json), or (None, None). The text as written: merge.py copies it on unchanged."""
    jinja_path, cfg = os.path.join(directory, TEMPLATE_FILE), os.path.join(directory, "tokenizer_config.json")
    if os.path.isfile(jinja_path):
        return _read(jinja_path), jinja_path
    source = _config_source(cfg) if os.path.isfile(cfg) else None
    return (source, cfg) if source is not None else (None, None)


def template_in(directory, tokenizer=None):
    """The chat template a directory carries (chat_template.jinja, then tokenizer_config.json), or None."""
    source, where = template_source(directory)
    return None if source is None else from_source(source, where, tokenizer)


def load_chat_template(name_or_file=None, dirs=(), tokenizer=None):
    """The template to use: `name_or_file` (a built-in's name, a .jinja file, a tokenizer_config.json or a
    directory) when given; else the first of `dirs` that carries one; else a built-in guessed from the tokenizer."""
    if name_or_file:
        if name_or_file in BUILTIN:
            return _builtin(name_or_file, tokenizer)
        if os.path.isdir(name_or_file):
            found = template_in(name_or_file, tokenizer)
            if found is None:
                raise ChatError(f"--chat_template {name_or_file}: the directory has no {TEMPLATE_FILE} and no "
                                "chat_template in a tokenizer_config.json")
            return found
        if not os.path.isfile(name_or_file):
            raise ChatError(f"--chat_template {name_or_file!r}: not a built-in ({', '.join(BUILTIN)}) and no such file")
        if name_or_file.endswith(".json"):
            found = _from_tokenizer_config(name_or_file, tokenizer)
            if found is None:
                raise ChatError(f"--chat_template {name_or_file}: the file has no chat_template")
            return found
        return from_source(_read(name_or_file), name_or_file, tokenizer)
    for d in dirs:
        if d and os.path.isdir(d):
            found = template_in(d, tokenizer)
            if found is not None:
                return found
    return _builtin(_guess(tokenizer), tokenizer)


def write_template(template, directory):
    """Record `template` in `directory` as chat_template.jinja (transformers and vLLM read it there too)."""
    with atomic_open(os.path.join(directory, TEMPLATE_FILE), "wb") as f:
        f.write(template.source.encode("utf-8"))
