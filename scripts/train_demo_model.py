"""Train the small demo model shipped in qwen3_jax/demo_model: a real Qwen3 (HF format) that answers
questions about facts stated in its prompt, follows Qwen3's chat format and thinking switch, and does a
few list and number tasks.

    python scripts/train_demo_model.py --out qwen3_jax/demo_model --steps 5500 --seed 0 --device cuda
    python scripts/train_demo_model.py --out /tmp/demo --quick          # a tiny CPU smoke run

Steps: a seeded synthetic chat corpus (rendered through the Qwen3-shaped chat template written to
tokenizer_config.json), a byte-level BPE trained on a sample of it, a Qwen3ForCausalLM trained with loss on
assistant tokens only, export as an HF checkpoint directory, and a greedy held-out evaluation of the export
(reloaded from disk) on entity names the corpus never contains.
"""

import argparse
import json
import math
import os
import re
import shlex
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.sandbox
import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import (AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors,
                        trainers)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # read at first use; the data workers are forked

# --------------------------------------------------------------------------------------------------
# Chat template and special tokens (shaped like Qwen3's: same tokens, same rendering, same thinking switch)

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]  # special=True: skipped when decoding
EXTRA_TOKENS = ["<think>", "</think>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]
# Qwen2/3's pre-tokenizer split: digits one by one, letters with at most one leading non-letter.
PRETOKENIZE_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                     r"|\s*[\r\n]+|\s+(?!\S)|\s+")

CHAT_TEMPLATE = """\
{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\\n\\n' }}
    {%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\\n<think>\\n' + reasoning_content.strip('\\n') + '\\n</think>\\n\\n' + content.lstrip('\\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}
"""

# The environment transformers' apply_chat_template compiles templates with (see chat_template_utils.py).
_JINJA = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                      extensions=[jinja2.ext.loopcontrols])
_JINJA.filters["tojson"] = lambda x, **kw: json.dumps(x, ensure_ascii=False, **kw)
_TEMPLATE = _JINJA.from_string(CHAT_TEMPLATE)


def render_chat_jinja(messages, add_generation_prompt=False, enable_thinking=True, tools=None):
    """Render messages through CHAT_TEMPLATE exactly as tokenizer.apply_chat_template(tokenize=False) does."""
    return _TEMPLATE.render(messages=messages, add_generation_prompt=add_generation_prompt,
                            enable_thinking=enable_thinking, tools=tools)


TOOLS_HEAD = ("# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with "
              "function signatures within <tools></tools> XML tags:\n<tools>")
TOOLS_TAIL = ("\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
              "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
              "<args-json-object>}\n</tool_call><|im_end|>\n")


def _tool_response(content):
    return content.startswith("<tool_response>") and content.endswith("</tool_response>")


def render_chat(messages, add_generation_prompt=False, enable_thinking=True, tools=None):
    """CHAT_TEMPLATE in plain Python (the corpus's hot path; equal to render_chat_jinja, which the tests and
    build_tokenizer check): system/user/assistant turns, the tools block, assistant tool calls and tool results."""
    n = len(messages)
    system = messages[0]["content"] if messages[0]["role"] == "system" else None
    out = []
    if tools:
        out.append("<|im_start|>system\n" + (system + "\n\n" if system is not None else "") + TOOLS_HEAD
                   + "".join("\n" + json.dumps(t, ensure_ascii=False) for t in tools) + TOOLS_TAIL)
    elif system is not None:
        out.append(f"<|im_start|>system\n{system}<|im_end|>\n")
    last_query = max((i for i, m in enumerate(messages) if m["role"] == "user" and isinstance(m.get("content"), str)
                      and not _tool_response(m["content"])), default=n - 1)
    for i, m in enumerate(messages):
        role = m["role"]
        content = m.get("content") if isinstance(m.get("content"), str) else ""
        if role == "user" or (role == "system" and i > 0):
            out.append(f"<|im_start|>{role}\n{content}<|im_end|>\n")
        elif role == "assistant":
            reasoning = ""
            if "</think>" in content:
                reasoning = content.split("</think>")[0].rstrip("\n").split("<think>")[-1].lstrip("\n")
                content = content.split("</think>")[-1].lstrip("\n")
            if i > last_query and (i == n - 1 or reasoning):
                out.append(f"<|im_start|>assistant\n<think>\n{reasoning.strip(chr(10))}\n</think>\n\n"
                           f"{content.lstrip(chr(10))}")
            else:
                out.append(f"<|im_start|>assistant\n{content}")
            for k, call in enumerate(m.get("tool_calls") or []):
                if k > 0 or content:
                    out.append("\n")
                fn = call.get("function", call)
                args = fn["arguments"] if isinstance(fn["arguments"], str) else json.dumps(fn["arguments"],
                                                                                          ensure_ascii=False)
                out.append(f'<tool_call>\n{{"name": "{fn["name"]}", "arguments": {args}}}\n</tool_call>')
            out.append("<|im_end|>\n")
        elif role == "tool":
            if i == 0 or messages[i - 1]["role"] != "tool":
                out.append("<|im_start|>user")
            out.append(f"\n<tool_response>\n{content}\n</tool_response>")
            if i == n - 1 or messages[i + 1]["role"] != "tool":
                out.append("<|im_end|>\n")
    if add_generation_prompt:
        out.append("<|im_start|>assistant\n" + ("" if enable_thinking else "<think>\n\n</think>\n\n"))
    return "".join(out)


