"""Named chat templates for models that ship none, and the lookup the config uses.

Without configuration a model's own template (tokenizer_config.json / chat_template.jinja) is
used; these are for checkpoints without one (or to override it), selected per model with ``chat_template = "<name>"`` or a path to a
``.jinja`` file. Each template is Jinja2 written for transformers' ``apply_chat_template``
(sandboxed environment, ``trim_blocks``/``lstrip_blocks``, ``raise_exception``, ``tojson``,
``strftime_now``); every line controls its own whitespace so the output does not depend on those
settings. Template variables read besides ``messages``/``tools``/``add_generation_prompt``:
``enable_thinking`` (qwen, deepseek), ``reasoning_effort`` and ``model_identity`` (gpt-oss),
``date_string`` (llama3, gpt-oss).

Imported by the daemon's config (so: stdlib and ``errors`` only, no jinja2, transformers or mlx)
and by workers. Messages a template cannot represent (unknown roles, image parts, a tool result
it cannot attribute) raise through ``raise_exception`` instead of being dropped.
"""

from __future__ import annotations

from pathlib import Path

from .errors import InvalidRequest

__all__ = ["NAMES", "TOOL_FORMAT", "TOOL_CALL_TAGS", "TemplateNotFound", "named_template",
           "template_source"]


class TemplateNotFound(InvalidRequest, ValueError):
    """An unknown template name or a missing template file. A ValueError too, so config loading
    (which reports ValueErrors as config errors) and request handling (400) both catch it."""


# Macros every template starts with. Content may be a string, missing/None (transformers drops
# None-valued keys before rendering) or a list of parts whose text parts are joined with "" as
# mlx_lm.server does; any other part cannot be shown to a text model, so it is an error.
_MACROS = r"""
{%- macro text_of(content, role) -%}
{%- if content is undefined or content is none -%}
{%- elif content is string -%}
{{- content -}}
{%- elif content is mapping -%}
{{- raise_exception('the content of a ' ~ role ~ ' message must be a string or a list of parts') -}}
{%- else -%}
{%- for part in content -%}
{%- if part is string -%}
{{- part -}}
{%- elif part is mapping and part.type == 'text' -%}
{{- part.text if part.text is defined else '' -}}
{%- else -%}
{{- raise_exception('this chat template renders text only, but a ' ~ role ~ ' message has a '
    ~ (part.type if part is mapping and part.type is defined else 'non-text') ~ ' part') -}}
{%- endif -%}
{%- endfor -%}
{%- endif -%}
{%- endmacro -%}
{%- macro args_of(arguments) -%}
{%- if arguments is undefined or arguments is none -%}
{{- '{}' -}}
{%- elif arguments is string -%}
{{- (arguments | trim) or '{}' -}}
{%- elif arguments is mapping -%}
{{- arguments | tojson -}}
{%- else -%}
{{- raise_exception('tool call arguments must be a JSON object or a string holding one') -}}
{%- endif -%}
{%- endmacro -%}
{%- macro call_name(tool_call) -%}
{%- set tool_call = tool_call.function if tool_call.function is defined else tool_call -%}
{%- if tool_call.name is not defined or not tool_call.name -%}
{{- raise_exception('an assistant tool call has no function name') -}}
{%- endif -%}
{{- tool_call.name -}}
{%- endmacro -%}
{%- macro call_args(tool_call) -%}
{%- set tool_call = tool_call.function if tool_call.function is defined else tool_call -%}
{{- args_of(tool_call.arguments) -}}
{%- endmacro -%}
{%- macro hermes_calls(tool_calls, after_text) -%}
{%- for tool_call in tool_calls -%}
{%- if not loop.first or after_text -%}{{- '\n' -}}{%- endif -%}
{{- '<tool_call>\n{"name": "' ~ call_name(tool_call) ~ '", "arguments": '
    ~ call_args(tool_call) ~ '}\n</tool_call>' -}}
{%- endfor -%}
{%- endmacro -%}
{%- macro result_name(message, calls) -%}
{%- if message.name is defined and message.name -%}
{{- message.name -}}
{%- elif message.tool_call_id is defined -%}
{%- for c in calls -%}
{%- if c.id is defined and c.id == message.tool_call_id -%}
{{- call_name(c) -}}
{%- endif -%}
{%- endfor -%}
{%- elif calls | length == 1 -%}
{{- call_name(calls[0]) -}}
{%- endif -%}
{%- endmacro -%}
{%- macro fn_of(tool) -%}
{{- (tool.function if tool.function is defined else tool) | tojson -}}
{%- endmacro -%}
{%- macro bad_role(message, family) -%}
{{- raise_exception('the ' ~ family ~ ' chat template cannot render a message with role "'
    ~ (message.role if message.role is defined else '') ~ '"') -}}
{%- endmacro -%}
{%- set ns = namespace(calls=[], last_user=-1) -%}
{%- for message in messages -%}
{%- if message.role == 'user' -%}{%- set ns.last_user = loop.index0 -%}{%- endif -%}
{%- endfor -%}
"""

