"""The data pipeline: templates, label masking, lengths, packing, batches, sources, the SQL set.

References: the prompt strings written out by hand, a character tokenizer whose ids the test
computes itself, the Llama-2 SentencePiece model (decoding the masked / unmasked halves), and
sqlite3 for the generated SQL.
"""

import json
import re
import sqlite3

import pytest
import torch

from qlora.data import (IGNORE_INDEX, Batches, Example, batches_in_order, collate, format_row, load_rows,
                        pack, pad_id_of, prepare_data, split_train_val, tokenize_example, tokenize_rows)
from qlora.sql_dataset import held_out_rows, sql_rows, write_jsonl
from conftest import LLAMA2_TOKENIZER

ROW = {"context": "CREATE TABLE head (age INTEGER)", "question": "How many heads are older than 56?",
       "answer": "SELECT COUNT(*) FROM head WHERE age > 56"}


class CharTokenizer:
    """One id per character (ord + 3); BOS 1, EOS 2, no pad id (like Llama's -1)."""
    bos_id, eos_id, pad_id = 1, 2, -1

    def encode(self, text: str, bos: bool, eos: bool) -> list[int]:
        return [self.bos_id] * bos + [ord(c) + 3 for c in text] + [self.eos_id] * eos


def chars(text: str) -> list[int]:
    return [ord(c) + 3 for c in text]


# ----------------------------------------------------------------------------- templates and labels

def test_prompt_labels_are_masked_token_by_token():
    prompt, completion = format_row(ROW, "context_qa")
    (example,), dropped = tokenize_rows([ROW], "context_qa", CharTokenizer(), sequence_len=1000)
    expected_ids = [1] + chars(prompt) + chars(completion) + [2]   # prompt and response encoded apart
    assert dropped == 0 and example.input_ids == expected_ids
    n_prompt = 1 + len(prompt)  # BOS + one id per prompt character
    for i, (token, label) in enumerate(zip(example.input_ids, example.labels)):
        assert label == (IGNORE_INDEX if i < n_prompt else token), i
    assert example.labels[-1] == 2  # the EOS carries a loss: the model learns to stop


def test_train_on_inputs_keeps_every_label():
    (example,), _ = tokenize_rows([ROW], "context_qa", CharTokenizer(), 1000, train_on_inputs=True)
    assert example.labels == example.input_ids


@pytest.mark.skipif(not LLAMA2_TOKENIZER.is_file(), reason="Llama-2 tokenizer not available")
def test_llama_tokenizer_mask_splits_prompt_from_answer():
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(LLAMA2_TOKENIZER))

    class Llama:
        eos_id, pad_id = sp.eos_id(), sp.pad_id()

        def encode(self, text, bos, eos):
            return [sp.bos_id()] * bos + sp.encode(text) + [sp.eos_id()] * eos

    assert pad_id_of(Llama()) == sp.eos_id()  # Llama has no pad token (pad_id -1)
    prompt, completion = format_row(ROW, "context_qa")
    example, n_prompt = tokenize_example(prompt, completion, Llama())
    masked = [t for t, l in zip(example.input_ids, example.labels) if l == IGNORE_INDEX]
    learned = [l for l in example.labels if l != IGNORE_INDEX]
    assert masked[0] == sp.bos_id() and sp.decode(masked[1:]) == prompt
    assert learned[-1] == sp.eos_id() and sp.decode(learned[:-1]) == ROW["answer"]
    # as axolotl: the prompt and the response are encoded apart (the answer starts a new "▁" word)
    assert example.input_ids == [sp.bos_id()] + sp.encode(prompt) + sp.encode(completion) + [sp.eos_id()]
    assert n_prompt == 1 + len(sp.encode(prompt))


# ----------------------------------------------------------------------------- lengths

def test_rows_longer_than_sequence_len_are_dropped_and_counted():
    rows = [ROW, dict(ROW, answer="SELECT 1"), dict(ROW, context="short", answer="SELECT 1")]
    prompt, _ = format_row(ROW, "context_qa")
    sequence_len = 1 + len(prompt) + len("SELECT 1") + 1          # exactly row 2's length
    examples, dropped = tokenize_rows(rows, "context_qa", CharTokenizer(), sequence_len)
    assert dropped == 1 and examples[0] is None                   # dropped whole, as axolotl does
    assert examples[1].input_ids == [1] + chars(prompt) + chars("SELECT 1") + [2]
    assert len(examples[1].input_ids) == sequence_len and examples[2] is not None


# ----------------------------------------------------------------------------- padding and packing

def test_collate_pads_to_sequence_len_or_to_the_longest():
    examples = [Example([1, 5, 6, 2], [-100, 5, 6, 2]), Example([1, 7], [-100, 7])]
    batch = collate(examples, pad_id=0, pad_to=6)
    assert batch["input_ids"].tolist() == [[1, 5, 6, 2, 0, 0], [1, 7, 0, 0, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 5, 6, 2, -100, -100], [-100, 7, -100, -100, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]]
    dynamic = collate(examples, pad_id=9)
    assert dynamic["input_ids"].tolist() == [[1, 5, 6, 2], [1, 7, 9, 9]]
    assert all(t.dtype == torch.long for t in dynamic.values())
    with pytest.raises(ValueError, match="pad_to"):
        collate(examples, pad_id=0, pad_to=3)