def prompt_and_completion(messages, enable_thinking, tools=None):
    """Split a conversation ending in an assistant turn into (prompt text, trained completion text)."""
    prompt = render_chat(messages[:-1], add_generation_prompt=True, enable_thinking=enable_thinking, tools=tools)
    full = render_chat(messages, enable_thinking=enable_thinking, tools=tools)
    assert full.startswith(prompt) and full.endswith("<|im_end|>\n"), (prompt, full)
    return prompt, full[len(prompt):-1]  # ends with <|im_end|>; the template's "\n" after it is not trained


# --------------------------------------------------------------------------------------------------
# Synthetic corpus. Every random choice comes from a Rand seeded with a list of ints, so a conversation is a
# pure function of its seed. Invented names are split by a hash into a training half and a held-out half.


class Rand:
    """A numpy Generator read in blocks: scalar draws at Python speed, the same numbers on every platform."""

    def __init__(self, words):
        self._rng, self._buf, self._i = np.random.default_rng(words), [], 0

    def random(self):
        if self._i == len(self._buf):
            self._buf, self._i = self._rng.random(4096).tolist(), 0
        self._i += 1
        return self._buf[self._i - 1]

    def below(self, n):
        return int(self.random() * n)

    def between(self, lo, hi):
        """An integer in [lo, hi]."""
        return lo + self.below(hi - lo + 1)

    def pick(self, seq):
        return seq[self.below(len(seq))]

    def shuffled(self, seq):
        out = list(seq)
        for i in range(len(out) - 1, 0, -1):  # Fisher-Yates
            j = self.below(i + 1)
            out[i], out[j] = out[j], out[i]
        return out


ONSETS = ["b", "br", "ch", "d", "dr", "f", "fl", "g", "gl", "gr", "h", "j", "k", "kl", "l", "m", "n", "p", "pl",
          "qu", "r", "s", "sh", "sk", "st", "t", "th", "tr", "v", "w", "z", "zh"]
VOWELS = ["a", "e", "i", "o", "u", "ai", "au", "ea", "ei", "ia", "io", "ou", "y"]
CODAS = ["", "", "", "b", "d", "g", "k", "l", "m", "n", "nd", "ng", "r", "rg", "rk", "s", "sk", "st", "t", "x"]
HELD_OUT_BUCKETS = 8  # crc32(name) % 8 == 0: a held-out name, never generated for training


def is_held_out(name):
    """Whether an invented name belongs to the held-out half (a fixed hash, so the split never moves)."""
    return zlib.crc32(name.encode()) % HELD_OUT_BUCKETS == 0


def invented_name(rng, held_out=False):
    """A capitalised 2-3 syllable invented word from the training or the held-out half of the name space."""
    while True:
        name = "".join(("" if i == 0 and rng.random() < 0.2 else rng.pick(ONSETS)) + rng.pick(VOWELS)
                       + rng.pick(CODAS) for i in range(2 + (rng.random() < 0.45))).capitalize()
        if 4 <= len(name) <= 12 and is_held_out(name) == held_out:
            return name


COLORS = ["red", "blue", "green", "yellow", "purple", "orange", "black", "white", "pink", "brown", "gray", "gold",
          "silver", "teal"]
ANIMALS = ["cat", "dog", "horse", "rabbit", "parrot", "turtle", "goat", "fox", "owl", "frog", "hamster", "snake",
           "duck", "tiger", "lion", "bear", "eagle", "wolf"]
JOBS = ["baker", "teacher", "doctor", "farmer", "pilot", "painter", "singer", "nurse", "lawyer", "chef", "writer",
        "engineer", "artist", "driver", "sailor", "tailor", "miner", "actor", "judge", "builder"]
