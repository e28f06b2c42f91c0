"""The decoder families' OpenAI-server chat protocol (models/decoder/chat.py), without a model.

The replies are the text `tuneport serve` decodes (special tokens skipped) in each format: Qwen's from the tool
prompt of Qwen2.5's and Qwen3's chat templates, Llama 3.1's from its template's JSON tool-call instruction,
GLM-4's from THUDM/GLM-4 basic_demo/openai_api_server.py (`['gaode_weather', '{"city": "北京"}']`).
"""

import json
import subprocess
import sys

import pytest

from tuneport.models.decoder.chat import ChatFormatError, protocol

WEATHER = {"name": "get_weather", "description": "The weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
TOOLS = [{"type": "function", "function": WEATHER}]
QWEN_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "北京"}}\n</tool_call>'
REPLIES = {  # style -> realistic tool-call replies
    "qwen": [QWEN_CALL,
             "I'll look that up.\n" + QWEN_CALL,  # Qwen2.5 may write a preamble
             "<think>\nThe user wants the weather; I have get_weather.\n</think>\n\n" + QWEN_CALL],  # Qwen3
    "llama3": ['{"name": "get_weather", "parameters": {"city": "北京"}}',
               '{"name": "get_weather", "arguments": {"city": "北京"}}'],
    "glm4": ['get_weather\n{"city": "北京"}'],
}


def held(split) -> bool:
    """Whether serve holds the reply back (streams nothing of it): None, or a tool call under way."""
    return split is None or bool(split[0])


@pytest.mark.parametrize("style,reply", [(s, r) for s, replies in REPLIES.items() for r in replies])
def test_a_tool_call_parses_to_its_name_and_arguments(style, reply):
    chat = protocol(style)
    name, body = chat.split_reply(reply)
    assert (name, chat.parse_tool_call(body)) == ("get_weather", {"city": "北京"})


@pytest.mark.parametrize("style,reply", [(s, r[0]) for s, r in REPLIES.items()])
def test_a_tool_call_is_held_back_while_it_streams(style, reply):
    chat = protocol(style)
    for k in range(1, len(reply)):
        split = chat.split_reply(reply[:k])
        assert held(split), (k, reply[:k], split)
        assert split is None or chat.parse_tool_call(split[1]) is None  # glm4: the name, then arguments under way


def test_qwen_holds_the_start_of_a_call_after_text():
    chat = protocol("qwen")
    assert chat.split_reply("I'll look that up.\n") == ("", "I'll look that up.\n")
    for k in range(1, len("<tool_call>") + 1):
        assert chat.split_reply("I'll look that up.\n" + "<tool_call>"[:k]) is None


@pytest.mark.parametrize("style,reply", [
    ("qwen", "The weather in Beijing is sunny, 25 °C."),
    ("qwen", "<think>\nNo <tool_call> needed.\n</think>\n\nSunny."),
    ("qwen", '<tool_call>\n{"name": get_weather}\n</tool_call>'),  # not JSON: answered as it is
    ("llama3", "It is sunny in Beijing."),
    ("llama3", '{"answer": 4}'),  # JSON, but no call
    ("glm4", "Sunny today.\nEnjoy it."),  # no leading newline: still an answer
    ("glm4", "Sunny\nand warm."),
    ("", '{"name": "get_weather", "parameters": {}}'),
])
def test_a_plain_answer_passes_through(style, reply):
    assert protocol(style).split_reply(reply) == ("", reply)


def test_glm4_answers_after_a_newline():
    assert protocol("glm4").split_reply("\n北京今天晴，25 °C。") == ("", "北京今天晴，25 °C。")


@pytest.mark.parametrize("style,body", [
    ("qwen", '{"name": "get_weather", "arguments": {"city": "北京"}'),
    ("qwen", '{"name": "get_weather", "arguments": {"city": NaN}}'),  # no JSON form
    ("qwen", '{"name": "get_weather", "arguments": ["北京"]}'),
    ("llama3", '{"name": "get_weather", "parameters": {"city": 北京}}'),
    ("llama3", "__import__('os').system('true')"),
    ("glm4", '{"city": "北京"'),
    ("glm4", '["北京"]'),
    ("", '{"city": "北京"}'),
])
def test_a_malformed_call_parses_to_none(style, body):
    assert protocol(style).parse_tool_call(body) is None