def test_packing_fills_sequences_with_whole_rows():
    rows = sql_rows(40, seed=3)
    examples, _ = tokenize_rows(rows, "context_qa", CharTokenizer(), sequence_len=700)
    packed = pack(examples, sequence_len=700)
    assert len(packed) < len(examples)
    assert all(len(p.input_ids) <= 700 and sum(p.seq_lens) == len(p.input_ids) for p in packed)
    # nothing lost: the same multiset of tokens and of label-carrying tokens (first labels masked)
    assert sorted(sum((p.input_ids for p in packed), [])) == sorted(sum((e.input_ids for e in examples), []))
    assert sorted(sum((p.labels for p in packed), [])) == sorted(sum(([IGNORE_INDEX] + e.labels[1:]
                                                                      for e in examples), []))
    # each sequence starts a row with BOS; after every EOS comes the next row's BOS, its label masked
    for p in packed:
        assert p.input_ids[0] == 1
        for j, token in enumerate(p.input_ids[:-1]):
            if token == 2:
                assert p.input_ids[j + 1] == 1 and p.labels[j + 1] == IGNORE_INDEX
    # best-fit decreasing: no two sequences could have been merged
    lengths = sorted(len(p.input_ids) for p in packed)
    assert lengths[0] + lengths[1] > 700


# ----------------------------------------------------------------------------- batches

def _examples(n: int) -> list[Example]:
    return [Example([1] + [10 + i] * (1 + i % 4) + [2], [-100] + [10 + i] * (1 + i % 4) + [2]) for i in range(n)]


def _ids_of(batch) -> list[int]:
    return [row[1] - 10 for row in batch["input_ids"].tolist()]  # the example index each row holds


def test_batches_cover_each_epoch_once_in_a_seeded_order():
    examples = _examples(10)
    batches = Batches(examples, micro_batch_size=4, seed=7)
    assert len(batches) == 3
    epochs = [[i for _ in range(3) for i in _ids_of(next(batches))] for _ in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == list(range(10))
    assert epochs[0] != epochs[1]  # a fresh order each epoch
    again = Batches(examples, micro_batch_size=4, seed=7)
    assert [i for _ in range(3) for i in _ids_of(next(again))] == epochs[0]
    other = Batches(examples, micro_batch_size=4, seed=8)
    assert [i for _ in range(3) for i in _ids_of(next(other))] != epochs[0]
    in_order = [i for b in batches_in_order(examples, 4, pad_id=0) for i in _ids_of(b)]
    assert in_order == list(range(10))


def test_batches_resume_exactly_from_a_saved_position():
    examples = _examples(10)
    uninterrupted = Batches(examples, micro_batch_size=3, seed=1, pad_to=8)
    expected = [next(uninterrupted) for _ in range(12)]
    first = Batches(examples, micro_batch_size=3, seed=1, pad_to=8)
    for _ in range(5):  # stops inside the second epoch
        next(first)
    state = json.loads(json.dumps(first.state_dict()))  # survives a round trip through a file
    assert (state["epoch"], state["index"]) == (1, 3) and first.epochs_done == 1.3
    resumed = Batches(examples, micro_batch_size=3, seed=1, pad_to=8)
    resumed.load_state_dict(state)
    for want in expected[5:]:
        got = next(resumed)
        assert all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(ValueError, match="num_examples"):
        Batches(_examples(11), micro_batch_size=3, seed=1).load_state_dict(state)
    with pytest.raises(ValueError, match="seed"):
        Batches(examples, micro_batch_size=3, seed=2).load_state_dict(state)


def test_batches_reject_empty_data_and_bad_batch_size():
    with pytest.raises(ValueError, match="empty"):
        Batches([], micro_batch_size=2)
    with pytest.raises(ValueError, match="micro_batch_size"):
        Batches(_examples(3), micro_batch_size=0)


# ----------------------------------------------------------------------------- split

def test_val_split_by_fraction_or_count_is_seeded_and_disjoint():
    items = list(range(100))
    train, val = split_train_val(items, 0.05, seed=0)
    assert len(val) == 5 and sorted(train + val) == items and not set(train) & set(val)
    assert split_train_val(items, 0.05, seed=0) == (train, val)
    assert split_train_val(items, 0.05, seed=1)[1] != val
    assert len(split_train_val(items, 0.001, seed=0)[1]) == 1  # a fraction rounds up
    assert len(split_train_val(items, 12, seed=0)[1]) == 12
    assert split_train_val(items, 0, seed=0) == (items, [])
    for bad, message in ((100, "leaving none"), (-0.1, ">= 0"), (2.5, "whole")):
        with pytest.raises(ValueError, match=message):
            split_train_val(items, bad, seed=0)


# ----------------------------------------------------------------------------- sources

def test_json_jsonl_and_folder_sources_read_the_same_rows(tmp_path):
    rows = sql_rows(5, seed=1)
    (tmp_path / "list.json").write_text(json.dumps(rows))
    write_jsonl(rows, tmp_path / "rows.jsonl")
    (tmp_path / "lines.json").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")  # JSON lines in .json
    assert load_rows(str(tmp_path / "list.json")) == rows
    assert load_rows(str(tmp_path / "rows.jsonl")) == rows
    assert load_rows(str(tmp_path / "lines.json")) == rows
    assert load_rows(str(tmp_path)) == rows * 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lines.json", "list.json", "rows.jsonl"]  # no temp left


def test_hub_dataset_offline_is_a_clear_error(tmp_path, monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)  # never touch the network in tests
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ConnectionError, match="cannot get dataset 'someone/some_sql'.*builtin:sql"):
        load_rows("someone/some_sql")