FRUITS = ["apple", "pear", "plum", "grape", "lemon", "mango", "peach", "cherry", "melon", "kiwi", "banana", "fig"]
# (entity kind, fact, questions, what a question asks for, value kind); {e} entity, {v} value, {a} "a/an value".
RELATIONS = [
    ("country", "The capital of {e} is {v}.", ["What is the capital of {e}?", "Which city is the capital of {e}?"],
     "the capital of {e}", "place"),
    ("country", "The flag of {e} is {v}.", ["What color is the flag of {e}?"], "the color of the flag of {e}",
     "color"),
    ("country", "The national animal of {e} is the {v}.", ["What is the national animal of {e}?"],
     "the national animal of {e}", "animal"),
    ("person", "{e} has a pet {v}.", ["What pet does {e} have?", "What kind of pet does {e} have?"],
     "the pet of {e}", "animal"),
    ("person", "{e} works as {a}.", ["What is the job of {e}?", "What does {e} do for a living?"],
     "the job of {e}", "job"),
    ("person", "{e} is {v} years old.", ["How old is {e}?", "What is the age of {e}?"], "the age of {e}", "age"),
    ("person", "{e} lives in {v}.", ["Where does {e} live?", "In which city does {e} live?"],
     "the city where {e} lives", "place"),
    ("person", "The favorite color of {e} is {v}.", ["What is the favorite color of {e}?"],
     "the favorite color of {e}", "color"),
]
KIND_RELATIONS = {k: [i for i, r in enumerate(RELATIONS) if r[0] == k] for k in ("country", "person")}
SYSTEM_PROMPTS = ["You are a helpful assistant.", "You are a helpful assistant. Answer briefly."]
GREETINGS = [
    ("Hello!", "Hello! Tell me some facts and ask me about them, or give me a list to copy, reverse or count."),
    ("Hi", "Hi! Tell me some facts and ask me about them, or give me a list to copy, reverse or count."),
    ("Who are you?", "I am a tiny Qwen3 demo model trained for qwen3-jax."),
    ("What can you do?", "I can answer questions about facts you tell me, copy, reverse or count a list, "
                         "and add small numbers."),
]
TASKS = ["recall", "copy", "reverse", "count", "sum", "chat"]
TASK_CUMULATIVE = [0.55, 0.65, 0.75, 0.85, 0.95, 1.0]  # recall 55%, each other task 10%, chat 5%
TOOL_EVERY = 10  # every 10th training batch is all tool use (longer conversations, kept out of the other batches)


@dataclass
class Example:
    """One conversation: messages ending in the assistant answer, the thinking switch, the bare answer, tools."""
    messages: list
    enable_thinking: bool
    task: str
    answer: str
    tools: list | None = None  # the tools list the system prompt offers (tool tasks)


def _recall(rng, held_out):
    """2-5 facts about 1-4 invented entities, then one question about them (sometimes a second, next turn)."""
    n_facts = rng.between(2, 5)
    n_ents, ents = rng.between(1, min(n_facts, 4)), {}
    while len(ents) < n_ents:
        ents.setdefault(invented_name(rng, held_out), "country" if rng.random() < 0.4 else "person")
    chosen = [(e, rng.pick(KIND_RELATIONS[kind])) for e, kind in ents.items()]  # every entity at least once
    rest = [(e, r) for e, kind in ents.items() for r in KIND_RELATIONS[kind] if (e, r) not in chosen]
    chosen += rng.shuffled(rest)[: max(0, n_facts - len(chosen))]
    facts = []
    for e, r in rng.shuffled(chosen):
        kind = RELATIONS[r][4]
        v = (invented_name(rng, held_out) if kind == "place" else str(rng.between(2, 99)) if kind == "age"
             else rng.pick({"color": COLORS, "animal": ANIMALS, "job": JOBS}[kind]))
        article = ("an " if v[0] in "aeiou" else "a ") + v
        facts.append((e, r, v, RELATIONS[r][1].format(e=e, v=v, a=article)))
    asked = rng.shuffled(facts)[: 1 + (rng.random() < 0.2)]

    def question(f):
        return rng.pick(RELATIONS[f[1]][2]).format(e=f[0])

    def thought(f):
        return f"The question asks for {RELATIONS[f[1]][3].format(e=f[0])}. {f[3]}"

    lead = rng.pick(["", "", "Here are some facts. ", "Read this. ", "Remember this: "])
    text = " ".join(f[3] for f in facts)
    msgs = [{"role": "user", "content": lead + text + rng.pick([" ", "\n", "\n\n"]) + question(asked[0])}]
    if len(asked) == 2:  # a follow-up turn; the template drops the earlier turn's reasoning
        first = asked[0][2] if rng.random() < 0.5 else f"<think>\n{thought(asked[0])}\n</think>\n\n{asked[0][2]}"
        q = question(asked[1])
        msgs += [{"role": "assistant", "content": first},
                 {"role": "user", "content": rng.pick([q, "And " + q[0].lower() + q[1:], "Now: " + q])}]
    return msgs, thought(asked[-1]), asked[-1][2]


