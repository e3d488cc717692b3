import json

import datasets
import pytest

from grpo.data import DataError, DataSpec, from_rows, load_data, tasks
from sft.messages import to_messages

ROWS = [
    {"question": "What is 1 + 2?", "solution": 3, "id": 0},
    {"question": "What is 2 * 3?", "solution": 6, "id": 1},
    {"question": "What is 9 - 4?", "solution": 5, "id": 2},
]


def write_jsonl(path, rows, blank_after=None):
    lines = []
    for i, r in enumerate(rows):
        lines.append(r if isinstance(r, str) else json.dumps(r))
        if blank_after == i:
            lines.append("")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture()
def sources(tmp_path):
    """The same three rows as JSONL, CSV, parquet and a save_to_disk folder."""
    ds = datasets.Dataset.from_list(ROWS)
    ds.to_csv(str(tmp_path / "d.csv"), index=False)
    ds.to_parquet(str(tmp_path / "d.parquet"))
    ds.save_to_disk(str(tmp_path / "saved"))
    return [
        write_jsonl(tmp_path / "d.jsonl", ROWS),
        tmp_path / "d.csv",
        tmp_path / "d.parquet",
        tmp_path / "saved",
    ]


def test_every_format_loads_renames_and_normalises(sources):
    for src in sources:
        ds = load_data(str(src), prompt_column="question", answer_column="solution")
        assert ds.column_names == ["prompt", "answer", "id"], src
        assert ds["prompt"] == [r["question"] for r in ROWS]
        assert ds["answer"] == ["3", "6", "5"]  # numbers become strings
        assert ds["id"] == [0, 1, 2]  # other columns kept


def test_first_n_rows_and_spec_mapping(sources):
    spec = {"source": str(sources[0]), "prompt_column": "question", "n": 2}
    assert load_data(spec)["prompt"] == [ROWS[0]["question"], ROWS[1]["question"]]
    with pytest.raises(DataError, match=r"d\.jsonl: n=5 rows asked for, but it holds only 3"):
        load_data(spec, n=5)
    with pytest.raises(DataError, match="unknown data key.*promt_column"):
        load_data({"source": "x.jsonl", "promt_column": "q"})


def test_dataset_dict_folder_splits(tmp_path):
    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS[:2]), "test": datasets.Dataset.from_list(ROWS[2:])}
    )
    dd.save_to_disk(str(tmp_path / "dd"))
    got = load_data(str(tmp_path / "dd"), split="test", prompt_column="question", answer_column="solution")
    assert got["prompt"] == [ROWS[2]["question"]]
    with pytest.raises(DataError, match=r"no split 'dev'; splits: train, test"):
        load_data(str(tmp_path / "dd"), split="dev", prompt_column="question")


def test_builtin_source_matches_tasks():
    ds = load_data(DataSpec(source="builtin:arithmetic", n=5, seed=3, split="test", schema="sft"))
    assert ds.to_list() == tasks.arithmetic(5, seed=3, split="test")
    pairs = load_data("builtin:safety", n=4, schema="preference", options={"harmful_fraction": 1.0})
    assert pairs.column_names == ["prompt", "chosen", "rejected", "category", "answer"]
    with pytest.raises(DataError, match="n .* is required for a builtin task"):
        load_data("builtin:arithmetic")
    with pytest.raises(DataError, match="builtin:nope: unknown builtin task 'nope'; known: arithmetic"):
        load_data("builtin:nope", n=2)
    with pytest.raises(DataError, match="unknown option.*digitz"):
        load_data("builtin:arithmetic", n=2, options={"digitz": 1})


def test_chat_message_prompts_are_kept(tmp_path):
    rows = [
        {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]},
        {"prompt": "plain"},
    ]
    ds = load_data(str(write_jsonl(tmp_path / "m.jsonl", rows)))
    assert ds[0]["prompt"] == rows[0]["prompt"] and ds[1]["prompt"] == "plain"
    assert to_messages("plain") == [{"role": "user", "content": "plain"}]


def test_chat_schema(tmp_path):
    conv = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    ok = load_data(str(write_jsonl(tmp_path / "c.jsonl", [{"messages": conv}])), schema="chat")
    assert ok[0]["messages"] == conv
    bad = write_jsonl(tmp_path / "nc.jsonl", [{"messages": conv}, {"messages": conv[:1]}])
    with pytest.raises(DataError, match=r"nc\.jsonl line 2: field 'messages' has no assistant message"):
        load_data(str(bad), schema="chat")