# ChatML as Hermes 2 Pro uses it: <|im_start|>ROLE\nTEXT<|im_end|>\n. Tools are JSON lines in
# <tools></tools> in the system turn; the model answers with one
# <tool_call>\n{"name": ..., "arguments": {...}}\n</tool_call> block per call; results come back
# in a `tool` turn as <tool_response>\n{"name": ..., "content": ...}\n</tool_response>.
# No thinking switch.
_CHATML = r"""
{%- set first = messages[0] if messages else none -%}
{%- set has_system = first is not none and first.role in ['system', 'developer'] -%}
{%- if has_system or tools -%}
{{- '<|im_start|>system\n' -}}
{%- if has_system -%}{{- text_of(first.content, 'system') -}}{%- endif -%}
{%- if tools -%}
{%- if has_system -%}{{- '\n\n' -}}{%- endif -%}
{{- 'You are a function-calling assistant. The functions you may call are described, one JSON'
    ' schema a line, inside <tools></tools>:\n<tools>' -}}
{%- for tool in tools -%}{{- '\n' ~ (tool | tojson) -}}{%- endfor -%}
{{- '\n</tools>\nDo not guess values the user has not given. For each call, answer with a JSON'
    ' object inside <tool_call></tool_call> tags:\n<tool_call>\n'
    '{"name": <function-name>, "arguments": <arguments-object>}\n</tool_call>' -}}
{%- endif -%}
{{- '<|im_end|>\n' -}}
{%- endif -%}
{%- for message in messages -%}
{%- if loop.first and has_system -%}
{%- elif message.role in ['system', 'developer', 'user'] -%}
{{- '<|im_start|>' ~ ('user' if message.role == 'user' else 'system') ~ '\n'
    ~ text_of(message.content, message.role) ~ '<|im_end|>\n' -}}
{%- elif message.role == 'assistant' -%}
{{- '<|im_start|>assistant\n' ~ text_of(message.content, 'assistant') -}}
{%- if message.tool_calls is defined and message.tool_calls -%}
{%- set ns.calls = message.tool_calls -%}
{{- hermes_calls(message.tool_calls, message.content is defined and message.content) -}}
{%- endif -%}
{{- '<|im_end|>\n' -}}
{%- elif message.role == 'tool' -%}
{%- set name = result_name(message, ns.calls) -%}
{{- '<|im_start|>tool\n<tool_response>\n' -}}
{%- if name -%}
{{- '{"name": ' ~ (name | tojson) ~ ', "content": ' ~ (text_of(message.content, 'tool') | tojson) ~ '}' -}}
{%- else -%}
{{- text_of(message.content, 'tool') -}}
{%- endif -%}
{{- '\n</tool_response><|im_end|>\n' -}}
{%- else -%}
{{- bad_role(message, 'chatml') -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\n' -}}{%- endif -%}
"""

