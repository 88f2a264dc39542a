"""Bad inputs, each answered by a clear one-line error naming the file, field, flag or argument: broken checkpoint
files (config, weights, tokenizer, chat template, generation config), CLI flags, stdin, and the Python API.

The CLI cases run in this process (`cli.main([...])`); those that fail before jax is needed cost milliseconds.
"""

import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

import qwen3_jax as q
from qwen3_jax import cli
from qwen3_jax.tokenizer import Tokenizer

DEMO = q.DEMO_MODEL_DIR
QUESTION = "The capital of Aistonia is Flubarg. What is the capital of Aistonia?"


# ---- broken checkpoints: a copy of the demo model with one file changed -------------------------------------------
@pytest.fixture(scope="module")
def weights_copy(tmp_path_factory) -> Path:
    """One copy of the demo weights for the module's checkpoints to link to (never the package's own file)."""
    path = tmp_path_factory.mktemp("weights") / "model.safetensors"
    shutil.copy(DEMO / "model.safetensors", path)
    return path


def checkpoint(tmp_path: Path, edit, weights: Path) -> Path:
    """The demo model's small files copied, its weights linked to `weights`, then `edit(dir)` applied (edits
    replace a file, never write through the link)."""
    d = tmp_path / "ckpt"
    d.mkdir()
    for f in DEMO.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy(f, d / f.name)
    (d / "model.safetensors").symlink_to(weights)
    edit(d)
    return d


def json_edit(name, change):
    def edit(d):
        data = json.loads((d / name).read_text())
        change(data)
        (d / name).write_text(json.dumps(data))
    return edit


def write(name, text):
    def edit(d):
        (d / name).unlink(missing_ok=True)
        (d / name).write_bytes(text if isinstance(text, bytes) else text.encode())
    return edit


def remove(name):
    return lambda d: (d / name).unlink()


def set_field(name, key, value):
    return json_edit(name, lambda c: c.__setitem__(key, value))


def del_field(name, key):
    return json_edit(name, lambda c: c.pop(key))


def weights_edit(change):
    """Rewrite model.safetensors through torch (the demo weights are bf16, which numpy cannot hold)."""
    def edit(d):
        from safetensors.torch import load_file, save_file

        tensors = load_file(DEMO / "model.safetensors")
        change(tensors)
        (d / "model.safetensors").unlink()
        save_file(tensors, d / "model.safetensors")
    return edit


def _nan(t):
    t["model.norm.weight"][0] = float("nan")


def _set(key, value):
    return lambda t: t.__setitem__(key, value)


def _pop(key):
    return lambda t: t.pop(key)


def _full(*shape_and_value):
    import torch

    *shape, value = shape_and_value
    return torch.full(shape, value, dtype=torch.bfloat16)


def _zeros(*shape):
    import torch

    return torch.zeros(*shape, dtype=torch.bfloat16)


