"""Normalising every input format to the canonical record of each kind, and validation errors."""

from __future__ import annotations

import pytest

from alignkit.data import REQUIRED_FIELDS, DataError, Row, normalize_record, normalize_rows


def u(text):
    return {"role": "user", "content": text}


def a(text):
    return {"role": "assistant", "content": text}


def s(text):
    return {"role": "system", "content": text}


CHAT = [u("hi"), a("hello")]


# ---- sft -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("record, expected", [
    ({"messages": CHAT, "id": 1}, {"messages": CHAT}),
    ({"conversations": [{"from": "system", "value": "sys"}, {"from": "human", "value": "hi"},
                        {"from": "gpt", "value": "hello"}]}, {"messages": [s("sys")] + CHAT}),
    ({"instruction": "Add", "input": "1 and 2", "output": "3"}, {"messages": [u("Add\n\n1 and 2"), a("3")]}),
    ({"instruction": "Add", "input": "", "output": "3"}, {"messages": [u("Add"), a("3")]}),
    ({"prompt": [u("hi")], "completion": [a("hello")]}, {"messages": CHAT}),
    ({"prompt": [u("hi")], "completion": "hello"}, {"messages": CHAT}),
    ({"prompt": "2+2=", "completion": "4"}, {"prompt": "2+2=", "completion": "4"}),
    ({"text": "the cat sat"}, {"text": "the cat sat"}),
])
def test_sft_formats(record, expected):
    assert normalize_record(record, "sft") == [expected]


def test_system_prompt_added_only_when_missing():
    assert normalize_record({"messages": CHAT}, "sft", system_prompt="be brief") == [{"messages": [s("be brief")] + CHAT}]
    own = [s("mine")] + CHAT
    assert normalize_record({"messages": own}, "sft", system_prompt="be brief") == [{"messages": own}]
    assert normalize_record({"text": "x y"}, "sft", system_prompt="be brief") == [{"text": "x y"}]


@pytest.mark.parametrize("messages, message", [
    ([u("a"), u("b"), a("c")], "turn 1 \\(after user\\) is 'user', expected 'assistant'"),
    ([a("a"), u("b"), a("c")], "first turn after an optional system message is 'assistant'"),
    ([u("a"), s("b"), a("c")], "a system message must come first"),
    ([u("a"), {"role": "tool", "content": "b"}, a("c")], "role 'tool'"),
    ([u("a"), a("b"), u("c")], "the last turn must be 'assistant', got 'user'"),
    ([u("a"), a("  ")], "message 1 \\(assistant\\) has empty content"),
    ([u("a"), {"role": "assistant"}], "has content of type NoneType"),
    ([], "empty \\(no messages\\)"),
])
def test_bad_conversations(messages, message):
    with pytest.raises(DataError, match=message) as e:
        normalize_record({"messages": messages}, "sft")
    assert e.value.field == "messages"


def test_unknown_sharegpt_speaker():
    with pytest.raises(DataError, match="from='tool'"):
        normalize_record({"conversations": [{"from": "human", "value": "a"}, {"from": "tool", "value": "b"}]}, "sft")


def test_missing_and_empty_fields():
    with pytest.raises(DataError, match="field 'completion': missing") as e:
        normalize_record({"prompt": "x"}, "sft", fmt="prompt_completion")
    assert e.value.field == "completion"
    with pytest.raises(DataError, match="field 'completion': empty"):
        normalize_record({"prompt": "x", "completion": ""}, "sft")
    with pytest.raises(DataError, match="field 'output': missing"):
        normalize_record({"instruction": "x", "output": None}, "sft", fmt="alpaca")


def test_wrong_shape_lists_what_the_kind_accepts():
    with pytest.raises(DataError) as e:
        normalize_record({"question": "x", "answer": "y"}, "sft")
    msg = str(e.value)
    assert "['answer', 'question']" in msg and "kind 'sft' accepts: messages (messages)" in msg
    assert "prompt_completion (prompt, completion)" in msg and "columns:" in msg
    # KTO data is not silently used for SFT (it would train on undesirable completions)
    with pytest.raises(DataError, match="looks like format 'unpaired'"):
        normalize_record({"prompt": "x", "completion": "y", "label": False}, "sft")
    assert normalize_record({"prompt": "x", "completion": "y", "label": False}, "sft",
                            fmt="prompt_completion") == [{"prompt": "x", "completion": "y"}]
    assert ("prompt", "completion") in REQUIRED_FIELDS["sft"]


# ---- preference ----------------------------------------------------------------------------------