@pytest.mark.parametrize(
    ("rows", "blank_after", "match"),
    [
        ([{"prompt": "a"}, {"other": 1}], None, r"bad\.jsonl line 2: field 'prompt' is missing or null"),
        (
            [{"prompt": "a"}, {"prompt": "b"}, {"other": 1}],
            0,
            r"bad\.jsonl line 4: field 'prompt' is missing",
        ),
        (
            [{"prompt": "a"}, {"prompt": 7}],
            None,
            r"line 2: field 'prompt' has type int, expected a string or a list",
        ),
        ([{"prompt": "a"}, {"prompt": "   "}], None, r"bad\.jsonl line 2: field 'prompt' is empty"),
        (
            [{"prompt": "a"}, '{"prompt": "b",}'],
            None,
            r"bad\.jsonl line 2: malformed JSON \(Expecting property name",
        ),
        (['{"prompt": "a"}', "[1, 2]"], None, r"bad\.jsonl line 2: expected a JSON object, got list"),
        ([{"prompt": []}], None, r"line 1: field 'prompt' is an empty list of messages"),
        ([{"prompt": [{"role": "user"}]}], None, r"line 1: field 'prompt' message 0 content is NoneType"),
        ([{"prompt": [{"content": "x"}]}], None, r"line 1: field 'prompt' message 0 has no role"),
        (
            [{"prompt": "a", "answer": [1]}],
            None,
            r"line 1: field 'answer' has type list, expected a string or a n",
        ),
        ([{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": 2}], None, None),  # mixed types are fine
    ],
)
def test_bad_jsonl_rows_name_file_line_and_field(tmp_path, rows, blank_after, match):
    path = write_jsonl(tmp_path / "bad.jsonl", rows, blank_after=blank_after)
    if match is None:
        assert load_data(str(path))["answer"] == ["1", "2"]
        return
    with pytest.raises(DataError, match=match):
        load_data(str(path))


def test_bad_csv_row_names_row_and_field(tmp_path):
    (tmp_path / "q.csv").write_text("prompt,answer\nWhat is 1 + 1?,2\n,3\n")
    with pytest.raises(DataError, match=r"q\.csv row 2: field 'prompt' is missing or null"):
        load_data(str(tmp_path / "q.csv"))


@pytest.mark.parametrize(
    ("name", "text", "error"),
    [
        ("empty.jsonl", "", r"empty\.jsonl is empty"),
        ("blank.jsonl", "\n\n", r"blank\.jsonl is empty"),
        ("header.csv", "prompt,answer\n", r"header\.csv is empty \(no rows\)"),
        ("x.txt", "hi", r"unsupported file type '\.txt'; supported: \.csv, \.json, \.jsonl"),
        ("j.json", '[{"prompt": "a"},\n {"prompt" "b"}]', r"j\.json line 2: malformed JSON"),
        ("missing.jsonl", None, r"data file .*missing\.jsonl does not exist"),
    ],
)
def test_bad_file_names_the_file_and_what_is_wrong(tmp_path, name, text, error):
    if text is not None:
        (tmp_path / name).write_text(text)
    with pytest.raises(DataError, match=error):
        load_data(str(tmp_path / name))


def test_column_split_and_option_errors_name_the_source(sources):
    with pytest.raises(DataError, match=r"d\.jsonl: column 'prompt' not found .*columns: question, solution, id"):
        load_data(str(sources[0]))
    with pytest.raises(DataError, match=r"is a single file \(split 'train'\); split 'test' was asked for"):
        load_data(str(sources[1]), split="test", prompt_column="question")
    with pytest.raises(DataError, match="options .* apply to builtin tasks only"):
        load_data(str(sources[1]), prompt_column="question", options={"digits": 1})


def test_rename_conflict_and_spec_validation(tmp_path):
    path = write_jsonl(tmp_path / "two.jsonl", [{"prompt": "a", "question": "b"}])
    with pytest.raises(DataError, match="prompt_column='question' would be renamed to 'prompt', which already is"):
        load_data(str(path), prompt_column="question")
    with pytest.raises(DataError, match="data schema must be one of chat, preference, prompt, sft"):
        DataSpec(source="x.jsonl", schema="rl")
    with pytest.raises(DataError, match="data n must be a positive integer"):
        DataSpec(source="x.jsonl", n=0)


def test_preference_and_sft_schemas_from_rows():
    ok = from_rows([{"prompt": "p", "chosen": "c", "rejected": "r"}], schema="preference")
    assert ok.column_names == ["prompt", "chosen", "rejected"]
    with pytest.raises(DataError, match=r"<rows> row 2: field 'rejected' is missing or null"):
        from_rows(
            [{"prompt": "p", "chosen": "c", "rejected": "r"}, {"prompt": "p", "chosen": "c"}],
            schema="preference",
        )
    with pytest.raises(DataError, match=r"mine row 1: field 'completion' is empty"):
        from_rows([{"prompt": "p", "completion": ""}], schema="sft", name="mine")
    with pytest.raises(DataError, match="<rows> is empty"):
        from_rows([])


def test_from_rows_unifies_mixed_prompt_types_and_answers():
    ds = from_rows(
        [
            {"prompt": "What is 1 + 1?", "answer": 2},
            {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}], "answer": "x"},
        ]
    )
    assert ds[0]["prompt"] == [{"role": "user", "content": "What is 1 + 1?"}]
    assert ds[1]["prompt"][0] == {"role": "system", "content": "Be brief."}
    assert ds["answer"] == ["2", "x"]
    pairs = from_rows(
        [{"prompt": "p", "chosen": "c", "rejected": [{"role": "assistant", "content": "r"}]}], schema="preference"
    )
    assert pairs[0]["chosen"] == "c"  # a column of one type is kept as it is
    with pytest.raises(DataError, match=r"<rows> row 2: expected a mapping of columns, got str"):
        from_rows([{"prompt": "p"}, "oops"])