# Qwen3 (ChatML with Qwen's conventions). Tools: a "# Tools" section with JSON lines in
# <tools></tools> in the system turn; calls are <tool_call>\n{"name": ..., "arguments": ...}
# \n</tool_call>; consecutive tool results are grouped into one user turn as
# <tool_response>\n...\n</tool_response> blocks. Reasoning (`reasoning_content`) is kept as
# <think>\n...\n</think>\n\n only for assistant turns after the last user message (the ongoing
# tool loop). enable_thinking=false pre-fills an empty <think>\n\n</think>\n\n block, as Qwen3's
# hybrid models were trained to read as "answer directly".
_QWEN = r"""
{%- set first = messages[0] if messages else none -%}
{%- set has_system = first is not none and first.role in ['system', 'developer'] -%}
{%- if tools -%}
{{- '<|im_start|>system\n' -}}
{%- if has_system -%}{{- text_of(first.content, 'system') ~ '\n\n' -}}{%- endif -%}
{{- '# Tools\n\nYou may call one or more functions to help with the user query.\n\n'
    'The function signatures are inside <tools></tools> XML tags:\n<tools>' -}}
{%- for tool in tools -%}{{- '\n' ~ (tool | tojson) -}}{%- endfor -%}
{{- '\n</tools>\n\nFor each function call, return a JSON object with the function name and'
    ' arguments inside <tool_call></tool_call> XML tags:\n<tool_call>\n'
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n' -}}
{%- elif has_system -%}
{{- '<|im_start|>system\n' ~ text_of(first.content, 'system') ~ '<|im_end|>\n' -}}
{%- endif -%}
{%- for message in messages -%}
{%- if loop.first and has_system -%}
{%- elif message.role in ['system', 'developer', 'user'] -%}
{{- '<|im_start|>' ~ ('user' if message.role == 'user' else 'system') ~ '\n'
    ~ text_of(message.content, message.role) ~ '<|im_end|>\n' -}}
{%- elif message.role == 'assistant' -%}
{%- set content = text_of(message.content, 'assistant') -%}
{%- set reasoning = message.reasoning_content if message.reasoning_content is defined else '' -%}
{%- if '</think>' in content -%}
{%- set reasoning = reasoning or content.split('</think>')[0].split('<think>')[-1] -%}
{%- set content = content.split('</think>')[-1] -%}
{%- endif -%}
{{- '<|im_start|>assistant\n' -}}
{%- if loop.index0 > ns.last_user and reasoning -%}
{{- '<think>\n' ~ (reasoning | trim) ~ '\n</think>\n\n' -}}
{%- endif -%}
{{- content | trim -}}
{%- if message.tool_calls is defined and message.tool_calls -%}
{{- hermes_calls(message.tool_calls, content | trim) -}}
{%- endif -%}
{{- '<|im_end|>\n' -}}
{%- elif message.role == 'tool' -%}
{%- if loop.first or loop.previtem.role != 'tool' -%}{{- '<|im_start|>user' -}}{%- endif -%}
{{- '\n<tool_response>\n' ~ text_of(message.content, 'tool') ~ '\n</tool_response>' -}}
{%- if loop.last or loop.nextitem.role != 'tool' -%}{{- '<|im_end|>\n' -}}{%- endif -%}
{%- else -%}
{{- bad_role(message, 'qwen') -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<|im_start|>assistant\n' -}}
{%- if enable_thinking is defined and enable_thinking is false -%}
{{- '<think>\n\n</think>\n\n' -}}
{%- endif -%}
{%- endif -%}
"""

# Llama 3 / 3.1: <|begin_of_text|><|start_header_id|>ROLE<|end_header_id|>\n\nTEXT<|eot_id|>.
# With tools (3.1 JSON tool calling): the system turn opens with "Environment: ipython" and the
# knowledge/today dates, then the instructions and each function as indented JSON; the model
# answers with a bare {"name": ..., "parameters": {...}} object (several joined by "; ");
# results come back in an `ipython` turn. No thinking switch.
_LLAMA3 = r"""
{%- set first = messages[0] if messages else none -%}
{%- set has_system = first is not none and first.role in ['system', 'developer'] -%}
{{- '<|begin_of_text|>' -}}
{%- if has_system or tools -%}
{{- '<|start_header_id|>system<|end_header_id|>\n\n' -}}
{%- if tools -%}
{%- if date_string is not defined -%}
{%- set date_string = strftime_now('%d %b %Y') if strftime_now is defined else '26 Jul 2024' -%}
{%- endif -%}
{{- 'Environment: ipython\nCutting Knowledge Date: December 2023\nToday Date: '
    ~ date_string ~ '\n\n' -}}
{%- endif -%}
{%- if has_system -%}{{- text_of(first.content, 'system') -}}{%- endif -%}
{%- if tools -%}
{%- if has_system -%}{{- '\n\n' -}}{%- endif -%}
{{- 'You have access to the functions below. To call one, respond only with a JSON object of'
    ' the form {"name": function name, "parameters": dictionary of argument name and its'
    ' value}. Do not use variables.' -}}
{%- for tool in tools -%}{{- '\n\n' ~ (tool | tojson(indent=4)) -}}{%- endfor -%}
{%- endif -%}
{{- '<|eot_id|>' -}}
{%- endif -%}
{%- for message in messages -%}
{%- if loop.first and has_system -%}
{%- elif message.role in ['system', 'developer', 'user'] -%}
{{- '<|start_header_id|>' ~ ('user' if message.role == 'user' else 'system')
    ~ '<|end_header_id|>\n\n' ~ text_of(message.content, message.role) ~ '<|eot_id|>' -}}
{%- elif message.role == 'assistant' -%}
{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
{%- if message.tool_calls is defined and message.tool_calls -%}
{%- if message.content is defined and message.content -%}
{{- text_of(message.content, 'assistant') ~ '\n' -}}
{%- endif -%}
{%- for tool_call in message.tool_calls -%}
{%- if not loop.first -%}{{- '; ' -}}{%- endif -%}
{{- '{"name": "' ~ call_name(tool_call) ~ '", "parameters": ' ~ call_args(tool_call) ~ '}' -}}
{%- endfor -%}
{%- else -%}
{{- text_of(message.content, 'assistant') -}}
{%- endif -%}
{{- '<|eot_id|>' -}}
{%- elif message.role == 'tool' -%}
{{- '<|start_header_id|>ipython<|end_header_id|>\n\n' ~ text_of(message.content, 'tool')
    ~ '<|eot_id|>' -}}
{%- else -%}
{{- bad_role(message, 'llama3') -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}{%- endif -%}
"""