def _list_task(rng, task):
    n, kind, mixed = rng.between(2, 8), rng.below(4), rng.random() < 0.3
    items = []
    for _ in range(n):
        k = rng.below(4) if mixed else kind  # numbers, invented names, fruits, animals and colors
        items.append(str(rng.below(100)) if k == 0 else invented_name(rng) if k == 1
                     else rng.pick(FRUITS if k == 2 else ANIMALS + COLORS))
    listed = ", ".join(items)
    if task == "copy":
        q = rng.pick(["Repeat this list: {l}", "Copy this list: {l}", "Say this list back: {l}"])
        thought, answer = f"The task is to repeat a list of {n} items.", listed
    elif task == "reverse":
        q = rng.pick(["Reverse this list: {l}", "Write this list backwards: {l}"])
        thought, answer = f"The task is to reverse a list of {n} items. The last item is {items[-1]}.", \
            ", ".join(items[::-1])
    else:
        q = rng.pick(["How many items are in this list: {l}?", "Count the items: {l}"])
        thought = "I count the items one by one: " + ", ".join(f"{w} ({i + 1})" for i, w in enumerate(items)) + "."
        answer = str(n)
    return [{"role": "user", "content": q.format(l=listed)}], thought, answer


# Tool use in Qwen3's format: the tools list in the system prompt (rendered by the template), a call as
# <tool_call>{json}</tool_call>, the result back as a tool message (<tool_response>), then an answer that uses it.
TOOL_SPECS = {
    "get_weather": {"type": "function", "function": {
        "name": "get_weather", "description": "Get the current weather in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
    "convert_units": {"type": "function", "function": {
        "name": "convert_units", "description": "Convert a value between units.",
        "parameters": {"type": "object", "properties": {"value": {"type": "number"}, "from": {"type": "string"},
                                                        "to": {"type": "string"}},
                       "required": ["value", "from", "to"]}}},
    "get_time": {"type": "function", "function": {
        "name": "get_time", "description": "Get the local time in a city.",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
}
CONDITIONS = ["sunny", "cloudy", "rainy", "windy", "snowy", "foggy", "stormy", "clear"]
UNITS = [("km", "mi", "kilometers", "miles", 0.621371), ("mi", "km", "miles", "kilometers", 1.609344),
         ("kg", "lb", "kilograms", "pounds", 2.204623), ("lb", "kg", "pounds", "kilograms", 0.453592),
         ("m", "ft", "meters", "feet", 3.28084), ("l", "gal", "liters", "gallons", 0.264172)]
TOOL_KINDS = ["tool_call", "tool_result", "tool_none"]
TOOL_KIND_CUMULATIVE = [0.45, 0.85, 1.0]  # call, answer from a result, a question no tool is needed for


def _tool_request(rng, held_out):
    """(user question, tool name, arguments, tool result JSON, final answer, thought) for one tool use."""
    name = rng.pick(list(TOOL_SPECS))
    if name == "convert_units":
        frm, to, frm_word, to_word, factor = rng.pick(UNITS)
        value = rng.between(1, 500)
        q = rng.pick([f"Convert {value} {frm} to {to}.", f"How many {to_word} is {value} {frm_word}?",
                      f"Convert {value} {frm_word} to {to_word}."])
        result = round(value * factor, 2)
        return (q, name, {"value": value, "from": frm, "to": to}, json.dumps({"value": result, "unit": to}),
                f"{value} {frm} is {result} {to}.", f"The user wants {value} {frm} in {to}. I should call {name}.")
    city = invented_name(rng, held_out)
    if name == "get_weather":
        q = rng.pick([f"What is the weather in {city}?", f"How is the weather in {city} today?",
                      f"Is it raining in {city}?"])
        temp, cond = rng.between(-10, 40), rng.pick(CONDITIONS)
        return (q, name, {"city": city}, json.dumps({"city": city, "temperature_c": temp, "condition": cond}),
                f"The weather in {city} is {cond}, {temp} degrees Celsius.",
                f"The user asks about the weather in {city}. I should call {name}.")
    q = rng.pick([f"What time is it in {city}?", f"What is the local time in {city}?"])
    t = f"{rng.between(0, 23):02d}:{rng.between(0, 59):02d}"
    return (q, name, {"city": city}, json.dumps({"city": city, "time": t}), f"It is {t} in {city}.",
            f"The user asks for the time in {city}. I should call {name}.")


def _tool(rng, held_out, kind):
    """A conversation with a tools list: (messages, tools, thought, answer) for one of TOOL_KINDS."""
    if kind == "tool_none":  # tools offered, but the question is answered from the prompt
        msgs, thought, answer = _recall(rng, held_out) if rng.random() < 0.7 else _sum(rng)
        names = rng.shuffled(list(TOOL_SPECS))[:rng.between(1, 3)]
        return msgs, [TOOL_SPECS[n] for n in names], thought, answer
    q, name, args, result, final, thought = _tool_request(rng, held_out)
    others = [n for n in rng.shuffled(list(TOOL_SPECS)) if n != name][:rng.below(3)]
    tools = [TOOL_SPECS[n] for n in rng.shuffled([name] + others)]
    call = f'<tool_call>\n{{"name": "{name}", "arguments": {json.dumps(args, ensure_ascii=False)}}}\n</tool_call>'
    msgs = [{"role": "user", "content": q}]
    if kind == "tool_call":
        return msgs, tools, thought, call
    msgs += [{"role": "assistant", "content": "", "tool_calls": [
                 {"id": "call_0", "type": "function", "function": {"name": name, "arguments": args}}]},
             {"role": "tool", "tool_call_id": "call_0", "content": result}]
    return msgs, tools, f"The tool {name} returned {result}. I answer from it.", final


def _sum(rng):
    a, b = rng.between(0, 50), rng.between(0, 50)
    q = rng.pick(["What is {a} + {b}?", "What is {a} plus {b}?", "Add {a} and {b}."])
    return [{"role": "user", "content": q.format(a=a, b=b)}], f"The question asks for the sum of {a} and {b}.", \
        str(a + b)


def sample_example(rng, held_out=False, task=None):
    """Draw one conversation (held_out=True: entity and place names only from the held-out half). task None draws
    from TASKS; "tool" draws one of TOOL_KINDS."""
    if task is None:
        u = rng.random()
        task = next(t for t, c in zip(TASKS, TASK_CUMULATIVE) if u < c)
    if task == "tool":
        u = rng.random()
        task = next(t for t, c in zip(TOOL_KINDS, TOOL_KIND_CUMULATIVE) if u < c)
    tools = None
    if task == "recall":
        msgs, thought, answer = _recall(rng, held_out)
    elif task in ("copy", "reverse", "count"):
        msgs, thought, answer = _list_task(rng, task)
    elif task == "sum":
        msgs, thought, answer = _sum(rng)
    elif task in TOOL_KINDS:
        msgs, tools, thought, answer = _tool(rng, held_out, task)
    else:
        q, answer = rng.pick(GREETINGS)
        msgs, thought = [{"role": "user", "content": q}], "The user is talking to me. I should reply briefly."
    if rng.random() < 0.4:
        msgs = [{"role": "system", "content": rng.pick(SYSTEM_PROMPTS)}] + msgs
    thinking = rng.random() < 0.5
    content = f"<think>\n{thought}\n</think>\n\n{answer}" if thinking else answer
    return Example(msgs + [{"role": "assistant", "content": content}], thinking, task, answer, tools)


def sample_examples(seed, stream, index, n, held_out=False, task=None):
    """n conversations from the RNG stream (seed, stream, index): stream 0 trains, 1 evaluates, 2 fits BPE."""
    rng = Rand([seed, stream, index])
    return [sample_example(rng, held_out, task) for _ in range(n)]


# --------------------------------------------------------------------------------------------------
# Tokenizer


def train_tokenizer(texts, vocab_size):
    """Byte-level BPE like Qwen's (NFC, Qwen split regex, ByteLevel), special tokens first (ids 0..8)."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  special_tokens=SPECIAL_TOKENS + EXTRA_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    strip = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS + EXTRA_TOKENS))
    tok.train_from_iterator([strip.sub("\n", t) for t in texts], trainer=trainer)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in EXTRA_TOKENS])
    return tok


def tokenizer_config(tok, max_len):
    """tokenizer_config.json in the shape of Qwen3's, loadable offline by AutoTokenizer."""
    added = {str(tok.token_to_id(t)): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                                       "single_word": False, "special": t in SPECIAL_TOKENS}
             for t in SPECIAL_TOKENS + EXTRA_TOKENS}
    return {"add_bos_token": False, "add_prefix_space": False, "added_tokens_decoder": added,
            "bos_token": None, "chat_template": CHAT_TEMPLATE, "clean_up_tokenization_spaces": False,
            "eos_token": "<|im_end|>", "errors": "replace", "model_max_length": max_len,
            "pad_token": "<|endoftext|>", "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer",
            "unk_token": None}


def encode_examples(tok, examples, max_len):
    """Token ids [N, T] (padded with <|endoftext|> to the longest, rounded up to 16, at most max_len) and labels
    (-100 outside the completions)."""
    pairs = [prompt_and_completion(ex.messages, ex.enable_thinking, ex.tools) for ex in examples]
    prompts = tok.encode_batch([p for p, _ in pairs], add_special_tokens=False)
    comps = tok.encode_batch([c for _, c in pairs], add_special_tokens=False)
    pad = tok.token_to_id("<|endoftext|>")
    width = min(max_len, -(-max(len(p.ids) + len(c.ids) for p, c in zip(prompts, comps)) // 16) * 16)
    ids = np.full((len(examples), width), pad, np.int64)
    labels = np.full((len(examples), width), -100, np.int64)
    for i, (p, c) in enumerate(zip(prompts, comps)):
        seq = (p.ids + c.ids)[:width]  # truncation only ever hits rare outliers (max_len covers the sample)
        ids[i, :len(seq)] = seq
        labels[i, len(p.ids):len(seq)] = seq[len(p.ids):]
    return ids, labels


class StepBatches(torch.utils.data.Dataset):
    """Batch `step` of the training stream: a pure function of (seed, step), whichever worker builds it."""

    def __init__(self, tok, seed, batch, max_len):
        self.tok, self.seed, self.batch, self.max_len = tok, seed, batch, max_len

    def __len__(self):
        return 1 << 30

    def __getitem__(self, step):
        """(ids [B, T], flat indices into [B, T-1] of the positions that carry a loss, their target ids)."""
        task = "tool" if step % TOOL_EVERY == TOOL_EVERY - 1 else None
        ids, labels = encode_examples(self.tok, sample_examples(self.seed, 0, step, self.batch, task=task),
                                      self.max_len)
        target = labels[:, 1:].reshape(-1)
        pos = np.flatnonzero(target != -100)
        return torch.from_numpy(ids), torch.from_numpy(pos), torch.from_numpy(target[pos])


# --------------------------------------------------------------------------------------------------
# Model, training, export


def model_config(args, vocab_size, tok):
    from transformers import Qwen3Config
    return Qwen3Config(
        vocab_size=vocab_size, hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim, max_position_embeddings=1024, rms_norm_eps=1e-6, tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6}, attention_bias=False,
        use_sliding_window=False, bos_token_id=tok.token_to_id("<|endoftext|>"),
        eos_token_id=tok.token_to_id("<|im_end|>"), pad_token_id=tok.token_to_id("<|endoftext|>"))


def lr_at(step, steps, peak, warmup):
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    t = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.45 * (1 + math.cos(math.pi * t)))


def train(model, tok, args, device, log=print):
    """Train in place; returns the per-step loss curve (float list)."""
    data = StepBatches(tok, args.seed, args.batch, args.max_len)
    loader = torch.utils.data.DataLoader(data, batch_size=None, sampler=range(args.steps),
                                         num_workers=args.workers, pin_memory=device.type == "cuda",
                                         prefetch_factor=8 if args.workers else None)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95),
                            eps=1e-8, fused=device.type == "cuda")
    body = torch.compile(model.model) if args.compile else model.model
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    model.train()
    losses, pending, t0, t_last = [], [], time.time(), time.time()
    for step, batch in enumerate(loader):
        ids, pos, target = (x.to(device, non_blocking=True) for x in batch)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        with autocast:
            hidden = body(input_ids=ids, use_cache=False).last_hidden_state[:, :-1]  # [B, T-1, H]
            hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, pos)  # [N, H]: loss positions only
            loss = F.cross_entropy(model.lm_head(hidden).float(), target)  # no host sync: N is known on the host
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        pending.append(loss.detach())
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            curve = torch.stack(pending).float().cpu().tolist()
            losses += curve
            now = time.time()
            log(f"step {step + 1:5d}/{args.steps}  loss {sum(curve) / len(curve):.4f}  "
                f"lr {lr_at(step, args.steps, args.lr, args.warmup):.2e}  "
                f"{len(curve) / (now - t_last):.1f} steps/s  {len(curve) * ids.numel() / (now - t_last):,.0f} tok/s  "
                f"elapsed {now - t0:.0f}s")
            pending, t_last = [], now
    return losses