# (id, edit of the checkpoint, what loading it raises, message pattern). Loading = q.load(dir); a text-prompt
# generate where the failure is in the tokenizer or template only at use.
CHECKPOINTS = [
    # config.json
    ("config-missing", remove("config.json"), FileNotFoundError, r"config\.json: no config\.json in the model dir"),
    ("config-not-json", write("config.json", "{oops"), q.ConfigError, r"config\.json: not valid JSON"),
    ("config-list", write("config.json", "[1, 2]"), q.ConfigError, r"config\.json: expected a JSON object"),
    ("config-not-utf8", write("config.json", b"\xff\xfe{}"), q.ConfigError, r"config\.json: not valid JSON"),
    ("config-model-type", set_field("config.json", "model_type", "llama"), q.ConfigError,
     r"config\.json: model_type is 'llama'; this engine runs dense Qwen3"),
    ("config-no-vocab", del_field("config.json", "vocab_size"), q.ConfigError,
     r"config\.json: missing required field\(s\): vocab_size"),
    ("config-hidden-act", set_field("config.json", "hidden_act", "gelu"), q.ConfigError,
     r"hidden_act 'gelu' is not supported"),
    ("config-attention-bias", set_field("config.json", "attention_bias", True), q.ConfigError,
     r"attention_bias=true is not supported"),
    ("config-sliding-window", set_field("config.json", "use_sliding_window", True), q.ConfigError,
     r"use_sliding_window=true is not supported"),
    ("config-kv-heads", set_field("config.json", "num_key_value_heads", 3), q.ConfigError,
     r"num_attention_heads \(8\) must be a multiple of num_key_value_heads \(3\)"),
    ("config-hidden-string", set_field("config.json", "hidden_size", "256"), q.ConfigError,
     r"config field 'hidden_size' must be a positive integer, got '256'"),
    ("config-layers-negative", set_field("config.json", "num_hidden_layers", -1), q.ConfigError,
     r"'num_hidden_layers' must be a positive integer, got -1"),
    ("config-dtype", set_field("config.json", "dtype", "int8"), q.ConfigError, r"unsupported dtype 'int8'"),
    ("config-rope-type", set_field("config.json", "rope_scaling", {"rope_type": "dynamic", "factor": 2.0}),
     q.ConfigError, r"rope scaling type 'dynamic' is not supported"),
    ("config-rms-eps", set_field("config.json", "rms_norm_eps", 0), q.ConfigError, r"rms_norm_eps must be positive"),
    ("config-rope-list", set_field("config.json", "rope_scaling", [1]), q.ConfigError,
     r"rope_parameters / rope_scaling must be objects"),
    ("config-layer-types", set_field("config.json", "layer_types", ["sliding_attention"] * 6), q.ConfigError,
     r"layer_types other than 'full_attention' are not supported"),
    ("config-context-zero", set_field("config.json", "max_position_embeddings", 0), q.ConfigError,
     r"'max_position_embeddings' must be a positive integer, got 0"),
    ("config-eos-string", set_field("config.json", "eos_token_id", "x"), q.ConfigError,
     r"eos_token_id must be a token id or a list of token ids, got 'x'"),
    ("config-rope-theta-string", set_field("config.json", "rope_theta", "big"), q.ConfigError,
     r"rope_theta must be a positive number, got 'big'"),
    ("config-head-dim-undefined", lambda d: (set_field("config.json", "head_dim", None)(d),
                                             set_field("config.json", "num_attention_heads", 3)(d),
                                             set_field("config.json", "num_key_value_heads", 1)(d)),
     q.ConfigError, r"hidden_size \(256\) is not a multiple of num_attention_heads \(3\) and there is no head_dim"),
    # weights
    ("weights-missing", remove("model.safetensors"), FileNotFoundError,
     r"ckpt: no model\.safetensors or model\.safetensors\.index\.json"),
    ("weights-empty-file", write("model.safetensors", b""), q.WeightsError, r"model\.safetensors"),
    ("weights-truncated", write("model.safetensors", (DEMO / "model.safetensors").read_bytes()[:100_000]),
     q.WeightsError, r"model\.safetensors"),
    ("weights-tensor-missing", weights_edit(_pop("model.norm.weight")), q.WeightsError, r"model\.norm\.weight"),
    ("weights-nan", weights_edit(_set("model.norm.weight", _full(256, float("nan")))), q.WeightsError,
     r"model\.safetensors: tensor 'model\.norm\.weight' holds NaN or Inf values"),
    ("weights-inf-in-fused",
     weights_edit(_set("model.layers.2.self_attn.k_proj.weight", _full(128, 256, float("inf")))),
     q.WeightsError, r"tensor 'model\.layers\.2\.self_attn\.k_proj\.weight' holds NaN or Inf values"),
    ("weights-wrong-shape", weights_edit(_set("model.norm.weight", _zeros(255))), q.WeightsError,
     r"model\.norm\.weight"),
    ("weights-more-layers-in-config", set_field("config.json", "num_hidden_layers", 7), q.WeightsError,
     r"model\.layers\.6\."),
    ("weights-vocab-mismatch", set_field("config.json", "vocab_size", 4000), q.WeightsError,
     r"model\.embed_tokens\.weight"),
    ("weights-index-not-json", write("model.safetensors.index.json", "{"), q.WeightsError,
     r"model\.safetensors\.index\.json: not a valid safetensors index"),
    ("weights-index-missing-shard", write("model.safetensors.index.json", json.dumps(
        {"weight_map": {"model.norm.weight": "model-00001-of-00002.safetensors"}})), FileNotFoundError,
     r"model\.safetensors\.index\.json names shard\(s\) that are missing: .*model-00001-of-00002\.safetensors"),
    # tokenizer
    ("tokenizer-json-not-json", write("tokenizer.json", "{"), ValueError,
     r"tokenizer\.json is not a valid `tokenizers` file"),
    ("tokenizer-config-missing", remove("tokenizer_config.json"), FileNotFoundError,
     r"tokenizer_config\.json not found: a Qwen3 checkpoint directory needs tokenizer_config\.json"),
    ("tokenizer-config-not-json", write("tokenizer_config.json", "{oops"), ValueError,
     r"tokenizer_config\.json is not valid JSON"),
    ("tokenizer-config-list", write("tokenizer_config.json", "[]"), ValueError,
     r"tokenizer_config\.json must hold a JSON object, got list"),
    ("tokenizer-eos-number", set_field("tokenizer_config.json", "eos_token", 5), ValueError,
     r"tokenizer_config\.json: eos_token must be a string, null or an object with 'content', got 5"),
    ("tokenizer-added-tokens-list", set_field("tokenizer_config.json", "added_tokens_decoder", [1]), ValueError,
     r"added_tokens_decoder must be an object mapping ids to tokens"),
    ("tokenizer-added-token-id-clash", set_field("tokenizer_config.json", "added_tokens_decoder",
                                                 {"7": {"content": "<|im_end|>"}}), ValueError,
     r"'<\|im_end\|>' has id 7 but tokenizer\.json gives it id"),
    ("tokenizer-template-number", set_field("tokenizer_config.json", "chat_template", 5), ValueError,
     r"tokenizer_config\.json \(chat_template\): must be a string \(a jinja template\), got int"),
    ("tokenizer-template-bad-list", set_field("tokenizer_config.json", "chat_template", [{"name": 1}]), ValueError,
     r"a list of chat templates must hold"),
    ("template-jinja-not-utf8", write("chat_template.jinja", b"\xff{{ x }}"), ValueError,
     r"chat_template\.jinja: the chat template is not UTF-8 text"),
    # generation_config.json
    ("generation-config-not-json", write("generation_config.json", "{oops"), ValueError,
     r"generation_config\.json:? (is )?not valid JSON"),
    ("generation-config-list", write("generation_config.json", "[]"), ValueError,
     r"generation_config\.json must hold a JSON object, got list"),
    ("generation-config-eos-string", set_field("generation_config.json", "eos_token_id", "abc"), ValueError,
     r"generation_config\.json: eos_token_id must be a token id or a list of token ids, got 'abc'"),
    ("generation-config-eos-outside-vocab", set_field("generation_config.json", "eos_token_id", 99999), ValueError,
     r"generation_config\.json: eos_token_id 99999 is outside the vocabulary \[0, 2048\)"),
]