# Phi-4-mini: <|system|>TEXT<|end|><|user|>TEXT<|end|><|assistant|>TEXT<|end|>. Tools: a JSON
# array of the function objects between <|tool|> and <|/tool|> inside the system turn; calls are
# one JSON array <|tool_call|>[{"name": ..., "arguments": {...}}, ...]<|/tool_call|>; a result
# is a <|tool|>TEXT<|end|> turn. No thinking switch.
_PHI4 = r"""
{%- set first = messages[0] if messages else none -%}
{%- set has_system = first is not none and first.role in ['system', 'developer'] -%}
{%- if has_system or tools -%}
{{- '<|system|>' -}}
{%- if has_system -%}
{{- text_of(first.content, 'system') -}}
{%- else -%}
{{- 'You are a helpful assistant with some tools.' -}}
{%- endif -%}
{%- if tools -%}
{{- '<|tool|>[' -}}
{%- for tool in tools -%}{%- if not loop.first -%}{{- ', ' -}}{%- endif -%}{{- fn_of(tool) -}}{%- endfor -%}
{{- ']<|/tool|>' -}}
{%- endif -%}
{{- '<|end|>' -}}
{%- endif -%}
{%- for message in messages -%}
{%- if loop.first and has_system -%}
{%- elif message.role in ['system', 'developer', 'user'] -%}
{{- '<|' ~ ('user' if message.role == 'user' else 'system') ~ '|>'
    ~ text_of(message.content, message.role) ~ '<|end|>' -}}
{%- elif message.role == 'assistant' -%}
{{- '<|assistant|>' ~ text_of(message.content, 'assistant') -}}
{%- if message.tool_calls is defined and message.tool_calls -%}
{{- '<|tool_call|>[' -}}
{%- for tool_call in message.tool_calls -%}
{%- if not loop.first -%}{{- ', ' -}}{%- endif -%}
{{- '{"name": "' ~ call_name(tool_call) ~ '", "arguments": ' ~ call_args(tool_call) ~ '}' -}}
{%- endfor -%}
{{- ']<|/tool_call|>' -}}
{%- endif -%}
{{- '<|end|>' -}}
{%- elif message.role == 'tool' -%}
{{- '<|tool|>' ~ text_of(message.content, 'tool') ~ '<|end|>' -}}
{%- else -%}
{{- bad_role(message, 'phi4') -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|assistant|>' -}}{%- endif -%}
"""