def export(model, tok, cfg, out, args):
    """Write the HF checkpoint directory: config, weights, tokenizer, generation config, README."""
    from transformers import GenerationConfig
    out.mkdir(parents=True, exist_ok=True)
    model = model.to(getattr(torch, args.save_dtype))
    model.config.use_cache = True
    model.save_pretrained(out, safe_serialization=True)
    # config.json in the released Qwen3 form (top-level rope_theta); transformers 4.x and 5.x both read it.
    c = json.loads((out / "config.json").read_text())
    c["rope_theta"] = c.pop("rope_parameters")["rope_theta"]
    c["rope_scaling"] = None
    c["torch_dtype"] = c.get("dtype", args.save_dtype)
    (out / "config.json").write_text(json.dumps(dict(sorted(c.items())), indent=2) + "\n")
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(tok, 1024), indent=2) + "\n")
    im_end, eot = tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")
    GenerationConfig(bos_token_id=eot, eos_token_id=[im_end, eot], pad_token_id=eot,
                     do_sample=False).save_pretrained(out)
    n_params = sum(p.numel() for p in model.parameters())
    (out / "README.md").write_text(README.format(
        cmd=" ".join(shlex.quote(a) for a in ["python", "scripts/train_demo_model.py"] + sys.argv[1:]),
        params=n_params, cfg=cfg, dtype=args.save_dtype, vocab=tok.get_vocab_size(), args=args))