@pytest.mark.parametrize("edit,error,pattern", [c[1:] for c in CHECKPOINTS], ids=[c[0] for c in CHECKPOINTS])
def test_broken_checkpoint_is_named_at_load(tmp_path, weights_copy, edit, error, pattern):
    d = checkpoint(tmp_path, edit, weights_copy)
    with pytest.raises(error, match=pattern):
        q.load(d, kernels="reference")


# Files that load (a tokenizer or template is only needed for text, a sampling default only when used) but fail,
# clearly, when used: (id, edit, what is called on the model, error, pattern).
def _chat(m):
    return q.generate(m, "hi", chat=True, max_new_tokens=2)


def _text(m):
    return q.generate(m, "hi", max_new_tokens=2)


def _sample(m):
    return m.default_sampling()


ON_USE = [
    ("tokenizer-json-missing", remove("tokenizer.json"), _text, ValueError,
     r"ckpt/tokenizer\.json is missing: text prompts need the checkpoint's tokenizer"),
    ("template-syntax-config", set_field("tokenizer_config.json", "chat_template", "{% if %}"), _chat, ValueError,
     r"tokenizer_config\.json \(chat_template\): chat template syntax error at line 1: Expected an expression"),
    ("template-syntax-jinja-file", write("chat_template.jinja", "hello\n{{ messages[0 }}"), _chat, ValueError,
     r"ckpt/chat_template\.jinja: chat template syntax error at line 2"),
    ("template-raise-exception", write("chat_template.jinja", "{{ raise_exception('no users allowed') }}"), _chat,
     ValueError, r"chat_template\.jinja: the chat template failed: no users allowed"),
    ("template-undefined-call", write("chat_template.jinja", "{{ nothing.here() }}"), _chat, ValueError,
     r"chat_template\.jinja: the chat template failed: 'nothing' is undefined"),
    ("template-sandbox", write("chat_template.jinja", "{{ messages.__class__.__subclasses__() }}"), _chat,
     ValueError, r"chat_template\.jinja: the chat template failed: .*unsafe"),
    ("template-type-error", write("chat_template.jinja", "{{ messages[0]['content'] + 5 }}"), _chat, ValueError,
     r"chat_template\.jinja: the chat template failed"),
    ("template-none", del_field("tokenizer_config.json", "chat_template"), _chat, ValueError,
     r"this checkpoint has no chat template \(no 'chat_template' in tokenizer_config\.json"),
    ("template-several-no-default", lambda d: (d / "additional_chat_templates").mkdir() or [
        (d / "additional_chat_templates" / f"{n}.jinja").write_text("x") for n in ("a", "b")], _chat, ValueError,
     r"several chat templates \['a', 'b'\] and none named 'default'"),
    ("generation-config-temperature-string", json_edit("generation_config.json", lambda g: g.update(
        do_sample=True, temperature="hot")), _sample, ValueError,
     r"generation_config\.json: invalid sampling value temperature='hot'"),
    ("generation-config-top-p", json_edit("generation_config.json", lambda g: g.update(do_sample=True, top_p=1.5)),
     _sample, ValueError, r"generation_config\.json: invalid sampling value top_p=1\.5"),
    ("generation-config-top-k", json_edit("generation_config.json", lambda g: g.update(do_sample=True, top_k=-1)),
     _sample, ValueError, r"generation_config\.json: invalid sampling value top_k=-1"),
    ("generation-config-negative-temperature", json_edit("generation_config.json", lambda g: g.update(
        do_sample=True, temperature=-1)), _sample, ValueError,
     r"generation_config\.json: invalid sampling value temperature=-1"),
]