# DeepSeek V3 / R1: <｜begin▁of▁sentence｜>SYSTEM<｜User｜>TEXT<｜Assistant｜>TEXT<｜end▁of▁sentence｜>
# (system text has no marker, so it must come first). Calls:
# <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME\n```json\nARGS\n```
# <｜tool▁call▁end｜>...<｜tool▁calls▁end｜>; consecutive results are grouped in
# <｜tool▁outputs▁begin｜><｜tool▁output▁begin｜>TEXT<｜tool▁output▁end｜>...<｜tool▁outputs▁end｜>.
# Earlier reasoning is dropped (R1 convention). The generation prompt opens <think>\n (R1), or
# closes it with </think> when enable_thinking is false (V3.1's non-thinking mode).
_DEEPSEEK = r"""
{%- set sys = namespace(text='', done=false) -%}
{%- for message in messages -%}
{%- if message.role in ['system', 'developer'] -%}
{%- if sys.done -%}
{{- raise_exception('the deepseek chat template can only render system messages at the start'
    ' of the conversation') -}}
{%- endif -%}
{%- set sys.text = sys.text ~ ('\n\n' if sys.text else '') ~ text_of(message.content, 'system') -%}
{%- else -%}
{%- set sys.done = true -%}
{%- endif -%}
{%- endfor -%}
{{- '<｜begin▁of▁sentence｜>' ~ sys.text -}}
{%- if tools -%}
{%- if sys.text -%}{{- '\n\n' -}}{%- endif -%}
{{- '## Tools\n\nYou can call the functions below.' -}}
{%- for tool in tools -%}
{%- set f = tool.function if tool.function is defined else tool -%}
{{- '\n\n### ' ~ f.name ~ '\nDescription: ' ~ (f.description if f.description is defined else '')
    ~ '\nParameters: ' ~ ((f.parameters if f.parameters is defined else {}) | tojson) -}}
{%- endfor -%}
{{- '\n\nTo call functions, reply in exactly this format:\n'
    '<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>FUNCTION_NAME\n```json\n'
    'ARGUMENTS_AS_JSON\n```<｜tool▁call▁end｜><｜tool▁calls▁end｜>' -}}
{%- endif -%}
{%- for message in messages -%}
{%- if message.role in ['system', 'developer'] -%}
{%- elif message.role == 'user' -%}
{{- '<｜User｜>' ~ text_of(message.content, 'user') -}}
{%- elif message.role == 'assistant' -%}
{%- set content = text_of(message.content, 'assistant') -%}
{%- if '</think>' in content -%}{%- set content = content.split('</think>')[-1] -%}{%- endif -%}
{{- '<｜Assistant｜>' ~ (content | trim) -}}
{%- if message.tool_calls is defined and message.tool_calls -%}
{{- '<｜tool▁calls▁begin｜>' -}}
{%- for tool_call in message.tool_calls -%}
{%- if not loop.first -%}{{- '\n' -}}{%- endif -%}
{{- '<｜tool▁call▁begin｜>function<｜tool▁sep｜>' ~ call_name(tool_call) ~ '\n```json\n'
    ~ call_args(tool_call) ~ '\n```<｜tool▁call▁end｜>' -}}
{%- endfor -%}
{{- '<｜tool▁calls▁end｜>' -}}
{%- endif -%}
{{- '<｜end▁of▁sentence｜>' -}}
{%- elif message.role == 'tool' -%}
{%- if loop.first or loop.previtem.role != 'tool' -%}{{- '<｜tool▁outputs▁begin｜>' -}}{%- else -%}{{- '\n' -}}{%- endif -%}
{{- '<｜tool▁output▁begin｜>' ~ text_of(message.content, 'tool') ~ '<｜tool▁output▁end｜>' -}}
{%- if loop.last or loop.nextitem.role != 'tool' -%}{{- '<｜tool▁outputs▁end｜>' -}}{%- endif -%}
{%- else -%}
{{- bad_role(message, 'deepseek') -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
{{- '<｜Assistant｜>' -}}
{%- if enable_thinking is defined and enable_thinking is false -%}
{{- '</think>' -}}
{%- else -%}
{{- '<think>\n' -}}
{%- endif -%}
{%- endif -%}
"""