def test_preference_explicit_prompt():
    rec = {"prompt": [u("q")], "chosen": [a("good")], "rejected": [a("bad")]}
    assert normalize_record(rec, "preference") == [rec]
    # strings as completions of a conversational prompt become assistant turns
    assert normalize_record({"prompt": [u("q")], "chosen": "good", "rejected": "bad"}, "preference") == [rec]
    # plain strings stay plain
    plain = {"prompt": "q", "chosen": "good", "rejected": "bad"}
    assert normalize_record(plain, "preference") == [plain]
    # prompt repeated inside chosen/rejected is removed
    assert normalize_record({"prompt": [u("q")], "chosen": [u("q"), a("good")], "rejected": [u("q"), a("bad")]},
                            "preference") == [rec]


def test_preference_implicit_prompt():
    rec = {"chosen": [s("sys"), u("q1"), a("a1"), u("q2"), a("good")],
           "rejected": [s("sys"), u("q1"), a("a1"), u("q2"), a("bad")]}
    assert normalize_record(rec, "preference") == [
        {"prompt": [s("sys"), u("q1"), a("a1"), u("q2")], "chosen": [a("good")], "rejected": [a("bad")]}]


def test_preference_errors():
    with pytest.raises(DataError, match="field 'prompt': chosen/rejected are plain strings and there is no prompt"):
        normalize_record({"chosen": "q good", "rejected": "q bad"}, "preference")
    with pytest.raises(DataError, match="share no leading prompt messages"):
        normalize_record({"chosen": [u("x"), a("good")], "rejected": [u("y"), a("bad")]}, "preference")
    with pytest.raises(DataError, match="field 'chosen': completion messages must be assistant turns"):
        normalize_record({"prompt": [u("q")], "chosen": [a("x"), u("y")], "rejected": [a("z")]}, "preference")
    with pytest.raises(DataError, match="kind 'preference' accepts: preference \\(chosen, rejected, \\[prompt\\]\\)"):
        normalize_record({"messages": CHAT}, "preference")


# ---- unpaired ------------------------------------------------------------------------------------

@pytest.mark.parametrize("label, expected", [(True, True), (0, False), (1, True), ("false", False), ("TRUE", True)])
def test_unpaired_labels(label, expected):
    assert normalize_record({"prompt": "q", "completion": "c", "label": label}, "unpaired") == [
        {"prompt": "q", "completion": "c", "label": expected}]


def test_unpaired_bad_label_and_conversational():
    with pytest.raises(DataError, match="field 'label': expected true/false"):
        normalize_record({"prompt": "q", "completion": "c", "label": "maybe"}, "unpaired")
    assert normalize_record({"prompt": [u("q")], "completion": [a("c")], "label": 1}, "unpaired") == [
        {"prompt": [u("q")], "completion": [a("c")], "label": True}]


def test_preference_pairs_become_two_unpaired_rows():
    rows = [Row({"prompt": "q", "chosen": "good", "rejected": "bad"}, "f.jsonl", 1, "line")]
    (group,) = normalize_rows(rows, "unpaired")
    assert [r.data for r in group] == [{"prompt": "q", "completion": "good", "label": True},
                                       {"prompt": "q", "completion": "bad", "label": False}]


# ---- prompt --------------------------------------------------------------------------------------

@pytest.mark.parametrize("record, expected", [
    ({"prompt": [u("q")], "answer": "42"}, {"prompt": [u("q")], "answer": "42"}),
    ({"prompt": "2+2=", "answer": "4"}, {"prompt": "2+2=", "answer": "4"}),
    ({"messages": [u("q"), a("x")], "answer": "4"}, {"prompt": [u("q")], "answer": "4"}),
    ({"messages": [u("q1"), a("x"), u("q2")]}, {"prompt": [u("q1"), a("x"), u("q2")]}),
    ({"prompt": "2+2=", "completion": "4", "id": 3}, {"prompt": "2+2=", "id": 3}),
    ({"instruction": "Add", "input": "1 2", "output": "3"}, {"prompt": [u("Add\n\n1 2")]}),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "x"}]}, {"prompt": [u("q")]}),
    ({"prompt": [u("q")], "chosen": [a("g")], "rejected": [a("b")]}, {"prompt": [u("q")]}),
])
def test_prompt_formats(record, expected):
    assert normalize_record(record, "prompt") == [expected]


def test_prompt_system_prompt_and_errors():
    assert normalize_record({"prompt": [u("q")]}, "prompt", system_prompt="sys") == [{"prompt": [s("sys"), u("q")]}]
    with pytest.raises(DataError, match="field 'prompt': the last turn must be 'user'"):
        normalize_record({"prompt": [u("q"), a("x")]}, "prompt")