def test_qwen_reads_arguments_given_as_a_json_string():
    assert protocol("qwen").parse_tool_call('{"name": "f", "arguments": "{\\"a\\": 1}"}') == {"a": 1}


def conversation(system: bool = True) -> list[dict]:
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "北京"}'}}
    return [*([{"role": "system", "content": "Be brief."}] if system else []),
            {"role": "user", "content": [{"type": "text", "text": "Weather in "}, {"type": "text", "text": "北京?"}]},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 25 °C"}]


@pytest.mark.parametrize("style", ["qwen", "llama3", "glm4"])
def test_history_from_openai_maps_tools_calls_and_results(style):
    history, query, role = protocol(style).history_from_openai(conversation(), TOOLS)
    assert history == [
        {"role": "system", "content": "Be brief.", "tools": [WEATHER]},
        {"role": "user", "content": "Weather in 北京?"},
        {"role": "assistant", "content": "", "tool_calls": [{"name": "get_weather", "arguments": {"city": "北京"},
                                                            "id": "call_1"}]},
    ]
    assert (query, role) == ("sunny, 25 °C", "observation")


def test_tools_without_a_system_message_get_one():
    history, query, role = protocol("qwen").history_from_openai(conversation(system=False)[:1], TOOLS)
    assert history == [{"role": "system", "content": None, "tools": [WEATHER]}]
    assert (query, role) == ("Weather in 北京?", "user")


def test_glm4_renders_one_call_per_assistant_turn():
    calls = [{"function": {"name": "get_weather", "arguments": json.dumps({"city": c})}} for c in ("北京", "上海")]
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "Checking.", "tool_calls": calls},
                {"role": "tool", "content": "sunny"}, {"role": "tool", "content": "rain"}]
    history, query, _ = protocol("glm4").history_from_openai(messages)
    turns = [{"role": "assistant", "content": "", "tool_calls": [{"name": "get_weather", "arguments": {"city": c}}]}
             for c in ("北京", "上海")]
    assert history[1:] == [{"role": "assistant", "content": "Checking."}, *turns,
                           {"role": "observation", "content": "sunny"}]
    assert query == "rain"


@pytest.mark.parametrize("messages,tools,fields", [
    ([], None, ["messages: expected a non-empty list"]),
    ([{"role": "bot", "content": "hi"}, {"role": "user", "content": "q"}], None, ["messages[0].role: 'bot'"]),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], None, ["messages[0].content"]),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], None,
     ["messages[1].role: the last message must be from the user or a tool"]),
    ([{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": "{'a': 1}"}}]},
      {"role": "user", "content": "q"}], None, ["messages[0].tool_calls[0].function.arguments"]),
    ([{"role": "user", "content": "q"}], [{"type": "function", "function": {"description": "no name"}}], ["tools[0]"]),
    ([{"content": "hi"}, {"role": "user", "content": 3}], None, ["messages[0]: expected", "messages[1].content"]),
])
def test_a_bad_request_names_every_field(messages, tools, fields):
    with pytest.raises(ChatFormatError) as error:
        protocol("qwen").history_from_openai(messages, tools)
    assert all(field in str(error.value) for field in fields), str(error.value)
    assert isinstance(error.value, ValueError)


def test_a_style_without_tool_calls_refuses_tools_and_answers_text():
    chat = protocol("")
    with pytest.raises(chat.ChatFormatError, match='tools: .*"tool_choice": "none"'):
        chat.history_from_openai([{"role": "user", "content": "q"}], TOOLS)
    assert chat.history_from_openai([{"role": "user", "content": "q"}]) == ([], "q", "user")
    assert chat.ChatFormatError is protocol("glm4").ChatFormatError is ChatFormatError


def test_an_unknown_style_is_refused():
    with pytest.raises(ValueError, match="'hermes'"):
        protocol("hermes")


def test_the_module_imports_no_framework():
    code = ("import sys, tuneport.models.decoder.chat; "
            "print(sorted({'torch', 'transformers', 'jinja2', 'mindspore'} & set(sys.modules)))")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout == "[]\n"