@pytest.mark.parametrize("edit,call,error,pattern", [c[1:] for c in ON_USE], ids=[c[0] for c in ON_USE])
def test_broken_file_is_named_when_used(tmp_path, weights_copy, edit, call, error, pattern):
    model = q.load(checkpoint(tmp_path, edit, weights_copy), kernels="reference")
    with pytest.raises(error, match=pattern):
        call(model)


# ---- the command line ---------------------------------------------------------------------------------------
NO_CACHE = ["--no-compilation-cache"]
# (id, argv, exit status, pattern in stderr). All fail before any weights load.
CLI = [
    ("no-command", [], 2, r"the following arguments are required: COMMAND"),
    ("unknown-command", ["frobnicate"], 2, r"invalid choice: 'frobnicate'"),
    ("unknown-flag", ["generate", "--frob"], 2, r"unrecognized arguments: --frob"),
    ("max-new-tokens-zero", ["generate", "--max-new-tokens", "0"], 2,
     r"argument --max-new-tokens: expected a positive integer, got '0'"),
    ("max-new-tokens-negative", ["generate", "--max-new-tokens", "-5"], 2, r"argument --max-new-tokens"),
    ("max-new-tokens-word", ["generate", "--max-new-tokens", "many"], 2,
     r"argument --max-new-tokens: expected an integer, got 'many'"),
    ("max-new-tokens-float", ["generate", "--max-new-tokens", "2.5"], 2, r"expected an integer, got '2\.5'"),
    ("temperature-negative", ["generate", "--temperature", "-1"], 2,
     r"argument --temperature: must be a number >= 0, got '-1'"),
    ("temperature-nan", ["generate", "--temperature", "nan"], 2, r"expected a finite number, got 'nan'"),
    ("temperature-inf", ["generate", "--temperature", "inf"], 2, r"expected a finite number, got 'inf'"),
    ("temperature-word", ["generate", "--temperature", "hot"], 2, r"expected a number, got 'hot'"),
    ("top-k-negative", ["generate", "--top-k", "-1"], 2, r"argument --top-k: must be an integer in \[0, 2\*\*31\)"),
    ("top-k-float", ["generate", "--top-k", "1.5"], 2, r"argument --top-k: expected an integer"),
    ("top-p-zero", ["generate", "--top-p", "0"], 2, r"argument --top-p: must be in \(0, 1\], got '0'"),
    ("top-p-above-one", ["generate", "--top-p", "1.5"], 2, r"argument --top-p: must be in \(0, 1\]"),
    ("min-p-above-one", ["generate", "--min-p", "2"], 2, r"argument --min-p: must be in \[0, 1\]"),
    ("seed-negative", ["generate", "--seed", "-1"], 2, r"argument --seed: must be an integer in \[0, 2\*\*32\)"),
    ("seed-too-large", ["generate", "--seed", str(2**40)], 2, r"argument --seed: must be an integer in"),
    ("dtype", ["generate", "--dtype", "int8"], 2, r"argument --dtype: invalid choice: 'int8'"),
    ("kernels", ["generate", "--kernels", "triton"], 2, r"argument --kernels: invalid choice: 'triton'"),
    ("quantize", ["generate", "--quantize", "int3"], 2, r"argument --quantize: invalid choice: 'int3'"),
    ("thinking-without-chat", ["generate", "--thinking", "--prompt", "x"], 2,
     r"--thinking needs --chat \(thinking is a switch of the chat template\)"),
    ("no-thinking-without-chat", ["generate", "--no-thinking", "--prompt", "x"], 2, r"--no-thinking needs --chat"),
    ("thinking-and-no-thinking", ["generate", "--chat", "--thinking", "--no-thinking"], 2,
     r"argument --no-thinking: not allowed with argument --thinking"),
    ("greedy-and-temperature", ["generate", "--greedy", "--temperature", "0.7", "--prompt", "x"], 2,
     r"--greedy conflicts with --temperature"),
    ("greedy-and-top-k", ["generate", "--greedy", "--top-k", "5", "--prompt", "x"], 2,
     r"--greedy conflicts with --top-k"),
    ("empty-prompt", ["generate", "--prompt", "   "], 2, r"argument --prompt: empty prompt"),
    ("one-empty-prompt", ["generate", "--prompt", "a", "--prompt", ""], 2,
     r"argument --prompt: prompt 1 of 2 is empty"),
    ("model-missing", ["generate", "--model", "/no/such/dir", "--prompt", "x"], 2,
     r"qwen3-jax: error: model directory not found: /no/such/dir"),
    ("model-is-a-file", ["generate", "--model", str(DEMO / "config.json"), "--prompt", "x"], 2,
     r"config\.json is not a directory: give a Hugging Face checkpoint directory"),
    ("model-without-config", ["generate", "--model", str(Path(__file__).parent), "--prompt", "x"], 2,
     r"tests/config\.json not found: a Qwen3 checkpoint directory needs config\.json"),
    ("cache-flags-together", ["generate", "--compilation-cache", "/tmp/x", "--no-compilation-cache"], 2,
     r"argument --no-compilation-cache: not allowed with argument --compilation-cache"),
    ("decode-steps-zero", ["generate", "--decode-steps", "0"], 2, r"argument --decode-steps: expected a positive"),
    ("chat-decode-steps-zero", ["chat", "--decode-steps", "0"], 2, r"argument --decode-steps"),
    ("chat-model-missing", ["chat", "/no/such/dir"], 2, r"model directory not found: /no/such/dir"),
    ("chat-two-models", ["chat", str(DEMO), str(DEMO)], 2, r"unrecognized arguments"),
    ("chat-greedy-temperature", ["chat", "--greedy", "--temperature", "1"], 2, r"--greedy conflicts with"),
    ("chat-max-model-len-zero", ["chat", "--max-model-len", "0"], 2, r"argument --max-model-len"),
    ("bench-batch-zero", ["bench", "--batch", "0"], 2, r"argument --batch: expected a positive integer"),
    ("bench-prompt-len-word", ["bench", "--prompt-len", "long"], 2, r"argument --prompt-len: expected an integer"),
    ("bench-model-missing", ["bench", "--model", "/no/such/dir"], 2, r"model directory not found"),
    ("tensor-parallel-zero", ["generate", "-tp", "0"], 2, r"argument --tensor-parallel/-tp: must be an integer >= 1"),
    ("devices-words", ["generate", "--devices", "a,b"], 2, r"argument --devices: must be a comma list of device ids"),
    ("tensor-parallel-not-dividing", ["generate", "-tp", "3", "--prompt", "x", *NO_CACHE], 1,
     r"tensor_parallel=3 does not divide num_attention_heads=8"),
    ("devices-too-few", ["generate", "-tp", "2", "--devices", "0", "--prompt", "x", *NO_CACHE], 1,
     r"tensor_parallel=2 but devices lists 1"),
    ("serve-coordinator-alone", ["serve", str(DEMO), "--coordinator", "h:1"], 1,
     r"needs --coordinator, --num-processes and --process-id together"),
    ("serve-process-id-out-of-range", ["serve", str(DEMO), "--coordinator", "h:1", "--num-processes", "2",
                                       "--process-id", "2", "-tp", "2"], 1, r"--process-id 2 is not in 0 \.\. 1"),
    ("serve-processes-without-tp", ["serve", str(DEMO), "--coordinator", "h:1", "--num-processes", "2",
                                    "--process-id", "1"], 1, r"give --tensor-parallel"),
    ("serve-no-model", ["serve"], 2, r"the following arguments are required: model"),
    ("serve-model-missing", ["serve", "/no/such/dir"], 2, r"model directory not found: /no/such/dir"),
    ("prompt-too-long-for-context", ["generate", "--prompt", "x " * 600, "--max-new-tokens", "600", *NO_CACHE], 2,
     r"the prompt has \d+ tokens; with --max-new-tokens 600 that is \d+, beyond the model's context of 1024"),
    ("cache-dir-is-a-file", ["generate", "--prompt", "x", "--compilation-cache", str(DEMO / "config.json")], 2,
     r"--compilation-cache .*config\.json: "),
]