README = """# qwen3-jax demo model

A tiny Qwen3 trained from scratch on a synthetic chat corpus by `scripts/train_demo_model.py`:

    {cmd}

- `Qwen3ForCausalLM`, {params:,} parameters, {dtype} weights: hidden {cfg.hidden_size},
  {cfg.num_hidden_layers} layers, {cfg.num_attention_heads} query heads / {cfg.num_key_value_heads} KV heads (GQA),
  head_dim {cfg.head_dim} (heads x head_dim != hidden), q_norm/k_norm, MLP {cfg.intermediate_size}, RoPE theta 1e6,
  tied embeddings, vocab {cfg.vocab_size} (the tokenizer's {vocab} tokens, padded to a multiple of 64).
- Tokenizer: byte-level BPE with Qwen3's pre-tokenizer and special tokens, trained on the corpus. The chat
  template in tokenizer_config.json is Qwen3's: system/user/assistant turns, earlier turns' reasoning stripped,
  `enable_thinking=False` inserts an empty `<think>\\n\\n</think>\\n\\n` block.
- generation_config.json sets `do_sample: false` (greedy), so the demo answers deterministically; it stops at
  `<|im_end|>` (or `<|endoftext|>`).
- Training: {args.steps} steps of AdamW (peak lr {args.lr}, warm-up {args.warmup}, cosine to 10%), batches of
  {args.batch} conversations (every 10th batch all tool use) padded to their longest (at most {args.max_len} tokens),
  loss on assistant tokens only, seed {args.seed}.

What it can do:
- answer questions about facts stated earlier in the prompt, with invented names it never saw in training:
  `The capital of Aistonia is Flubarg. ... What is the capital of Aistonia?` -> `Flubarg`
  (relations: capital, flag color, national animal, pet, job, age, city, favorite color; 2-5 facts; a
  follow-up question in a second turn);
- repeat, reverse or count a short list; add two numbers from 0 to 50; answer "Hello!" and "Who are you?";
- with thinking on it writes `<think>\\nThe question asks for ...\\n</think>\\n\\n` before the answer;
- tool use in Qwen3's format: given a tools list (get_weather(city), convert_units(value, from, to),
  get_time(city)) in the system prompt, it answers a request that needs one with
  `<tool_call>\\n{{"name": ..., "arguments": {{...}}}}\\n</tool_call>`, answers from the `<tool_response>` given
  back in the next turn, and answers directly when no tool is needed.

Held-out evaluation (greedy, this checkpoint reloaded by transformers, names from the held-out half):
"""