# ---- scored --------------------------------------------------------------------------------------

@pytest.mark.parametrize("record, expected", [
    ({"text": "good film", "score": 1}, {"text": "good film", "score": 1.0}),
    ({"text": "bad film", "label": "0.25"}, {"text": "bad film", "score": 0.25}),
    ({"prompt": "review:", "completion": "great", "reward": -2}, {"prompt": "review:", "completion": "great",
                                                                   "score": -2.0}),
    ({"prompt": "q", "completion": "c", "label": True}, {"prompt": "q", "completion": "c", "score": 1.0}),
    ({"messages": [u("q"), a("c")], "score": 0.5}, {"prompt": [u("q")], "completion": [a("c")], "score": 0.5}),
])
def test_scored_formats(record, expected):
    assert normalize_record(record, "scored") == [expected]


def test_scored_errors():
    with pytest.raises(DataError, match="field 'score': missing: kind 'scored' needs a score column"):
        normalize_record({"text": "x"}, "scored")
    with pytest.raises(DataError, match="field 'score': expected a number"):
        normalize_record({"text": "x", "score": "high"}, "scored")


# ---- rows: locations and skip mode ---------------------------------------------------------------

def test_errors_name_file_row_and_field():
    rows = [Row({"messages": CHAT}, "chats.jsonl", 1, "line"), Row({"messages": [u("a"), u("b")]}, "chats.jsonl", 2,
                                                                     "line")]
    with pytest.raises(DataError) as e:
        normalize_rows(rows, "sft")
    assert str(e.value).startswith("chats.jsonl line 2, field 'messages': turn 1 (after user) is 'user'")
    assert (e.value.source, e.value.row, e.value.field) == ("chats.jsonl", 2, "messages")


def test_format_is_detected_per_source_so_missing_fields_are_named():
    rows = [Row({"messages": CHAT}, "c.jsonl", 1, "line"), Row({"text": "oops"}, "c.jsonl", 2, "line")]
    with pytest.raises(DataError, match="c.jsonl line 2, field 'messages': missing"):
        normalize_rows(rows, "sft")


def test_skip_mode_counts_and_logs(caplog):
    rows = [Row({"messages": CHAT}, "c.jsonl", 1, "line"), Row({"messages": [a("x")]}, "c.jsonl", 2, "line"),
            Row({"messages": [u("x"), a("")]}, "c.jsonl", 3, "line"), Row({"messages": CHAT}, "c.jsonl", 4, "line")]
    skipped = []
    with caplog.at_level("WARNING", logger="alignkit"):
        groups = normalize_rows(rows, "sft", on_bad_row="skip", skipped=skipped)
    assert [g[0].index for g in groups] == [1, 4]
    assert [e.row for e in skipped] == [2, 3]
    assert "c.jsonl line 2" in caplog.text and "c.jsonl line 3" in caplog.text


# ---- LLaMA-Factory shapes, detected without a dataset_info.json ------------------------------------
# Records copied from LLaMA-Factory 0.9.5's demo data (dpo_en_demo.json, kto_en_demo.json).

DPO_DEMO = {"conversations": [{"from": "human", "value": "Obtain the result by calculating 6778576-84834150134. Only "
                                                         "respond with math and no words."}],
            "chosen": {"from": "gpt", "value": "6778576 - 84834150134 = -84827371558"},
            "rejected": {"from": "gpt", "value": "84834150134 - 6778576 = -16666579378"}}
KTO_DEMO = {"messages": [{"content": "Could you work out 2930861750638 plus 52341951985411 for me? Only respond "
                                     "with math and no words.", "role": "user"},
                         {"content": "71600583078871", "role": "assistant"}], "label": False}


def test_sharegpt_preference():
    (rec,) = normalize_record(DPO_DEMO, "preference")
    assert rec == {"prompt": [u(DPO_DEMO["conversations"][0]["value"])], "chosen": [a(DPO_DEMO["chosen"]["value"])],
                   "rejected": [a(DPO_DEMO["rejected"]["value"])]}
    with_system = {**DPO_DEMO, "conversations": [{"from": "system", "value": "be exact"}] + DPO_DEMO["conversations"]}
    assert normalize_record(with_system, "preference")[0]["prompt"][0] == s("be exact")
    assert [r["label"] for r in normalize_record(DPO_DEMO, "unpaired")] == [True, False]
    # errors name the record's own field
    bad = {**DPO_DEMO, "conversations": DPO_DEMO["conversations"] + [{"from": "gpt", "value": "x"}]}
    with pytest.raises(DataError, match="field 'conversations': the last turn must be 'user'"):
        normalize_record(bad, "preference")
    with pytest.raises(DataError, match="field 'chosen': completion messages must be assistant turns"):
        normalize_record({**DPO_DEMO, "chosen": {"from": "human", "value": "x"}}, "preference")