class _Stdin:
    def __init__(self, data: bytes, tty: bool = False):
        self.buffer = io.BytesIO(data)
        self._tty = tty

    def isatty(self):
        return self._tty


@pytest.mark.parametrize("argv,status,pattern", [c[1:] for c in CLI], ids=[c[0] for c in CLI])
def test_cli_usage_errors(monkeypatch, capsys, argv, status, pattern):
    monkeypatch.setattr("sys.stdin", _Stdin(b"", tty=True))
    assert cli.main(argv) == status
    err = capsys.readouterr().err
    assert re.search(pattern, err), err
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1].startswith("qwen3-jax")  # one error line, after argparse's usage


STDIN = [
    ("stdin-terminal", b"", True, r"no prompt: give --prompt TEXT, or pipe text on stdin"),
    ("stdin-not-utf8", b"abc\xff\xfe", False, r"stdin is not UTF-8 text \(byte 0xff at offset 3\)"),
    ("stdin-latin1", "café".encode("latin-1"), False, r"stdin is not UTF-8 text \(byte 0xe9 at offset 3\)"),
    ("stdin-empty", b"", False, r"empty prompt on stdin"),
    ("stdin-whitespace", b" \n\t\n", False, r"empty prompt on stdin"),
]


@pytest.mark.parametrize("data,tty,pattern", [c[1:] for c in STDIN], ids=[c[0] for c in STDIN])
def test_cli_stdin_errors(monkeypatch, capsys, data, tty, pattern):
    monkeypatch.setattr("sys.stdin", _Stdin(data, tty))
    assert cli.main(["generate", *NO_CACHE]) == 2
    err = capsys.readouterr().err
    assert re.search(pattern, err), err
    assert err.count("\n") == 1 and err.startswith("qwen3-jax: error: ")