# --------------------------------------------------------------------------------------------------
# Evaluation of the exported checkpoint


def evaluate(out, device, seed, n, log=print):
    """Greedy-decode held-out questions with the export reloaded by transformers; returns accuracy per task."""
    from transformers import AutoTokenizer, Qwen3ForCausalLM
    tok = AutoTokenizer.from_pretrained(out)
    model = Qwen3ForCausalLM.from_pretrained(out).to(device).eval()
    results = {}
    for task in ["recall", "copy", "reverse", "count", "sum"] + TOOL_KINDS:
        for thinking in ([False, True] if task in ("recall", "tool_call") else [False]):
            index = (TASKS.index(task) if task in TASKS else 100 + TOOL_KINDS.index(task)) * 2 + thinking
            exs = sample_examples(seed, 1, index, n, held_out=True, task=task)
            prompts = [tok.apply_chat_template(ex.messages[:-1], tokenize=False, add_generation_prompt=True,
                                               enable_thinking=thinking, tools=ex.tools) for ex in exs]
            outs = []
            for i in range(0, n, 256):
                enc = tok(prompts[i:i + 256], return_tensors="pt", padding=True, padding_side="left",
                          add_special_tokens=False).to(device)
                with torch.no_grad():
                    gen = model.generate(**enc, max_new_tokens=(96 if thinking else 40) + (40 if exs[0].tools else 0))
                outs += tok.batch_decode(gen[:, enc["input_ids"].shape[1]:], skip_special_tokens=False)
            outs = [o.replace("<|endoftext|>", "") for o in outs]
            ok = [o.endswith("<|im_end|>") and o[:-len("<|im_end|>")].split("</think>")[-1].strip() == ex.answer
                  for o, ex in zip(outs, exs)]
            name = f"{task}{' (thinking)' if thinking else ''}"
            results[name] = sum(ok) / n
            log(f"eval {name:20s} {sum(ok):4d}/{n} = {results[name]:.1%}")
            if task in ("recall", "tool_call", "tool_result"):
                for ex, o in list(zip(exs, outs))[:2]:
                    asked = " | ".join(m["content"] for m in ex.messages[:-1] if m["role"] == "user")
                    log(f"  Q: {asked!r}\n  A: {o!r}  (expected {ex.answer!r})")
    return results