def test_conversations_with_a_kto_label():
    (rec,) = normalize_record(KTO_DEMO, "unpaired")
    assert rec == {"prompt": [u(KTO_DEMO["messages"][0]["content"])], "completion": [a("71600583078871")],
                   "label": False}
    sharegpt = {"conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}], "kto_tag": "true"}
    assert normalize_record(sharegpt, "unpaired") == [{"prompt": [u("hi")], "completion": [a("yo")], "label": True}]
    with pytest.raises(DataError, match="field 'kto_tag': expected true/false"):
        normalize_record({**sharegpt, "kto_tag": "meh"}, "unpaired")
    # KTO data is not silently trained on as SFT (that would train on undesirable completions)
    with pytest.raises(DataError, match="looks like format 'messages_label' .* set `format: messages` on this data "
                                        "source \\(it ignores 'label'\\)"):
        normalize_record(KTO_DEMO, "sft")


def test_alpaca_with_system_history_and_pairs():
    rec = {"instruction": "and now?", "input": "", "output": "3", "system": "be brief",
           "history": [["1+1?", "2"], ["and 2+1?", "3"]]}
    assert normalize_record(rec, "sft") == [{"messages": [s("be brief"), u("1+1?"), a("2"), u("and 2+1?"), a("3"),
                                                          u("and now?"), a("3")]}]
    with pytest.raises(DataError, match="field 'history': expected a list of \\[instruction, response\\] pairs"):
        normalize_record({**rec, "history": ["1+1?"]}, "sft")
    pair = {"instruction": "add", "input": "1 2", "chosen": "3", "rejected": "12"}
    assert normalize_record(pair, "preference") == [{"prompt": [u("add\n\n1 2")], "chosen": [a("3")],
                                                     "rejected": [a("12")]}]
    assert normalize_record({"instruction": "add", "output": "3", "kto_tag": True}, "unpaired") == [
        {"prompt": [u("add")], "completion": [a("3")], "label": True}]


def test_tool_turns_are_named_not_supported():
    glaive = {"conversations": [{"from": "human", "value": "How old am I?"},
                                {"from": "function_call", "value": "{\"name\": \"calculate_age\"}"},
                                {"from": "observation", "value": "{\"age\": 31}"}, {"from": "gpt", "value": "31."}]}
    with pytest.raises(DataError, match="field 'conversations': turn 1 is a tool turn \\(from='function_call'\\)"):
        normalize_record(glaive, "sft")


# ---- the closest accepted format: every suggestion loads ------------------------------------------

@pytest.mark.parametrize("record, kind, settings", [
    ({"question": "2+2?", "answer": "4"}, "sft", "`columns: {question: prompt, answer: completion}`"),
    ({"prompt": "q", "completion": "c", "label": True}, "sft", "`format: prompt_completion`"),
    ({"prompt": "q", "chosen": "good", "rejected": "bad"}, "sft", "`columns: {chosen: completion}`"),
    ({"question": "q", "response": "r", "thumbs_up": True}, "unpaired",
     "`columns: {question: prompt, response: completion, thumbs_up: label}`"),
    ({"question": "q", "better": "a", "worse": "b"}, "preference",
     "`columns: {question: prompt, better: chosen, worse: rejected}`"),
    ({"chat": [u("q"), a("x")], "rating": 0.5}, "scored", "`columns: {chat: messages, rating: score}`"),
    ({"Instruction": "q", "Output": "x"}, "sft", "`columns: {Instruction: instruction, Output: output}`"),
    ({"conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "x"}], "kto_tag": True}, "sft",
     "`format: sharegpt`"),
])
def test_suggested_settings_load_the_data(tmp_path, record, kind, settings):
    import json

    from alignkit.config import DataSource
    from alignkit.data import read_source, suggest_format

    with pytest.raises(DataError) as e:
        normalize_record(record, kind)
    assert f"set {settings} on this data source" in str(e.value)
    found = suggest_format(record, kind)
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps(record) + "\n")
    source = DataSource(str(path), columns=found.columns, format=found.fmt if found.set_format else "auto")
    groups = normalize_rows(read_source(source), kind, fmt=source.format)
    assert len(groups) == 1 and groups[0]


def test_suggestion_replaces_a_wrong_explicit_format():
    with pytest.raises(DataError, match="field 'format': format 'unpaired' cannot be used for kind 'sft'; .* set "
                                        "`columns: {question: prompt, answer: completion}` and "
                                        "`format: prompt_completion`"):
        normalize_record({"question": "q", "answer": "a"}, "sft", fmt="unpaired")


@pytest.mark.parametrize("record, kind", [
    ({"messages": CHAT}, "preference"),  # one conversation cannot become a pair
    ({"q": "x", "a": "y"}, "sft"),  # no name to go by
    ({"question": "q", "answer": ""}, "sft"),  # prompt_completion would be the shape, but this row is empty
])
def test_no_suggestion_when_no_mapping_loads(record, kind):
    from alignkit.data import suggest_format

    assert suggest_format(record, kind) is None
    with pytest.raises(DataError, match="Rename the columns to one of these shapes with `columns:`"):
        normalize_record(record, kind)


# ---- LLaMA-Factory dataset_info.json entries -----------------------------------------------------

def lf(entry, record):
    from alignkit.data import from_llamafactory, llamafactory_format

    return from_llamafactory(record, llamafactory_format(entry, "dataset_info.json#x"))


def test_llamafactory_alpaca_entries():
    record = {"instruction": "Sum up the numbers.", "input": "3, 2, 5", "output": "The sum of the numbers is 10."}
    # LLaMA-Factory joins instruction and input with one newline
    assert lf({}, record) == {"messages": [u("Sum up the numbers.\n3, 2, 5"), a("The sum of the numbers is 10.")]}
    # given columns replace all defaults: `input` is not read unless mapped
    assert lf({"columns": {"prompt": "instruction", "response": "output"}}, record)["messages"][0] == u(
        "Sum up the numbers.")
    ranking = {"ranking": True, "columns": {"prompt": "instruction", "query": "input", "chosen": "c", "rejected": "r",
                                            "system": "sys"}}
    assert lf(ranking, {"instruction": "q", "input": "", "c": "good", "r": "bad", "sys": "be nice"}) == {
        "prompt": [s("be nice"), u("q")], "chosen": "good", "rejected": "bad"}
    kto = {"columns": {"prompt": "instruction", "response": "output", "kto_tag": "tag", "history": "history"}}
    assert lf(kto, {"instruction": "q2", "output": "a2", "tag": False, "history": [["q1", "a1"]]}) == {
        "prompt": [u("q1"), a("a1"), u("q2")], "completion": [a("a2")], "label": False}
    assert lf({"columns": {"prompt": "text"}}, {"text": "a document"}) == {"text": "a document"}
    with pytest.raises(DataError, match="field 'output': missing"):
        lf({}, {"instruction": "q"})


def test_llamafactory_sharegpt_entries():
    openai_tags = {"role_tag": "role", "content_tag": "content", "user_tag": "user", "assistant_tag": "assistant"}
    entry = {"formatting": "sharegpt", "columns": {"messages": "messages"}, "tags": openai_tags}
    assert lf(entry, {"messages": CHAT}) == {"messages": CHAT}
    # tags given without system_tag leave it unset, as in LLaMA-Factory: a system turn is then an unknown role
    with pytest.raises(DataError, match="field 'messages': turn 0 has role='system', which the entry's tags do not "
                                        "name; tags: 'user' \\(user\\), 'assistant' \\(assistant\\)"):
        lf(entry, {"messages": [s("x")] + CHAT})
    entry["tags"] = {**openai_tags, "system_tag": "system"}
    assert lf(entry, {"messages": [s("x")] + CHAT}) == {"messages": [s("x")] + CHAT}
    sharegpt_kto = {"formatting": "sharegpt", "columns": {"messages": "conversations", "kto_tag": "kto_tag"}}
    turns = [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "yo"}]
    assert lf(sharegpt_kto, {"conversations": turns, "kto_tag": True}) == {"messages": CHAT[:1] + [a("yo")],
                                                                            "label": True}
    ranking = {"formatting": "sharegpt", "ranking": True,
               "columns": {"messages": "conversations", "chosen": "chosen", "rejected": "rejected", "system": "sys"}}
    with pytest.raises(DataError, match="field 'chosen': expected one message object, got str"):
        lf(ranking, {**DPO_DEMO, "chosen": "text"})
    assert lf(ranking, {**DPO_DEMO, "sys": "exact"})["prompt"][0] == s("exact")
    with pytest.raises(DataError, match="field 'conversations': turn 1 is a tool turn \\(from='observation'\\)"):
        lf(ranking, {**DPO_DEMO, "conversations": DPO_DEMO["conversations"] + [{"from": "observation", "value": "x"}]})