# gpt-oss (OpenAI harmony): <|start|>ROLE<|channel|>CHANNEL<|message|>TEXT<|end|>. A system
# message carries identity, dates, "Reasoning: low|medium|high" (reasoning_effort) and the valid
# channels; the user's system/developer text and the tools go in a developer message as
# "# Instructions" and "# Tools / ## functions / namespace functions { type f = (_: {...}) => any;
# }" TypeScript-style declarations. A call is <|start|>assistant<|channel|>commentary
# to=functions.NAME <|constrain|>json<|message|>ARGS<|call|>; a result is
# <|start|>functions.NAME to=assistant<|channel|>commentary<|message|>TEXT<|end|>; answers are on
# the final channel, reasoning on analysis (kept only after the last user message).
_GPT_OSS = r"""
{%- macro ts_join(items) -%}
{%- for sub in items -%}{%- if not loop.first -%}{{- ' | ' -}}{%- endif -%}{{- ts_type(sub) -}}{%- endfor -%}
{%- endmacro -%}
{%- macro ts_type(s) -%}
{%- if s is not mapping -%}{{- 'any' -}}
{%- elif s.enum is defined -%}
{%- for v in s.enum -%}{%- if not loop.first -%}{{- ' | ' -}}{%- endif -%}{{- v | tojson -}}{%- endfor -%}
{%- elif s.anyOf is defined -%}{{- ts_join(s.anyOf) -}}
{%- elif s.oneOf is defined -%}{{- ts_join(s.oneOf) -}}
{%- elif s.type is defined and s.type is not string -%}
{%- for t in s.type -%}{%- if not loop.first -%}{{- ' | ' -}}{%- endif -%}{{- ts_type(dict(s, type=t)) -}}{%- endfor -%}
{%- elif s.type == 'string' -%}{{- 'string' -}}
{%- elif s.type in ['number', 'integer'] -%}{{- 'number' -}}
{%- elif s.type == 'boolean' -%}{{- 'boolean' -}}
{%- elif s.type == 'null' -%}{{- 'null' -}}
{%- elif s.type == 'array' -%}
{%- set inner = ts_type(s['items']) if s['items'] is defined else 'any' -%}
{{- ('(' ~ inner ~ ')' if ' | ' in inner else inner) ~ '[]' -}}
{%- elif s.type == 'object' and s.properties is defined and s.properties -%}
{{- '{\n' ~ ts_props(s) ~ '}' -}}
{%- elif s.type == 'object' -%}{{- 'object' -}}
{%- else -%}{{- 'any' -}}
{%- endif -%}
{%- endmacro -%}
{%- macro ts_props(s) -%}
{%- set required = s.required if s.required is defined else [] -%}
{%- for name, prop in s.properties | items -%}
{%- if prop is mapping and prop.description is defined and prop.description -%}
{{- '// ' ~ (prop.description | replace('\n', '\n// ')) ~ '\n' -}}
{%- endif -%}
{{- name ~ ('' if name in required else '?') ~ ': ' ~ ts_type(prop) ~ ',' -}}
{%- if prop is mapping and prop.default is defined -%}{{- ' // default: ' ~ (prop.default | tojson) -}}{%- endif -%}
{{- '\n' -}}
{%- endfor -%}
{%- endmacro -%}
{%- set effort = reasoning_effort if reasoning_effort is defined and reasoning_effort else 'medium' -%}
{%- if effort not in ['low', 'medium', 'high'] -%}
{{- raise_exception('reasoning_effort must be low, medium or high for gpt-oss, not ' ~ effort) -}}
{%- endif -%}
{%- if date_string is not defined -%}
{%- set date_string = strftime_now('%Y-%m-%d') if strftime_now is defined else '2025-06-28' -%}
{%- endif -%}
{{- '<|start|>system<|message|>'
    ~ (model_identity if model_identity is defined else
       'You are ChatGPT, a large language model trained by OpenAI.')
    ~ '\nKnowledge cutoff: 2024-06\nCurrent date: ' ~ date_string
    ~ '\n\nReasoning: ' ~ effort
    ~ '\n\n# Valid channels: analysis, commentary, final. Channel must be included for every message.' -}}
{%- if tools -%}{{- "\nCalls to these tools must go to the commentary channel: 'functions'." -}}{%- endif -%}
{{- '<|end|>' -}}
{%- set dev = namespace(text='', done=false) -%}
{%- for message in messages -%}
{%- if message.role in ['system', 'developer'] -%}
{%- if dev.done -%}
{{- raise_exception('the gpt-oss chat template can only render system/developer messages at'
    ' the start of the conversation') -}}
{%- endif -%}
{%- set dev.text = dev.text ~ ('\n\n' if dev.text else '') ~ text_of(message.content, message.role) -%}
{%- else -%}
{%- set dev.done = true -%}
{%- endif -%}
{%- endfor -%}
{%- if dev.text or tools -%}
{{- '<|start|>developer<|message|>' -}}
{%- if dev.text -%}{{- '# Instructions\n\n' ~ dev.text -}}{%- endif -%}
{%- if tools -%}
{%- if dev.text -%}{{- '\n\n' -}}{%- endif -%}
{{- '# Tools\n\n## functions\n\nnamespace functions {\n\n' -}}
{%- for tool in tools -%}
{%- set f = tool.function if tool.function is defined else tool -%}
{%- if f.description is defined and f.description -%}
{{- '// ' ~ (f.description | replace('\n', '\n// ')) ~ '\n' -}}
{%- endif -%}
{%- if f.parameters is defined and f.parameters.properties is defined and f.parameters.properties -%}
{{- 'type ' ~ f.name ~ ' = (_: {\n' ~ ts_props(f.parameters) ~ '}) => any;\n\n' -}}
{%- else -%}
{{- 'type ' ~ f.name ~ ' = () => any;\n\n' -}}
{%- endif -%}
{%- endfor -%}
{{- '} // namespace functions' -}}
{%- endif -%}
{{- '<|end|>' -}}
{%- endif -%}
{%- for message in messages -%}
{%- if message.role in ['system', 'developer'] -%}
{%- elif message.role == 'user' -%}
{{- '<|start|>user<|message|>' ~ text_of(message.content, 'user') ~ '<|end|>' -}}
{%- elif message.role == 'assistant' -%}
{%- set thinking = message.thinking if message.thinking is defined else
    (message.reasoning_content if message.reasoning_content is defined else '') -%}
{%- if thinking and loop.index0 > ns.last_user -%}
{{- '<|start|>assistant<|channel|>analysis<|message|>' ~ thinking ~ '<|end|>' -}}
{%- endif -%}
{%- set content = text_of(message.content, 'assistant') -%}
{%- if message.tool_calls is defined and message.tool_calls -%}
{%- set ns.calls = message.tool_calls -%}
{%- if content -%}
{{- '<|start|>assistant<|channel|>commentary<|message|>' ~ content ~ '<|end|>' -}}
{%- endif -%}
{%- for tool_call in message.tool_calls -%}
{{- '<|start|>assistant<|channel|>commentary to=functions.' ~ call_name(tool_call)
    ~ ' <|constrain|>json<|message|>' ~ call_args(tool_call) ~ '<|call|>' -}}
{%- endfor -%}
{%- else -%}
{{- '<|start|>assistant<|channel|>final<|message|>' ~ content ~ '<|end|>' -}}
{%- endif -%}
{%- elif message.role == 'tool' -%}
{%- set name = result_name(message, ns.calls) -%}
{%- if not name -%}
{{- raise_exception('the gpt-oss chat template needs the function name of every tool result:'
    ' give the tool message a tool_call_id matching an earlier tool call, or a name') -}}
{%- endif -%}
{{- '<|start|>functions.' ~ name ~ ' to=assistant<|channel|>commentary<|message|>'
    ~ text_of(message.content, 'tool') ~ '<|end|>' -}}
{%- else -%}
{{- bad_role(message, 'gpt-oss') -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|start|>assistant' -}}{%- endif -%}
"""