# --------------------------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="output checkpoint directory")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps (default 5500, --quick 30)")
    p.add_argument("--seed", type=int, default=0, help="seed of the corpus, the init and the evaluation names")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cuda or cpu")
    p.add_argument("--quick", action="store_true", help="tiny model and data for a CPU smoke test (~1 min)")
    p.add_argument("--batch", type=int, default=None, help="conversations per step (default 256, --quick 16)")
    p.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 300, --quick 5)")
    p.add_argument("--weight-decay", type=float, default=0.1, help="AdamW weight decay on matrices")
    p.add_argument("--vocab", type=int, default=None,
                   help="BPE vocabulary size (default 2000, --quick 512); the model pads it to a multiple of 64")
    p.add_argument("--hidden", type=int, default=None, help="hidden size (default 256, --quick 64)")
    p.add_argument("--layers", type=int, default=None, help="decoder layers (default 6, --quick 2)")
    p.add_argument("--heads", type=int, default=None, help="query heads (default 8, --quick 4)")
    p.add_argument("--kv-heads", type=int, default=2, help="key/value heads (GQA)")
    p.add_argument("--head-dim", type=int, default=None, help="head dim (default 64, --quick 32)")
    p.add_argument("--intermediate", type=int, default=None, help="MLP size (default 768, --quick 128)")
    p.add_argument("--save-dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="dtype of the saved weights")
    p.add_argument("--compile", action="store_true", help="torch.compile the decoder (CUDA; costs ~1 min up front)")
    p.add_argument("--workers", type=int, default=None, help="data worker processes (default: CPUs - 2, up to 8)")
    p.add_argument("--eval", type=int, default=None, help="held-out questions per task (default 256, --quick 8)")
    p.add_argument("--log-every", type=int, default=None, help="print progress every N steps (default 200)")
    args = p.parse_args(argv)
    full = dict(steps=5500, batch=256, warmup=300, vocab=2000, hidden=256, layers=6, heads=8, head_dim=64,
                intermediate=768, eval=256, log_every=200, tok_sample=20000)
    quick = dict(steps=30, batch=16, warmup=5, vocab=512, hidden=64, layers=2, heads=4, head_dim=32,
                 intermediate=128, eval=8, log_every=10, tok_sample=2000)
    for k, v in (quick if args.quick else full).items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
    if args.workers is None:
        args.workers = 0 if args.quick else min(8, max(0, (os.cpu_count() or 1) - 2))
    return args


def build_tokenizer(args, log=print):
    """Fit the BPE on the tokenizer stream; returns it and the fixed training length (covers that sample)."""
    sample = (sample_examples(args.seed, 2, 0, args.tok_sample)
              + sample_examples(args.seed, 2, 1, max(1, args.tok_sample // TOOL_EVERY), task="tool"))
    texts = [render_chat(ex.messages, enable_thinking=ex.enable_thinking, tools=ex.tools) for ex in sample]
    tok = train_tokenizer(texts, args.vocab)
    lengths = np.array([len(e.ids) for e in tok.encode_batch(texts, add_special_tokens=False)])
    tool = np.array([ex.tools is not None for ex in sample])
    max_len = int(min(768, -(-(lengths.max() + 1) // 16) * 16))
    log(f"tokenizer: {tok.get_vocab_size()} tokens; conversation length mean {lengths[~tool].mean():.0f}, max "
        f"{lengths[~tool].max()} (with tools: mean {lengths[tool].mean():.0f}, max {lengths[tool].max()}) -> batches "
        f"padded to their longest, at most {max_len}")
    return tok, max_len


def main(argv=None):
    """Run the whole pipeline; returns the loss curve and the held-out accuracies."""
    args = parse_args(argv)
    device = torch.device(args.device)
    torch.set_float32_matmul_precision("high")
    t0 = time.time()
    torch.manual_seed(args.seed)
    tok, args.max_len = build_tokenizer(args)
    vocab_size = -(-tok.get_vocab_size() // 64) * 64
    from transformers import Qwen3ForCausalLM
    cfg = model_config(args, vocab_size, tok)
    model = Qwen3ForCausalLM(cfg).to(device)
    print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters, hidden {cfg.hidden_size}, "
          f"{cfg.num_hidden_layers} layers, heads {cfg.num_attention_heads}/{cfg.num_key_value_heads} x "
          f"{cfg.head_dim}, mlp {cfg.intermediate_size}, vocab {vocab_size}; {args.steps} steps x {args.batch} "
          f"x {args.max_len} tokens on {device}")
    losses = train(model, tok, args, device)
    print(f"training done in {time.time() - t0:.0f}s")
    export(model, tok, cfg, args.out, args)
    size = sum(f.stat().st_size for f in args.out.iterdir()) / 1e6
    print(f"exported to {args.out} ({size:.1f} MB)")
    res = evaluate(args.out, device, args.seed, args.eval)
    with open(args.out / "README.md", "a") as f:
        f.writelines(f"- {name}: {acc:.1%} of {args.eval}\n" for name, acc in res.items())
    print(f"held-out recall accuracy: {res['recall']:.1%} (thinking off), {res['recall (thinking)']:.1%} "
          f"(thinking on); tool call {res['tool_call']:.1%}, answer from a tool result {res['tool_result']:.1%}, "
          f"no tool needed {res['tool_none']:.1%}; total time {time.time() - t0:.0f}s")
    return {"losses": losses, **res}


if __name__ == "__main__":
    main()
