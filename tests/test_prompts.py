"""axolotl's prompt formats byte for byte: each dataset type's prompt and response against the string
written out here by hand (from axolotl's prompt_strategies/context_qa.py and prompters.py), and the
token ids and labels of a row against that string encoded the way axolotl encodes it (prompt and
response apart) with the Llama 2 SentencePiece model."""

import pytest

from conftest import LLAMA2_TOKENIZER
from qlora.data import IGNORE_INDEX, check_rows, tokenize_rows
from qlora.prompts import format_row, sql_prompt, strip_response_prefix

SQL = {"context": "CREATE TABLE head (age INTEGER)", "question": "How many heads are older than 56?",
       "answer": "SELECT COUNT(*) FROM head WHERE age > 56"}
ARTICLE = {"article": "The Nile is 6650 km long.", "question": "How long is the Nile?", "answer": "6650 km",
           "unanswerable_question": "How deep is the Nile?"}

CASES = {
    "context_qa.load_v2": (SQL,
                           "Context: CREATE TABLE head (age INTEGER)\nQuestion: How many heads are older than 56?\n",
                           "Answer: SELECT COUNT(*) FROM head WHERE age > 56"),
    "context_qa": (ARTICLE,
                   "SYSTEM: Use the following contextual information to concisely answer the question.\n\n"
                   "USER: The Nile is 6650 km long.\n===\nHow long is the Nile?\nASSISTANT:",
                   "6650 km"),
    "context_qa.load": (ARTICLE,
                        "SYSTEM: Use the following contextual information to concisely answer the question.\n\n"
                        "USER: The Nile is 6650 km long.\n===\nHow long is the Nile?\nASSISTANT:",
                        "6650 km"),
    "context_qa.load_404": (ARTICLE,
                            "SYSTEM: Use the following contextual information to concisely answer the question.\n\n"
                            "USER: The Nile is 6650 km long.\n===\nHow deep is the Nile?\nASSISTANT:",
                            "The context provided does not contain any information about your inquiry. "
                            "Therefore, I'm unable to answer your question based on the given context."),
    "alpaca": ({"instruction": "Add.", "input": "2 and 3", "output": "5"},
               "Below is an instruction that describes a task, paired with an input that provides further "
               "context. Write a response that appropriately completes the request.\n\n"
               "### Instruction:\nAdd.\n\n### Input:\n2 and 3\n\n### Response:\n",
               "5"),
    "alpaca:no input": ({"instruction": "Say hi.", "input": "", "output": "hi"},
                        "Below is an instruction that describes a task. Write a response that appropriately "
                        "completes the request.\n\n### Instruction:\nSay hi.\n\n### Response:\n",
                        "hi"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_prompt_and_response_strings_are_axolotls(case):
    row, prompt, response = CASES[case]
    assert format_row(row, case.split(":")[0]) == (prompt, response)


def test_context_qa_reads_a_context_field_as_its_article():
    """know_sql rows name the article "context"; the string is the one an "article" row gives."""
    row = {"article": SQL["context"], "question": SQL["question"], "answer": SQL["answer"]}
    assert format_row(SQL, "context_qa") == format_row(row, "context_qa")
    assert sql_prompt("context_qa", SQL["context"], SQL["question"]) == format_row(SQL, "context_qa")[0]
    assert sql_prompt("context_qa.load_v2", SQL["context"], SQL["question"]) == CASES["context_qa.load_v2"][1]


def test_rows_missing_a_field_name_it():
    with pytest.raises(ValueError, match=r"row 1 of d has no field 'article\|context'"):
        check_rows([{"question": "q", "answer": "a"}], "context_qa", "d")
    with pytest.raises(ValueError, match="no field 'context'"):
        check_rows([ARTICLE], "context_qa.load_v2", "d")
    with pytest.raises(ValueError, match="unknown dataset type 'context_qa.load_v3'"):
        check_rows([SQL], "context_qa.load_v3", "d")


def test_generated_answer_loses_the_formats_answer_prefix():
    assert strip_response_prefix(" Answer: SELECT 1", "context_qa.load_v2") == "SELECT 1"
    assert strip_response_prefix("SELECT 1", "context_qa.load_v2") == "SELECT 1"
    assert strip_response_prefix(" Answer: SELECT 1", "context_qa") == "Answer: SELECT 1"


@pytest.mark.skipif(not LLAMA2_TOKENIZER.is_file(), reason="Llama-2 tokenizer not available")
@pytest.mark.parametrize("case", ["context_qa.load_v2", "context_qa", "context_qa.load_404", "alpaca"])
@pytest.mark.parametrize("train_on_inputs", [False, True])
def test_token_ids_and_labels_of_a_row_are_axolotls(case, train_on_inputs):
    from llama.tokenizer import Tokenizer

    tok = Tokenizer(LLAMA2_TOKENIZER)
    row, prompt, response = CASES[case]
    (example,), dropped = tokenize_rows([row], case, tok, sequence_len=2048, train_on_inputs=train_on_inputs)
    # axolotl: tokenizer(prompt) with BOS, no EOS; tokenizer(response) + EOS with its BOS stripped
    prompt_ids = [1] + tok.sp.encode(prompt)
    response_ids = tok.sp.encode(response) + [2]
    assert dropped == 0
    assert example.input_ids == prompt_ids + response_ids
    want_labels = prompt_ids + response_ids if train_on_inputs else [IGNORE_INDEX] * len(prompt_ids) + response_ids
    assert example.labels == want_labels
    if case == "context_qa.load_v2":   # the boundary as axolotl makes it: "\n" then a new word "▁Answer"
        assert tok.sp.id_to_piece(prompt_ids[-1]) == "<0x0A>" and tok.sp.id_to_piece(response_ids[0]) == "▁Answer"