CLI_CHECKPOINT = [  # (id, edit, argv after the model, status, pattern): failures in the checkpoint's files
    ("cli-template-syntax-before-weights", lambda d: (set_field("tokenizer_config.json", "chat_template",
                                                                 "{% for %}")(d), remove("model.safetensors")(d)),
     ["--chat", "--prompt", "x"], 1, r"tokenizer_config\.json \(chat_template\): chat template syntax error"),
    ("cli-config-broken", write("config.json", "{"), ["--prompt", "x"], 1, r"config\.json: not valid JSON"),
    ("cli-tokenizer-json-missing", remove("tokenizer.json"), ["--prompt", "x"], 2,
     r"tokenizer\.json not found: a Qwen3 checkpoint directory needs tokenizer\.json"),
    ("cli-weights-missing", remove("model.safetensors"), ["--prompt", "x"], 1, r"model\.safetensors"),
    ("cli-generation-config-top-p", json_edit("generation_config.json", lambda g: g.update(do_sample=True, top_p=9)),
     ["--prompt", "x"], 1, r"generation_config\.json: invalid sampling value top_p=9"),
]


@pytest.mark.parametrize("edit,argv,status,pattern", [c[1:] for c in CLI_CHECKPOINT],
                         ids=[c[0] for c in CLI_CHECKPOINT])
def test_cli_broken_checkpoint(tmp_path, capsys, weights_copy, edit, argv, status, pattern):
    d = checkpoint(tmp_path, edit, weights_copy)
    assert cli.main(["generate", "--model", str(d), *NO_CACHE, "--kernels", "reference", *argv]) == status
    err = capsys.readouterr().err
    assert re.search(pattern, err), err
    assert "Traceback" not in err and err.strip().splitlines()[-1].startswith("qwen3-jax: error: ")


def test_cli_debug_shows_the_traceback(capsys):
    with pytest.raises(Exception, match="model directory not found"):
        cli.main(["generate", "--model", "/no/such/dir", "--prompt", "x", "--debug"])


def test_cli_sampling_ranges_agree_with_sampling_params():
    """The CLI checks sampling ranges before jax loads; SamplingParams is the rule: they must agree."""
    cases = {"temperature": ["--temperature", ["0", "0.5", "-0.01", "100"]],
             "top_k": ["--top-k", ["0", "5", "-1", str(2**31 - 1), str(2**31)]],
             "top_p": ["--top-p", ["0", "1e-9", "1", "1.0001"]], "min_p": ["--min-p", ["0", "1", "-0.1", "1.1"]],
             "seed": ["--seed", ["0", str(2**32 - 1), str(2**32), "-1"]]}
    parser = cli.build_parser("generate")
    for field, (flag, values) in cases.items():
        for v in values:
            try:
                parsed = getattr(parser.parse_args(["generate", flag, v]), field)
                cli_ok = True
            except SystemExit:
                cli_ok = False
            try:
                q.SamplingParams(**{field: float(v) if field not in ("top_k", "seed") else int(v)})
                lib_ok = True
            except ValueError:
                lib_ok = False
            assert cli_ok == lib_ok, (flag, v)
            if cli_ok:
                assert parsed == float(v) if field not in ("top_k", "seed") else parsed == int(v)


# ---- the Python API -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model():
    return q.load(DEMO, kernels="reference")


def _gen(**kw):
    return lambda m: q.generate(m, kw.pop("prompts", "hi"), **{"max_new_tokens": 2, **kw})


