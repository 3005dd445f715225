"""Chat templates chosen per model (a named template or a .jinja file) for models without
one, and request variables for the template (chat_template_kwargs, reasoning_effort)."""

from __future__ import annotations

import json
from pathlib import Path

import openai
import pytest

from mlxrouter.templates import named_template

ASK = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
FILE_TEMPLATE = (
    "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    "{% if reasoning_effort %}effort: {{ reasoning_effort }}\n{% endif %}"
    "{% if mood %}mood: {{ mood }}\n{% endif %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)


@pytest.fixture(scope="module")
def bare_model(tmp_path_factory, tiny_model: Path) -> Path:
    """The tiny model without a chat template of its own."""
    import shutil

    path = tmp_path_factory.mktemp("bare") / "bare"
    shutil.copytree(tiny_model, path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    (path / "chat_template.jinja").unlink(missing_ok=True)
    (path / "chat_template.json").unlink(missing_ok=True)
    return path


def _prompt_tokens(daemon, model: str, **extra) -> int:
    resp = daemon.openai().chat.completions.create(model=model, messages=ASK, max_tokens=1,
                                                   temperature=0, **extra)
    return resp.usage.prompt_tokens


def test_a_model_without_a_template_gets_a_named_one(start_daemon, bare_model):
    from mlx_lm.tokenizer_utils import load as load_tokenizer

    daemon = start_daemon({"bare": {"path": str(bare_model)},
                           "chatml": {"path": str(bare_model), "chat_template": "chatml"}})
    with pytest.raises(openai.BadRequestError) as info:
        _prompt_tokens(daemon, "bare")
    assert "no chat template" in info.value.body["message"]
    tok = load_tokenizer(bare_model)
    rendered = tok.apply_chat_template(ASK, add_generation_prompt=True, tokenize=False,
                                       chat_template=named_template("chatml"))
    assert rendered.endswith("<|im_start|>assistant\n")
    assert _prompt_tokens(daemon, "chatml") == len(tok.encode(rendered,
                                                              add_special_tokens=False))


def test_template_variables_reach_a_template_file(start_daemon, bare_model, tmp_path):
    template = tmp_path / "mine.jinja"
    template.write_text(FILE_TEMPLATE)
    daemon = start_daemon({"mine": {"path": str(bare_model), "chat_template": str(template)}})
    base = _prompt_tokens(daemon, "mine")
    moody = _prompt_tokens(daemon, "mine", extra_body={
        "chat_template_kwargs": {"mood": "the quick brown fox jumps over the lazy dog"}})
    effort = _prompt_tokens(daemon, "mine", reasoning_effort="high")
    assert moody > base + 5
    assert effort > base


def test_reserved_template_variables_are_a_400(start_daemon, bare_model, tmp_path):
    template = tmp_path / "mine.jinja"
    template.write_text(FILE_TEMPLATE)
    daemon = start_daemon({"mine": {"path": str(bare_model), "chat_template": str(template)}})
    with pytest.raises(openai.BadRequestError) as info:
        _prompt_tokens(daemon, "mine", extra_body={
            "chat_template_kwargs": {"add_generation_prompt": False}})
    assert info.value.body["param"] == "chat_template_kwargs"
    assert "add_generation_prompt" in info.value.body["message"]


def test_a_template_file_that_does_not_parse_fails_the_load_naming_it(start_daemon, bare_model,
                                                                       tmp_path):
    """Every request to it was a 400 "the model's chat template rejected the messages":
    the client was blamed for the server's file."""
    template = tmp_path / "broken.jinja"
    template.write_text("{% for m in messages %}{{ m.content }\n")
    daemon = start_daemon({"broken": {"path": str(bare_model), "chat_template": str(template)}})
    resp = daemon.http.post("/v1/chat/completions", json={
        "model": "broken", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
    assert resp.status_code == 503, resp.text
    error = resp.json()["error"]
    assert error["code"] == "model_load_failed"
    assert f"chat_template {template} does not parse" in error["message"]


def test_variables_transformers_takes_for_itself_are_a_400(start_daemon, bare_model, tmp_path):
    template = tmp_path / "mine.jinja"
    template.write_text(FILE_TEMPLATE)
    daemon = start_daemon({"mine": {"path": str(bare_model), "chat_template": str(template)}})
    for name in ("sanitize_control_tokens", "conversations"):
        with pytest.raises(openai.BadRequestError) as info:
            _prompt_tokens(daemon, "mine", extra_body={"chat_template_kwargs": {name: True}})
        assert info.value.body["param"] == "chat_template_kwargs" and name in (
            info.value.body["message"])


def test_an_unknown_template_name_is_a_config_error(tmp_path, bare_model):
    import subprocess
    import sys

    from conftest import write_config

    config = write_config(tmp_path, models={"x": {"path": str(bare_model),
                                                  "chat_template": "no-such-template"}})
    out = subprocess.run([sys.executable, "-m", "mlxrouter", "serve", "--config", str(config)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "no-such-template" in out.stderr and "chatml" in out.stderr


TOOL_TURN = [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [{
        "id": "c1", "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "c1", "content": "11C"},
]
WEATHER = [{"type": "function", "function": {
    "name": "get_weather",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]


def test_an_assistant_turn_with_null_content_renders(start_daemon, bare_model, tmp_path):
    """The SDK's tool loop sends the call turn back with content null; a template that adds
    message['content'] to a string (SmolLM2's) rejected it: "has no attribute 'content'"."""
    template = tmp_path / "concat.jinja"
    template.write_text("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + "
                        "m['content'] + '<|im_end|>\\n' }}{% endfor %}"
                        "{% if add_generation_prompt %}<|im_start|>assistant\\n{% endif %}")
    daemon = start_daemon({"concat": {"path": str(bare_model), "chat_template": str(template)}})
    client = daemon.openai()
    for messages in (TOOL_TURN, [*TOOL_TURN[:1], {"role": "assistant", "content": None},
                                 {"role": "user", "content": "and?"}]):
        resp = client.chat.completions.create(model="concat", messages=messages, max_tokens=1)
        assert resp.choices[0].finish_reason == "length"


def test_reasoning_in_the_history_reaches_templates_that_keep_it(start_daemon, bare_model):
    """The answers' reasoning_content, sent back in the tool loop, was dropped as an unknown
    field: the qwen template never saw it."""
    daemon = start_daemon({"qwen": {"path": str(bare_model), "chat_template": "qwen"}})
    client = daemon.openai()
    reasoning = "I will look up the weather in Paris with the tool, then answer briefly."
    with_it = [TOOL_TURN[0], {**TOOL_TURN[1], "reasoning_content": reasoning}, TOOL_TURN[2]]
    plain = client.chat.completions.create(model="qwen", messages=TOOL_TURN, tools=WEATHER,
                                           max_tokens=1).usage.prompt_tokens
    kept = client.chat.completions.create(model="qwen", messages=with_it, tools=WEATHER,
                                          max_tokens=1).usage.prompt_tokens
    assert kept > plain + 10
