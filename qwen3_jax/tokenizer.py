"""Tokenizer for Qwen3 checkpoints: `tokenizers` for encode/decode, jinja2 for the chat template.

Matches transformers' AutoTokenizer on the same checkpoint: the same ids, the same decoded text, and the
chat template rendered in the same sandboxed jinja2 environment with the same variables.
`StreamDecoder` turns generated ids into text incrementally without splitting multi-byte characters.
"""

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import AddedToken
from tokenizers import Tokenizer as _HFTokenizer

# Named special tokens, in transformers' order; they are the ones passed to the chat template.
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Names a message's reasoning may come under; transformers fills `reasoning_content` and `thinking` from any.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


class ChatTemplateError(jinja2.TemplateError, ValueError):
    """A chat template that does not compile or that failed to render, naming the file it came from (a jinja2
    TemplateError, as transformers raises, and a ValueError)."""


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: a Qwen3 checkpoint directory needs {path.name}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _token_content(value: Any, field: str, path: Path) -> str | None:
    """A special token given as a string, as an AddedToken dict ({"content": ...}), or null."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{path}: {field} must be a string, null or an object with 'content', got {value!r}")


def _read_template(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: the chat template is not UTF-8 text ({e})") from None


def _load_chat_templates(model_dir: Path, config: dict, config_path: Path) -> tuple[str | dict | None, dict]:
    """As transformers: chat_template.jinja and additional_chat_templates/*.jinja first, else tokenizer_config.
    Returns the template(s) and, for error messages, where each template's text came from."""
    templates, origins = {}, {}
    if (model_dir / "chat_template.jinja").is_file():
        templates["default"] = _read_template(model_dir / "chat_template.jinja")
        origins[templates["default"]] = str(model_dir / "chat_template.jinja")
    if (model_dir / "additional_chat_templates").is_dir():
        for path in sorted((model_dir / "additional_chat_templates").glob("*.jinja")):
            templates[path.name.removesuffix(".jinja")] = text = _read_template(path)
            origins.setdefault(text, str(path))
    if templates:
        return (templates["default"] if list(templates) == ["default"] else templates), origins
    template = config.get("chat_template")
    where = f"{config_path} (chat_template)"
    if isinstance(template, list):  # legacy list of {"name": ..., "template": ...}
        if not all(isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("template"), str)
                   for t in template):
            raise ValueError(f"{where}: a list of chat templates must hold {{\"name\": ..., \"template\": ...}} "
                             "objects of strings")
        template = {t["name"]: t["template"] for t in template}
        return template, {text: f"{where}[{name!r}]" for name, text in template.items()}
    if template is not None and not isinstance(template, str):
        raise ValueError(f"{where}: must be a string (a jinja template), got {type(template).__name__}")
    return template, ({template: where} if template else {})


class _GenerationTag(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (assistant-mask markers some templates use): renders its body."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


class _Namespace(jinja2.utils.Namespace):
    """jinja2's namespace() minus underscore attributes, as transformers restricts it."""

    def __init__(*args, **kwargs):
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _Namespace._check(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _Namespace._check(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes ({name!r})")


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # Unlike jinja2's own tojson: no HTML escaping, and the json.dumps options are exposed.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt):
    return datetime.now().strftime(fmt)


def _compile_template(source: str) -> jinja2.Template:
    """The environment transformers renders chat templates in."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationTag, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = dict
    env.globals["namespace"] = _Namespace
    return env.from_string(source)


CHAT_ROLES = ("system", "user", "assistant", "tool")  # the roles Qwen3's template renders (others it drops)


def _normalize_message(message: dict, index: int = 0) -> dict:
    """Drop None values and alias reasoning fields, as transformers does before rendering."""
    if not isinstance(message, dict):
        raise TypeError(f"chat message {index} must be a dict like {{'role': 'user', 'content': 'Hi'}}, got "
                        f"{message!r}")
    role = message.get("role")
    if role not in CHAT_ROLES:
        raise ValueError(f"chat message {index}: 'role' must be one of {', '.join(CHAT_ROLES)}; got {role!r}")
    content = message.get("content")
    if content is not None and not isinstance(content, str):
        raise TypeError(f"chat message {index}: 'content' must be a string, got {type(content).__name__}")
    message = {k: v for k, v in message.items() if v is not None}
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is not None:
        message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
    return message


class Tokenizer:
    """A checkpoint's tokenizer: `encode`, `decode`, `apply_chat_template`, `stream_decoder`."""

    def __init__(self, tokenizer: _HFTokenizer, config: dict, chat_template=None, eos_token_ids=(),
                 name: str = "tokenizer", template_origins: dict[str, str] | None = None):
        self._tok = tokenizer
        self.config = config  # tokenizer_config.json as read
        self.chat_template = chat_template
        self.name = name
        self._template_origins = template_origins or {}  # template text -> the file (and field) it came from
        self.special_tokens: dict[str, str] = {}
        for field in SPECIAL_TOKEN_NAMES:
            content = _token_content(config.get(field), field, Path(name))
            if content is not None:
                self.special_tokens[field] = content
        # transformers adds named special tokens that the vocabulary lacks; do the same so they get ids.
        missing = [t for t in self.special_tokens.values() if tokenizer.token_to_id(t) is None]
        if missing:
            tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in missing])
        ids = [self.eos_token_id] if self.eos_token_id is not None else []
        self.eos_token_ids: tuple[int, ...] = tuple(dict.fromkeys(ids + [int(i) for i in eos_token_ids]))
        self._compiled: dict[str, jinja2.Template] = {}

    @classmethod
    def from_pretrained(cls, model_dir) -> "Tokenizer":
        """Load tokenizer.json, tokenizer_config.json, the chat template and generation_config's eos ids."""
        model_dir = Path(model_dir)
        tok_path, config_path = model_dir / "tokenizer.json", model_dir / "tokenizer_config.json"
        if not tok_path.is_file():
            raise FileNotFoundError(f"{tok_path} not found: a Qwen3 checkpoint directory needs tokenizer.json")
        try:
            tokenizer = _HFTokenizer.from_file(str(tok_path))
        except Exception as e:  # the Rust side raises a plain Exception on bad JSON or unknown fields
            raise ValueError(f"{tok_path} is not a valid `tokenizers` file: {e}") from e
        config = _read_json(config_path)
        _add_config_tokens(tokenizer, config, config_path)
        eos_ids = ()
        gen_path = model_dir / "generation_config.json"
        if gen_path.is_file():
            eos = _read_json(gen_path).get("eos_token_id")
            eos_ids = (eos,) if isinstance(eos, int) else tuple(eos or ())
            if isinstance(eos, (str, bool)) or not all(isinstance(i, int) and not isinstance(i, bool) for i in eos_ids):
                raise ValueError(f"{gen_path}: eos_token_id must be a token id or a list of token ids, got {eos!r}")
        templates, origins = _load_chat_templates(model_dir, config, config_path)
        return cls(tokenizer, config, templates, eos_ids, name=str(config_path), template_origins=origins)

    # ---- vocabulary -------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Size of the base vocabulary without added tokens (transformers' `tokenizer.vocab_size`)."""
        return self._tok.get_vocab_size(with_added_tokens=False)

    def __len__(self) -> int:
        """Number of ids the tokenizer knows, added tokens included (transformers' `len(tokenizer)`)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    def _special_id(self, field: str) -> int | None:
        token = self.special_tokens.get(field)
        return None if token is None else self._tok.token_to_id(token)

    bos_token = property(lambda self: self.special_tokens.get("bos_token"))
    eos_token = property(lambda self: self.special_tokens.get("eos_token"))
    pad_token = property(lambda self: self.special_tokens.get("pad_token"))
    bos_token_id = property(lambda self: self._special_id("bos_token"))
    eos_token_id = property(lambda self: self._special_id("eos_token"))
    pad_token_id = property(lambda self: self._special_id("pad_token"))

    @property
    def all_special_ids(self) -> list[int]:
        """Ids of added tokens marked special (those `decode(..., skip_special_tokens=True)` drops)."""
        return sorted(i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)

    # ---- text <-> ids -----------------------------------------------------------------------------------
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text` (Qwen3 adds no BOS/EOS either way)."""
        if not isinstance(text, str):
            raise TypeError(f"encode takes text (a str), got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: int | Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`; bytes that do not form complete UTF-8 characters become U+FFFD."""
        return self._tok.decode(self._check_ids(ids), skip_special_tokens=skip_special_tokens)

    def _check_ids(self, ids) -> list[int]:
        """One id or an iterable of them (Python, numpy or jax integers) -> a list of non-negative ints."""
        if _is_int_id(ids) or getattr(ids, "ndim", None) == 0:
            ids = [ids]
        if isinstance(ids, (str, bytes, dict)) or not isinstance(ids, Iterable):
            raise TypeError(f"token ids must be an integer or a list of integers, got {type(ids).__name__}")
        ids = list(ids)
        bad = next((i for i in ids if not _is_int_id(i)), None)
        if bad is not None:
            raise TypeError(f"token ids must be integers, got {bad!r} ({type(bad).__name__})")
        ids = [int(i) for i in ids]
        # Ids past the tokenizer's vocabulary (a model's padded embedding rows) decode to nothing, as in HF.
        bad = [i for i in ids if not 0 <= i < 2**32]
        if bad:
            raise ValueError(f"token ids must be non-negative (below 2**32), got {bad[:5]}")
        return ids

    def stream_decoder(self, skip_special_tokens: bool = False) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    # ---- chat -------------------------------------------------------------------------------------------
    def get_chat_template(self, tools=None) -> str:
        """The template transformers would pick: the only one, else `tool_use` with tools, else `default`."""
        template = self.chat_template
        if isinstance(template, dict):
            if tools is not None and "tool_use" in template:
                return template["tool_use"]
            if "default" in template:
                return template["default"]
            raise ValueError(f"{self.name}: several chat templates {sorted(template)} and none named 'default'")
        if not template:
            raise ValueError(f"{self.name}: this checkpoint has no chat template (no 'chat_template' in "
                             "tokenizer_config.json and no chat_template.jinja)")
        return template

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True,
                            enable_thinking: bool | None = None, tools: list[dict] | None = None,
                            documents: list[dict] | None = None, **kwargs) -> str:
        """Render `messages` with the checkpoint's chat template, like HF's apply_chat_template(tokenize=False)."""
        if isinstance(messages, (str, dict)) or not isinstance(messages, (list, tuple)):
            raise TypeError(f"messages must be a list of {{'role': ..., 'content': ...}} dicts, got "
                            f"{type(messages).__name__}")
        if not messages:
            raise ValueError("cannot apply the chat template to an empty conversation")
        if enable_thinking is not None and not isinstance(enable_thinking, bool):
            raise TypeError(f"enable_thinking must be True, False or None, got {enable_thinking!r}")
        messages = [_normalize_message(m, i) for i, m in enumerate(messages)]
        source = self.get_chat_template(tools)
        origin = self._template_origins.get(source, f"{self.name} (chat template)")
        if source not in self._compiled:
            try:
                self._compiled[source] = _compile_template(source)
            except jinja2.TemplateSyntaxError as e:
                raise ChatTemplateError(f"{origin}: chat template syntax error at line {e.lineno}: {e.message}") \
                    from None
        if enable_thinking is not None:  # only when given, so `enable_thinking is defined` behaves as in HF
            kwargs["enable_thinking"] = enable_thinking
        variables = {**self.special_tokens, **kwargs}
        try:
            return self._compiled[source].render(messages=messages, tools=tools, documents=documents,
                                                 add_generation_prompt=add_generation_prompt, **variables)
        # raise_exception(...) in the template, a sandbox stop, or Python errors of the template's own expressions
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, AttributeError, IndexError) as e:
            raise ChatTemplateError(f"{origin}: the chat template failed: {e}") from None


def _add_config_tokens(tokenizer: _HFTokenizer, config: dict, path: Path) -> None:
    """Register tokenizer_config.json's added_tokens_decoder entries that tokenizer.json lacks, at their ids."""
    decoder = config.get("added_tokens_decoder") or {}
    if not isinstance(decoder, dict):
        raise ValueError(f"{path}: added_tokens_decoder must be an object mapping ids to tokens")
    for key, entry in sorted(decoder.items(), key=lambda kv: int(kv[0])):
        content = _token_content(entry, f"added_tokens_decoder[{key}]", path)
        existing = tokenizer.token_to_id(content)
        if existing is not None:
            if existing != int(key):
                raise ValueError(f"{path}: {content!r} has id {key} but tokenizer.json gives it id {existing}")
            continue
        flags = {k: entry[k] for k in ("single_word", "lstrip", "rstrip", "normalized", "special") if k in entry}
        tokenizer.add_tokens([AddedToken(content, **flags)])
        if tokenizer.token_to_id(content) != int(key):
            raise ValueError(f"{path}: added token {content!r} should have id {key} but the vocabulary put it at "
                             f"{tokenizer.token_to_id(content)}")


def _is_int_id(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) or (
        getattr(x, "dtype", None) is not None and getattr(x, "ndim", None) == 0 and x.dtype.kind in "iu")


class StreamDecoder:
    """Incremental detokenizer: `add(ids)` returns only the new complete text, `flush()` the held-back rest.

    Byte-level BPE can split one character over several tokens, so text ending in an incomplete UTF-8
    sequence (decoded as U+FFFD) is held back until later tokens complete it. The window decoded each time
    starts at the previous emitted chunk, which ends on a character boundary, so the concatenated output
    equals `tokenizer.decode(all_ids)`.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0  # start of the window: the first token of the last emitted chunk
        self._read = 0  # tokens before this have been emitted

    def _decode(self, ids):
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def add(self, ids: int | Iterable[int]) -> str:
        """Append one id or several; return the text they complete ('' while a character is unfinished)."""
        self.ids.extend(self.tokenizer._check_ids(ids))
        prefix_text = self._decode(self.ids[self._prefix:self._read])
        text = self._decode(self.ids[self._prefix:])
        if len(text) <= len(prefix_text) or text.endswith("\ufffd"):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return text[len(prefix_text):]

    def flush(self) -> str:
        """At the end of a stream: the text still held back (an unfinished character gives U+FFFD, as in `decode`)."""
        prefix_text = self._decode(self.ids[self._prefix:self._read])
        text = self._decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return text[len(prefix_text):]