API = [  # (id, call on the loaded demo model, error, pattern)
    ("generate-prompts-none", lambda m: q.generate(m, None), TypeError,
     r"prompts must be a string, a list of strings, or a list of token-id lists; got NoneType"),
    ("generate-prompts-int", lambda m: q.generate(m, 5), TypeError, r"prompts must be .*; got int"),
    ("generate-prompts-bytes", lambda m: q.generate(m, b"hi"), TypeError, r"prompts must be .*; got bytes"),
    ("generate-prompts-dict", lambda m: q.generate(m, {"prompt": "hi"}), TypeError, r"prompts must be .*; got dict"),
    ("generate-prompts-empty-list", lambda m: q.generate(m, []), ValueError, r"no prompts given"),
    ("generate-float-token-ids", lambda m: q.generate(m, [[1.0, 2.0]]), TypeError,
     r"prompt 0: token ids must be integers, got 1\.0 \(float\)"),
    ("generate-flat-float-ids", lambda m: q.generate(m, [1, 2.5]), TypeError,
     r"prompt 0: token ids must be integers, got 2\.5"),
    ("generate-bool-token-id", lambda m: q.generate(m, [[True, 2]]), TypeError, r"token ids must be integers, got True"),
    ("generate-string-token-ids", lambda m: q.generate(m, [["a", "b"]]), TypeError,
     r"prompt 0: token ids must be integers, got 'a'"),
    ("generate-mixed-text-and-ids", lambda m: q.generate(m, [[1, 2], "hi"]), TypeError,
     r"not a mix of text and token ids \(prompt 1 is text\)"),
    ("generate-prompt-of-none", lambda m: q.generate(m, [[1], None]), TypeError, r"prompt 1 is of type NoneType"),
    ("generate-empty-token-list", lambda m: q.generate(m, [[1, 2], []]), ValueError,
     r"prompt 1 is empty: a prompt needs at least one token"),
    ("generate-empty-text", lambda m: q.generate(m, ""), ValueError, r"prompt 0 is empty"),
    ("generate-token-id-negative", lambda m: q.generate(m, [[-1]], max_new_tokens=2), ValueError,
     r"token id\(s\) outside the vocabulary \[0, 2048\): \[-1\]"),
    ("generate-token-id-too-large", lambda m: q.generate(m, [[5, 2048]], max_new_tokens=2), ValueError,
     r"token id\(s\) outside the vocabulary \[0, 2048\): \[2048\]"),
    ("generate-sampling-dict", _gen(sampling={"temperature": 0.7}), TypeError,
     r"sampling must be a qwen3_jax\.SamplingParams \(e\.g\. SamplingParams\(temperature=0\.7\)\) or None, got dict"),
    ("generate-sampling-string", _gen(sampling="greedy"), TypeError, r"sampling must be .* got str"),
    ("generate-max-new-tokens-zero", _gen(max_new_tokens=0), ValueError,
     r"max_new_tokens must be a positive integer, got 0"),
    ("generate-max-new-tokens-float", _gen(max_new_tokens=2.5), ValueError,
     r"max_new_tokens must be a positive integer, got 2\.5"),
    ("generate-max-new-tokens-string", _gen(max_new_tokens="8"), ValueError,
     r"max_new_tokens must be a positive integer, got '8'"),
    ("generate-max-new-tokens-bool", _gen(max_new_tokens=True), ValueError,
     r"max_new_tokens must be a positive integer, got True"),
    ("generate-max-new-tokens-none", _gen(max_new_tokens=None), ValueError,
     r"max_new_tokens must be a positive integer, got None"),
    ("generate-beyond-context", _gen(max_new_tokens=5000), ValueError,
     r"prompt 0 has 1 tokens; with max_new_tokens=5000 that is 5001 positions, beyond the model's context of 1024"),
    ("generate-enable-thinking-string", _gen(chat=True, enable_thinking="no"), TypeError,
     r"enable_thinking must be True, False or None, got 'no'"),
    ("generate-enable-thinking-without-chat", _gen(enable_thinking=False), ValueError,
     r"enable_thinking applies to chat prompts: pass chat=True as well"),
    ("generate-chat-string", _gen(chat="yes"), TypeError, r"chat must be True or False, got 'yes'"),
    ("generate-chat-with-token-ids", _gen(prompts=[[1, 2]], chat=True), ValueError,
     r"chat=True needs text prompts, not token ids"),
    ("generate-on-text-not-callable", _gen(on_text="print"), TypeError,
     r"on_text must be a function \(row, text\) or None, got str"),
    ("generate-chunk-zero", _gen(chunk=0), ValueError, r"chunk must be a positive integer, got 0"),
    ("generate-not-a-model", lambda m: q.generate(str(DEMO), "hi"), TypeError,
     r"generate's first argument must be a model from qwen3_jax\.load\(\.\.\.\), got str"),
    ("chat-prompt-thinking-string", lambda m: m.chat_prompt("hi", enable_thinking="no"), TypeError,
     r"enable_thinking must be True, False or None, got 'no'"),
    ("default-sampling-bad-override", lambda m: m.default_sampling(top_p=2.0), ValueError,
     r"^invalid sampling value top_p=2\.0"),
    # the tokenizer
    ("encode-none", lambda m: m.tokenizer.encode(None), TypeError, r"encode takes text \(a str\), got NoneType"),
    ("encode-bytes", lambda m: m.tokenizer.encode(b"hi"), TypeError, r"encode takes text \(a str\), got bytes"),
    ("decode-float", lambda m: m.tokenizer.decode([1.5]), TypeError, r"token ids must be integers, got 1\.5 \(float\)"),
    ("decode-negative", lambda m: m.tokenizer.decode([-1]), ValueError, r"token ids must be non-negative.*\[-1\]"),
    ("decode-string", lambda m: m.tokenizer.decode("abc"), TypeError,
     r"token ids must be an integer or a list of integers, got str"),
    ("decode-none", lambda m: m.tokenizer.decode(None), TypeError, r"got NoneType"),
    ("stream-decoder-string", lambda m: m.tokenizer.stream_decoder().add(["a"]), TypeError,
     r"token ids must be integers, got 'a'"),
    ("template-messages-string", lambda m: m.tokenizer.apply_chat_template("hi"), TypeError,
     r"messages must be a list of \{'role': \.\.\., 'content': \.\.\.\} dicts, got str"),
    ("template-messages-empty", lambda m: m.tokenizer.apply_chat_template([]), ValueError,
     r"cannot apply the chat template to an empty conversation"),
    ("template-message-not-dict", lambda m: m.chat_prompt(["hi"]), TypeError,
     r"chat message 0 must be a dict like \{'role': 'user', 'content': 'Hi'\}, got 'hi'"),
    ("template-message-no-role", lambda m: m.chat_prompt([{"content": "hi"}]), ValueError,
     r"chat message 0: 'role' must be one of system, user, assistant, tool; got None"),
    ("template-message-bad-role", lambda m: m.chat_prompt([{"role": "wizard", "content": "hi"}]), ValueError,
     r"'role' must be one of .*; got 'wizard'"),
    ("template-message-content-int", lambda m: m.chat_prompt([{"role": "user", "content": 5}]), TypeError,
     r"chat message 0: 'content' must be a string, got int"),
    # SamplingParams, EngineOptions, LLM (checked by their own modules)
    ("sampling-temperature-negative", lambda m: q.SamplingParams(temperature=-1), ValueError,
     r"invalid sampling value temperature=-1"),
    ("sampling-top-p-zero", lambda m: q.SamplingParams(top_p=0), ValueError, r"invalid sampling value top_p=0"),
    ("sampling-top-k-float", lambda m: q.SamplingParams(top_k=1.5), ValueError, r"invalid sampling value top_k=1\.5"),
    ("sampling-seed-too-large", lambda m: q.SamplingParams(seed=2**40), ValueError, r"invalid sampling value seed="),
    ("sampling-max-tokens-zero", lambda m: q.SamplingParams(max_tokens=0), ValueError,
     r"invalid sampling value max_tokens=0"),
    ("sampling-stop-ids-string", lambda m: q.SamplingParams(stop_token_ids="abc"), ValueError,
     r"invalid sampling value stop_token_ids='abc'"),
    ("sampling-top-k-huge", lambda m: q.SamplingParams(top_k=10**12), ValueError,
     r"invalid sampling value top_k=1000000000000: must be an integer in \[0, 2\*\*31\)"),
    ("sampling-logprobs-too-many", lambda m: q.SamplingParams(logprobs=100), ValueError,
     r"invalid sampling value logprobs=100"),
    ("engine-decode-steps-zero", lambda m: q.EngineOptions(decode_steps=0), ValueError,
     r"engine option decode_steps must be a positive integer, got 0"),
    ("engine-unknown-option", lambda m: q.LLM(m, max_num_seq=4), TypeError,
     r"unknown engine option\(s\) 'max_num_seq'; EngineOptions has: max_model_len, max_num_seqs"),
    ("engine-memory-bool", lambda m: q.EngineOptions(gpu_memory_utilization=True), ValueError,
     r"gpu_memory_utilization must be in \(0, 1\], got True"),
    ("llm-prompts-none", lambda m: q.LLM(m, num_blocks=4, precompile=False).generate(None), TypeError,
     r"prompts must be a string, a list of token ids, or a list of such prompts; got None"),
    ("load-bad-kernels", lambda m: q.load(DEMO, kernels="triton"), ValueError,
     r"kernels must be 'auto', 'pallas' or 'reference', got 'triton'"),
    ("load-bad-dtype", lambda m: q.load(DEMO, dtype="fp16"), q.ConfigError, r"unsupported dtype 'fp16'"),
    ("load-missing-dir", lambda m: q.load("/no/such/model"), FileNotFoundError,
     r"model directory not found: /no/such/model"),
]


@pytest.mark.parametrize("call,error,pattern", [c[1:] for c in API], ids=[c[0] for c in API])
def test_python_api_errors(model, call, error, pattern):
    with pytest.raises(error, match=pattern):
        call(model)


def test_numpy_integers_are_accepted(model):
    out = q.generate(model, np.array([[5, 6, 7]]), max_new_tokens=np.int64(2),
                     sampling=q.SamplingParams(temperature=0), chunk=np.int32(2))
    assert len(out.tokens[0]) <= 2 and out.stats.new_tokens == len(out.tokens[0])
    assert model.tokenizer.decode(np.array([5, 6])) == model.tokenizer.decode([5, 6])


def test_at_least_100_bad_inputs():
    total = len(CHECKPOINTS) + len(ON_USE) + len(CLI) + len(STDIN) + len(CLI_CHECKPOINT) + len(API)
    assert total >= 100, total