def test_bad_sources_and_rows_raise_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        load_rows(str(tmp_path / "missing.jsonl"))
    bad_line = tmp_path / "bad.jsonl"
    bad_line.write_text(json.dumps(ROW) + "\n{oops\n")
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        load_rows(str(bad_line))
    not_a_list = tmp_path / "dict.json"
    not_a_list.write_text(json.dumps({"rows": [ROW]}))
    with pytest.raises(ValueError, match="expected a list of rows"):
        load_rows(str(not_a_list))
    tok = CharTokenizer()
    with pytest.raises(ValueError, match="row 2 of the dataset has no field 'answer'"):
        tokenize_rows([ROW, {"context": "c", "question": "q"}], "context_qa", tok, 500)
    with pytest.raises(ValueError, match="row 1 of the dataset: field 'output' is int"):
        tokenize_rows([{"instruction": "i", "output": 3}], "alpaca", tok, 500)
    with pytest.raises(ValueError, match="holds no rows"):
        tokenize_rows([], "context_qa", tok, 500)
    with pytest.raises(ValueError, match="unknown dataset type 'sharegpt'"):
        tokenize_rows([ROW], "sharegpt", tok, 500)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ValueError, match="holds no rows"):
        prepare_data([{"path": str(empty), "type": "context_qa"}], tok, 500)


# ----------------------------------------------------------------------------- end to end

def test_prepare_builtin_sql_splits_tokenizes_and_keeps_val_rows():
    tok = CharTokenizer()
    data = prepare_data([{"path": "builtin:sql", "type": "context_qa"}], tok, sequence_len=512,
                        val_set_size=0.05, seed=42)
    assert data.rows == 3000 and len(data.val) == 150 and len(data.train) == 2850 and data.dropped == 0
    for (row, kind), example in zip(data.val_rows, data.val):  # val rows line up with val examples
        prompt, response = format_row(row, kind)
        assert example.input_ids == tok.encode(prompt, bos=True, eos=False) + tok.encode(response, False, True)
    packed = prepare_data([{"path": "builtin:sql", "type": "context_qa"}], tok, sequence_len=512,
                          val_set_size=0.05, seed=42, sample_packing=True)
    assert len(packed.train) < len(data.train) and packed.train_tokens == data.train_tokens
    assert packed.val == data.val and "3000 rows" in data.summary()


# ----------------------------------------------------------------------------- the SQL dataset

def test_every_generated_sql_answer_runs_on_its_schema():
    rows = sql_rows()
    assert len(rows) == 3000 and len({(r["context"], r["question"]) for r in rows}) == 3000
    db_errors = []
    for row in rows:
        db = sqlite3.connect(":memory:")
        db.executescript(row["context"])
        try:
            db.execute(row["answer"]).fetchall()
        except sqlite3.Error as e:
            db_errors.append((row, e))
        db.close()
        # every value the query compares with is one the question mentions
        for literal in re.findall(r"'((?:[^']|'')*)'|[<>=] (\d+)", row["answer"]):
            assert (literal[0] or literal[1]).replace("''", "'") in row["question"], row
    assert not db_errors, db_errors[:3]


def test_sql_dataset_is_deterministic_given_a_seed():
    assert sql_rows(200, seed=5) == sql_rows(200, seed=5)
    assert sql_rows(200, seed=5) != sql_rows(200, seed=6)
    answers = [r["answer"] for r in sql_rows(1000, seed=0)]
    for clause in ("COUNT(*)", "COUNT(DISTINCT", "MAX(", "MIN(", "AVG(", "SUM(", "GROUP BY", "DESC LIMIT 1",
                   " AND ", " > ", " < ", " JOIN "):
        assert any(clause in a for a in answers), clause  # every template shows up
    with pytest.raises(ValueError, match="positive"):
        sql_rows(0)


def test_held_out_rows_share_no_row_with_builtin_sql(tmp_path):
    training = {(r["context"], r["question"]) for r in load_rows("builtin:sql")}
    another_seed = sql_rows(300, seed=1)
    assert any((r["context"], r["question"]) in training for r in another_seed)   # why a seed is not enough
    held_out = held_out_rows(300, seed=1)
    assert len(held_out) == 300 and held_out == held_out_rows(300, seed=1)
    assert not any((r["context"], r["question"]) in training for r in held_out)
    with pytest.raises(ValueError, match="another --seed"):
        held_out_rows(10, seed=0)