# Generic: plain "### System:", "### User:", "### Assistant:", "### Tool Result (NAME):" headers,
# each followed by its text and a blank line, for base or lightly tuned models without any chat
# markup. Tools: a "## Tools" part of the system section with one JSON object a line; calls are
# <tool_call>\n{"name": ..., "arguments": ...}\n</tool_call> blocks (the Hermes shape, which
# most models imitate best). No thinking switch.
_GENERIC = r"""
{%- set first = messages[0] if messages else none -%}
{%- set has_system = first is not none and first.role in ['system', 'developer'] -%}
{%- if has_system or tools -%}
{{- '### System:\n' -}}
{%- if has_system -%}{{- text_of(first.content, 'system') -}}{%- endif -%}
{%- if tools -%}
{%- if has_system -%}{{- '\n\n' -}}{%- endif -%}
{{- '## Tools\nYou can call the tools below. Each is described by a JSON object on its own line:' -}}
{%- for tool in tools -%}{{- '\n' ~ (tool | tojson) -}}{%- endfor -%}
{{- '\n\nTo call a tool, reply with one block per call:\n<tool_call>\n'
    '{"name": "<tool name>", "arguments": {<arguments as JSON>}}\n</tool_call>' -}}
{%- endif -%}
{{- '\n\n' -}}
{%- endif -%}
{%- for message in messages -%}
{%- if loop.first and has_system -%}
{%- elif message.role in ['system', 'developer', 'user'] -%}
{{- '### ' ~ ('User' if message.role == 'user' else 'System') ~ ':\n'
    ~ text_of(message.content, message.role) ~ '\n\n' -}}
{%- elif message.role == 'assistant' -%}
{{- '### Assistant:\n' ~ text_of(message.content, 'assistant') -}}
{%- if message.tool_calls is defined and message.tool_calls -%}
{%- set ns.calls = message.tool_calls -%}
{{- hermes_calls(message.tool_calls, message.content is defined and message.content) -}}
{%- endif -%}
{{- '\n\n' -}}
{%- elif message.role == 'tool' -%}
{%- set name = result_name(message, ns.calls) -%}
{{- '### Tool Result' ~ (' (' ~ name ~ ')' if name else '') ~ ':\n'
    ~ text_of(message.content, 'tool') ~ '\n\n' -}}
{%- else -%}
{{- bad_role(message, 'generic') -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '### Assistant:\n' -}}{%- endif -%}
"""

