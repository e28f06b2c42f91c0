"""models/decoder/tokenizer.py: the decoder families' tokenizer and chat format, from the checkpoint's own template.

Each family is a folder with a tiny byte-level BPE made here with the `tokenizers` library (the family's
special tokens added), its eos ids in config.json and generation_config.json as the family's releases have
them, and a chat template that writes the family's published format (the sources are cited at each).
References, independent of tuneport's code: transformers' apply_chat_template on the same folder, run on
messages written here in the form each template reads, then transformers' fast tokenizer of the folder's
tokenizer.json; and, for the loss mask, the reply strings written out by hand from the published formats.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
from tokenizers.trainers import BpeTrainer
from transformers import PreTrainedTokenizerFast

from tuneport.core.data import to_messages
from tuneport.models import CheckpointError
from tuneport.models.decoder.tokenizer import check_vocabulary, load_tokenizer

# Qwen/Qwen2.5-7B-Instruct tokenizer_config.json chat_template, verbatim (as tests/test_qwen2.py has it).
QWEN25 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\\n\\n# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}
    {%- else %}
        {{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\\n<tool_call>\\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\\n<tool_response>\\n' }}
        {{- message.content }}
        {{- '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
{%- endif %}
"""
# Qwen/Qwen3-8B tokenizer_config.json chat_template, the branches these conversations take: Qwen2.5's ChatML
# and tool blocks, and an empty think block on an assistant turn after the last user query when it is the last.
QWEN3 = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}{{- messages[0].content + '\\n\\n' }}{%- endif %}
    {{- "# Tools\\n\\nYou may call one or more functions to assist with the user query.\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>" }}
    {%- for tool in tools %}{{- "\\n" }}{{- tool | tojson }}{%- endfor %}
    {{- "\\n</tools>\\n\\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\\n<tool_call>\\n{\\"name\\": <function-name>, \\"arguments\\": <args-json-object>}\\n</tool_call><|im_end|>\\n" }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(last_query_index=messages|length - 1) %}
{%- for message in messages %}{%- if message.role == "user" %}{%- set ns.last_query_index = loop.index0 %}{%- endif %}{%- endfor %}
{%- for message in messages %}
    {%- if message.role == "user" or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- elif message.role == "assistant" %}
        {%- if loop.index0 > ns.last_query_index and loop.last %}
            {{- '<|im_start|>assistant\\n<think>\\n\\n</think>\\n\\n' + message.content }}
        {%- else %}
            {{- '<|im_start|>assistant\\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if (loop.first and message.content) or (not loop.first) %}{{- '\\n' }}{%- endif %}
            {%- if tool_call.function %}{%- set tool_call = tool_call.function %}{%- endif %}
            {{- '<tool_call>\\n{"name": "' + tool_call.name + '", "arguments": ' + tool_call.arguments | tojson + '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}{{- '<|im_start|>user' }}{%- endif %}
        {{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}{{- '<|im_end|>\\n' }}{%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"""
# meta-llama/Llama-3.1-8B-Instruct tokenizer_config.json chat_template, the branches taken here (custom tools in
# the first user message, a JSON tool call with "parameters", a tool result as `ipython`, tojson'd).
LLAMA31 = """{{- bos_token }}
{%- if messages[0].role == 'system' %}{%- set system_message = messages[0].content | trim %}{%- set messages = messages[1:] %}{%- else %}{%- set system_message = "" %}{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}{{- "Environment: ipython\\n" }}{%- endif %}
{{- "Cutting Knowledge Date: December 2023\\nToday Date: 26 Jul 2024\\n\\n" + system_message + "<|eot_id|>" }}
{%- if tools is not none %}
    {%- set first_user_message = messages[0].content | trim %}{%- set messages = messages[1:] %}
    {{- '<|start_header_id|>user<|end_header_id|>\\n\\n' }}
    {{- "Given the following functions, please respond with a JSON for a function call with its proper arguments that best answers the given prompt.\\n\\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.Do not use variables.\\n\\n' }}
    {%- for t in tools %}{{- t | tojson(indent=4) + "\\n\\n" }}{%- endfor %}
    {{- first_user_message + "<|eot_id|>" }}
{%- endif %}
{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' + message.content | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n{"name": "' + tool_call.name + '", "parameters": ' + tool_call.arguments | tojson + '}<|eot_id|>' }}
    {%- else %}
        {{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + message.content | tojson + '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"""
# THUDM/GLM-4-32B-0414 chat_template.jinja (the same in GLM-4-9B-0414): no end-of-turn token, the next
# header ends a reply; a tool call is `<|assistant|>name\n{arguments}`, a result an `<|observation|>` turn.
GLM4 = """[gMASK]<sop>
{%- if tools -%}
<|system|>
# 可用工具
{% for tool in tools %}
    {%- set function = tool.function if tool.get("function") else tool %}

## {{ function.name }}

{{ function | tojson(indent=4, ensure_ascii=False) }}
在调用上述函数时，请使用 Json 格式表示调用的参数。
{%- endfor %}
{%- endif -%}

{%- for msg in messages %}
    {%- if msg.role == 'system' %}
<|system|>
{{ msg.content }}
    {%- endif %}
{%- endfor %}

{%- for message in messages if message.role != 'system' %}
    {%- set role = message['role'] %}
    {%- set content = message['content'] %}
    {%- set meta = message.get("metadata", "") %}

    {%- if role == 'user' %}
<|user|>
{{ content }}
    {%- elif role == 'assistant' and not meta %}
<|assistant|>
{{ content }}
    {%- elif role == 'assistant' and meta %}
<|assistant|>{{ meta }}
{{ content }}
    {%- elif role == 'observation' %}
<|observation|>
{{ content }}
    {%- endif %}
{%- endfor %}
{% if add_generation_prompt %}<|assistant|>{% endif %}"""
# mistralai/Mistral-7B-Instruct-v0.3 tokenizer_config.json chat_template (tool use), the branches taken here:
# tools before the last user turn, `[TOOL_CALLS]` with 9-character ids, `[TOOL_RESULTS]`, the system message
# put into the last user turn, replies closed by `</s>`.
MISTRAL = """{%- if messages[0]["role"] == "system" %}{%- set system_message = messages[0]["content"] %}{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}
{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is not none and (message == user_messages[-1]) %}
            {{- "[AVAILABLE_TOOLS] [" }}
            {%- for tool in tools %}
                {%- set tool = tool.function %}
                {{- '{"type": "function", "function": {' }}
                {%- for key, val in tool.items() if key != "return" %}
                    {%- if val is string %}{{- '"' + key + '": "' + val + '"' }}{%- else %}{{- '"' + key + '": ' + val|tojson }}{%- endif %}
                    {%- if not loop.last %}{{- ", " }}{%- endif %}
                {%- endfor %}
                {{- "}}" }}
                {%- if not loop.last %}{{- ", " }}{%- else %}{{- "]" }}{%- endif %}
            {%- endfor %}
            {{- "[/AVAILABLE_TOOLS]" }}
        {%- endif %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\\n\\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message.tool_calls is defined and message.tool_calls is not none %}
        {{- "[TOOL_CALLS] [" }}
        {%- for tool_call in message.tool_calls %}
            {%- set out = tool_call.function|tojson %}
            {{- out[:-1] }}
            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}
                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
            {%- endif %}
            {{- ', "id": "' + tool_call.id + '"}' }}
            {%- if not loop.last %}{{- ", " }}{%- else %}{{- "]" + eos_token }}{%- endif %}
        {%- endfor %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- elif message["role"] == "tool_results" or message["role"] == "tool" %}
        {{- '[TOOL_RESULTS] {"content": ' + message.content|string + ", " }}
        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}
            {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
        {%- endif %}
        {{- '"call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}"""
# google/gemma-3-4b-it chat_template (text content): the system prompt opens the first user turn, roles must
# alternate (so no tool turns: Gemma's template has no tool calls), `model` for the assistant.
GEMMA3 = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}{%- set role = "model" -%}{%- else -%}{%- set role = message['role'] -%}{%- endif -%}
    {{ '<start_of_turn>' + role + '\\n' + (first_user_prefix if loop.first else "") }}
    {{- message['content'] | trim -}}
    {{ '<end_of_turn>\\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}{{ '<start_of_turn>model\\n' }}{%- endif -%}"""

# Per family: template, special tokens, other added tokens, tokenizer_config tokens, generation_config
# eos_token_id (the releases': Qwen2.5/Qwen3 [151645, 151643], Llama 3.1 [128001, 128008, 128009], GLM-4-0414
# [151329, 151336, 151338], Mistral v0.3 2, Gemma 3 [1, 106]), by name here.
QWEN_TOKENS = (["<|endoftext|>", "<|im_start|>", "<|im_end|>"], ["<tool_call>", "</tool_call>", "<think>", "</think>"],
               {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}, ["<|im_end|>", "<|endoftext|>"])
FAMILIES = {
    "qwen2.5": (QWEN25, *QWEN_TOKENS),
    "qwen3": (QWEN3, *QWEN_TOKENS),
    "llama3.1": (LLAMA31, ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                           "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"], [],
                 {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
                 ["<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"]),
    "glm4": (GLM4, ["<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                    "<|assistant|>", "<|observation|>"], [],
             {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"},
             ["<|endoftext|>", "<|user|>", "<|observation|>"]),
    "mistral": (MISTRAL, ["<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]",
                          "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"], [],
                {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, "</s>"),
    "gemma3": (GEMMA3, ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"], [],
               {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"}, ["<eos>", "<end_of_turn>"]),
}
CORPUS = ["What is the weather like in Beijing today? It is sunny and 25 degrees.",
          '{"name": "get_weather", "arguments": {"city": "Beijing"}, "parameters": {"type": "object"}}',
          "You may call one or more functions to assist with the user query.", "你是一个名为 ChatGLM 的人工智能助手。",
          "Hello! How can I help?"]


def write_folder(folder: Path, family: str, template: bool = True, generation_config: bool = True) -> Path:
    """A checkpoint folder's tokenizer files (tokenizer.json, tokenizer_config.json) and its eos ids."""
    chat_template, specials, added, tokens, stops = FAMILIES[family]
    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.train_from_iterator(CORPUS, BpeTrainer(vocab_size=320, special_tokens=specials,
                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in added])
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **tokens}
    config.update({"chat_template": chat_template} if template else {})
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    ids = [tok.token_to_id(t) for t in stops] if isinstance(stops, list) else tok.token_to_id(stops)
    model_type = {"qwen2.5": "qwen2", "llama3.1": "llama", "gemma3": "gemma3_text"}.get(family, family)
    (folder / "config.json").write_text(json.dumps({"model_type": model_type, "eos_token_id": ids}))
    if generation_config:
        (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": ids}))
    return folder


TOOL = {"name": "get_weather", "description": "Get the weather of a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
CALL = {"name": "get_weather", "arguments": {"city": "Beijing"}}
QUERY, RESULT = "What is the weather like in Beijing today?", '{"temperature": 25}'
ANSWER = "It is sunny and 25 degrees."


def conversation(system="You are a weather bot.") -> list[dict]:
    """tuneport's messages: a tool call (plain form), its result (observation) and the answer."""
    return [{"role": "system", "content": system, "tools": [TOOL]}, {"role": "user", "content": QUERY},
            {"role": "assistant", "content": "", "tool_calls": [CALL]}, {"role": "observation", "content": RESULT},
            {"role": "assistant", "content": ANSWER}]


def template_messages(family: str) -> list[dict]:
    """The same conversation written by hand in the form the family's template reads (OpenAI's or GLM-4's)."""
    if family == "glm4":
        call = {"role": "assistant", "metadata": "get_weather", "content": '{"city": "Beijing"}'}
        result = {"role": "observation", "content": RESULT}
    else:
        call = {"role": "assistant", "content": "",
                "tool_calls": [{"type": "function", "id": "call00001", "function": CALL}]}
        result = {"role": "tool", "content": RESULT, "tool_call_id": "call00001"}
    system = [] if family == "mistral" else [{"role": "system", "content": "You are a weather bot."}]
    return [*system, {"role": "user", "content": QUERY}, call, result, {"role": "assistant", "content": ANSWER}]


CHAT = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": QUERY},
        {"role": "assistant", "content": ANSWER}]
QWEN_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Beijing"}}\n</tool_call><|im_end|>'
# What each family's published format has the model write: the replies and their end-of-turn tokens.
REPLIES = {
    "qwen2.5": [QWEN_CALL, ANSWER + "<|im_end|>"],
    "qwen3": [QWEN_CALL, "<think>\n\n</think>\n\n" + ANSWER + "<|im_end|>"],
    "llama3.1": ['{"name": "get_weather", "parameters": {"city": "Beijing"}}<|eot_id|>', ANSWER + "<|eot_id|>"],
    "glm4": ['get_weather\n{"city": "Beijing"}<|observation|>', "\n" + ANSWER + "<|endoftext|>"],
    "mistral": ['[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Beijing"}, "id": "call00001"}]</s>',
                " " + ANSWER + "</s>"],
    "gemma3": ["Hello! How can I help?<end_of_turn>", ANSWER + "<end_of_turn>"],
}


def labelled(tokenizer, labels: list[int]) -> list[str]:
    """The text of each run of tokens that carries loss."""
    runs, run = [], []
    for label in [*labels, -100]:
        if label != -100:
            run.append(label)
        elif run:
            runs, run = runs + [tokenizer.decode(run)], []
    return runs


@pytest.mark.parametrize("family", FAMILIES)
def test_only_the_assistant_replies_carry_loss_and_the_ids_are_transformers(tmp_path, family):
    folder = write_folder(tmp_path, family)
    ours, theirs = load_tokenizer(folder), PreTrainedTokenizerFast.from_pretrained(folder)
    tokens = FAMILIES[family][4]
    assert ours.stop_token_ids == ours.convert_tokens_to_ids(tokens if isinstance(tokens, list) else [tokens])
    assert ours.padding_side == "left" and ours.pad_token == (FAMILIES[family][3].get("pad_token") or ours.eos_token)
    if family == "gemma3":  # no tool turns in Gemma's template (test_gemma_has_no_tool_calls_and_says_so)
        messages, expected, tools = CHAT, CHAT, None
    else:  # Mistral's system message rides on the last user turn (test_a_template_that_renders_earlier_...)
        messages = conversation(None if family == "mistral" else "You are a weather bot.")
        expected, tools = template_messages(family), [{"type": "function", "function": TOOL}]
    ids, labels = ours.encode_conversation(messages, 10_000, 0)
    assert labelled(ours, labels) == REPLIES[family]
    text = theirs.apply_chat_template(expected, tools=tools, tokenize=False)
    eos = ours.eos_token if family == "glm4" else ""  # GLM-4 writes nothing after the last reply
    assert ids == theirs(text + eos, add_special_tokens=False)["input_ids"]
    prompt = theirs.apply_chat_template(expected[:-1], tools=tools, tokenize=False, add_generation_prompt=True)
    role = "user" if family == "gemma3" else "observation"
    inputs = ours.build_chat_input(messages[-2]["content"], history=messages[:-2], role=role)
    assert inputs["input_ids"][0].tolist() == theirs(prompt, add_special_tokens=False)["input_ids"]
    assert inputs["attention_mask"].shape == inputs["input_ids"].shape
    short, short_labels = ours.encode_conversation(messages, 5, 3)
    assert (short, short_labels) == (ids[:9], labels[:9])


def test_gemma_has_no_tool_calls_and_says_so(tmp_path):
    tokenizer = load_tokenizer(write_folder(tmp_path, "gemma3"))
    with pytest.raises(ValueError, match=r"^message 1 carries tools, but the chat template never reads `tools`; "):
        tokenizer.encode_conversation(conversation(), 100, 100)
    with pytest.raises(ValueError, match=r"^message 2: a tool call, but the chat template renders none "):
        tokenizer.encode_conversation(conversation()[1:], 100, 100)
    with pytest.raises(ValueError, match=r"^the chat template cannot render this conversation: Conversation roles"):
        tokenizer.encode_conversation(CHAT[:2] + CHAT[1:], 100, 100)


def test_a_template_without_end_of_turn_tokens_gets_the_eos_appended_or_is_refused(tmp_path):
    # ChatML without <|im_end|>: a reply is followed by no stop token (<|im_end|>, <|endoftext|>).
    plain = tmp_path / "plain.jinja"
    plain.write_text("{% for m in messages %}{{ '<|im_start|>' + m.role + '\\n' + m.content + '\\n' }}{% endfor %}"
                     "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    folder = write_folder(tmp_path / "qwen", "qwen2.5")
    chatml, without = load_tokenizer(folder), load_tokenizer(folder, template=plain)
    one = CHAT[:3]
    assert labelled(chatml, chatml.encode_conversation(one, 100, 100)[1]) == ["Hello! How can I help?<|im_end|>"]
    assert labelled(without, without.encode_conversation(one, 100, 100)[1]) == ["Hello! How can I help?\n<|im_end|>"]
    with pytest.raises(ValueError, match=r"^message 3: the chat template writes no stop token \(<\|im_end\|>, "
                                         r"<\|endoftext\|>\) after this assistant reply"):
        without.encode_conversation(CHAT, 100, 100)


def test_a_template_that_renders_earlier_turns_by_what_follows_is_refused(tmp_path):
    # Mistral v0.3 puts the system message into the LAST user turn: the prompt for reply 1 is not F's prefix.
    tokenizer = load_tokenizer(write_folder(tmp_path, "mistral"))
    with pytest.raises(ValueError, match=r"^message 3: the chat template renders the turns before this assistant "
                                         "reply differently depending on what follows"):
        tokenizer.encode_conversation(CHAT, 100, 100)


def test_the_template_comes_from_the_folder_or_the_recipe(tmp_path):
    bare = write_folder(tmp_path / "bare", "qwen2.5", template=False, generation_config=False)
    with pytest.raises(CheckpointError) as e:
        load_tokenizer(bare)
    assert str(e.value) == (f"{bare}: has no chat_template (tokenizer_config.json or chat_template.jinja); name one "
                            "in the recipe: data.template: FILE.jinja")
    file = tmp_path / "qwen25.jinja"
    file.write_text(QWEN25)
    reference = load_tokenizer(write_folder(tmp_path / "qwen", "qwen2.5")).encode_conversation(conversation(), 99, 99)
    given = load_tokenizer(bare / "tokenizer.json", template=file)
    assert given.chat_template == QWEN25 and given.encode_conversation(conversation(), 99, 99) == reference
    assert given.stop_token_ids == given.convert_tokens_to_ids(["<|im_end|>", "<|endoftext|>"])  # config.json's
    check_vocabulary(given, SimpleNamespace(vocab_size=len(given)), bare, bare)
    with pytest.raises(CheckpointError, match=rf"^{bare}: the tokenizer has {len(given)} tokens but the model"):
        check_vocabulary(given, SimpleNamespace(vocab_size=len(given) - 1), bare, bare)
    (bare / "chat_template.jinja").write_text(QWEN25)  # transformers reads it too
    assert load_tokenizer(bare).encode_conversation(conversation(), 99, 99) == reference
    file.write_text("{% for m in messages %}{{ m.content }")
    with pytest.raises(CheckpointError, match=rf"^{file}: chat template line 1: unexpected '}}'"):
        load_tokenizer(bare, template=file)
    with pytest.raises(CheckpointError, match=rf"^{tmp_path / 'none.jinja'}: cannot read the chat template"):
        load_tokenizer(bare, template=tmp_path / "none.jinja")
    with pytest.raises(CheckpointError, match=rf"^{tmp_path}: no tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{}")
    with pytest.raises(CheckpointError, match=rf"^{tmp_path / 'tokenizer.json'}: transformers' fast tokenizer cannot "
                                              "load it \\(KeyError: 'added_tokens'\\)$"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer_config.json").write_text("{")
    with pytest.raises(CheckpointError, match=rf"^{tmp_path / 'tokenizer_config.json'}: line 1: invalid JSON"):
        load_tokenizer(tmp_path)


def test_chatglm3_tool_calls_and_observations_are_converted(tmp_path):
    record = {"tools": [TOOL], "conversations": [
        {"role": "user", "content": QUERY},
        {"role": "assistant", "metadata": "get_weather", "content": "```python\ntool_call(city='Beijing')\n```"},
        {"role": "observation", "content": RESULT}, {"role": "assistant", "content": ANSWER}]}
    messages = to_messages(record, "conversations")  # a system message with content None carries the tools
    openai = [{"role": "system", "content": None, "tools": [{"type": "function", "function": TOOL}]},
              {"role": "user", "content": QUERY}, {"role": "assistant", "content": None, "tool_calls": [
                  {"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Beijing"}'}}]},
              {"role": "tool", "content": RESULT}, {"role": "assistant", "content": ANSWER}]
    for family in ("qwen2.5", "glm4"):
        folder = write_folder(tmp_path / family, family)
        ours, theirs = load_tokenizer(folder), PreTrainedTokenizerFast.from_pretrained(folder)
        ids, labels = ours.encode_conversation(messages, 999, 0)
        assert (ids, labels) == ours.encode_conversation(openai, 999, 0)
        assert labelled(ours, labels) == REPLIES[family]
        expected = template_messages(family)[1:]  # no system prompt: Qwen2.5 writes its default
        text = theirs.apply_chat_template(expected, tools=[{"type": "function", "function": TOOL}], tokenize=False)
        assert ids == theirs(text + (ours.eos_token if family == "glm4" else ""), add_special_tokens=False)["input_ids"]
    with pytest.raises(ValueError, match=r"^message 2: assistant message with metadata 'get_weather'"):
        ours.encode_conversation([messages[1], {**messages[2], "content": "get the weather"}], 99, 0)