_BODIES: dict[str, str] = {
    "llama3": _LLAMA3,
    "qwen": _QWEN,
    "chatml": _CHATML,
    "phi4": _PHI4,
    "deepseek": _DEEPSEEK,
    "gpt-oss": _GPT_OSS,
    "generic": _GENERIC,
}

NAMES: tuple[str, ...] = tuple(_BODIES)

# The tool-call output format a model prompted with each template is expected to produce, for
# the output parser (names as toolcalls.format_by_name knows them where one fits). hermes:
# <tool_call>{"name", "arguments"}</tool_call> blocks; llama3_json: a bare {"name", "parameters"}
# object (several joined by "; "); harmony: commentary-channel messages to=functions.NAME.
# Two families write calls no listed format describes: phi4, a JSON array of {"name",
# "arguments"} (mistral's payload) between <|tool_call|> and <|/tool_call|>; deepseek_v3,
# DeepSeek's tool-call tokens with a fenced JSON body per call (see TOOL_CALL_TAGS).
TOOL_FORMAT: dict[str, str] = {
    "llama3": "llama3_json",
    "qwen": "hermes",
    "chatml": "hermes",
    "phi4": "phi4",
    "deepseek": "deepseek_v3",
    "gpt-oss": "harmony",
    "generic": "hermes",
}

# The literal text that opens and closes a tool call in each template's output ("" where the
# format has no marker: llama3's calls are bare JSON, harmony's are whole channel messages).
TOOL_CALL_TAGS: dict[str, tuple[str, str]] = {
    "llama3": ("", ""),
    "qwen": ("<tool_call>", "</tool_call>"),
    "chatml": ("<tool_call>", "</tool_call>"),
    "phi4": ("<|tool_call|>", "<|/tool_call|>"),
    "deepseek": ("<｜tool▁calls▁begin｜>", "<｜tool▁calls▁end｜>"),
    "gpt-oss": ("", ""),
    "generic": ("<tool_call>", "</tool_call>"),
}


def named_template(name: str) -> str:
    """The Jinja source of the template called `name`; TemplateNotFound (a 400 InvalidRequest
    and a ValueError) naming the valid names otherwise."""
    body = _BODIES.get(name)
    if body is None:
        raise TemplateNotFound(f"unknown chat template {name!r}; the named templates are "
                               f"{', '.join(NAMES)}, or give the path of a .jinja file",
                               param="chat_template")
    return (_MACROS + body).strip()


def template_source(value: str, base_dir: Path | None = None) -> str:
    """The template a config's `chat_template` value means: a name from NAMES, or the path of
    a Jinja file (relative paths are taken from `base_dir`, the config file's directory)."""
    if value in _BODIES:
        return named_template(value)
    path = Path(value).expanduser()
    if base_dir is not None and not path.is_absolute():
        path = base_dir / path
    if path.is_file():
        return path.read_text(encoding="utf-8")
    if path.suffix in (".jinja", ".j2") or "/" in value:
        raise TemplateNotFound(f"chat template file not found: {path}", param="chat_template")
    return named_template(value)
