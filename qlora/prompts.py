"""axolotl's instruction prompt formats, written out: a row -> (prompt, response) text.

Dataset `type`s as an axolotl YAML names them, with the strings axolotl builds (its
prompt_strategies/context_qa.py and prompters.py, AlpacaPrompter with system_format):

* context_qa, context_qa.load: {article, question, answer}, the chat style
      "SYSTEM: Use the following contextual information to concisely answer the question.\\n\\n"
      "USER: {article}\\n===\\n{question}\\nASSISTANT:"            response: "{answer}"
  (here a row may name its article "context", as know_sql / sql-create-context rows do; axolotl
  would stop with KeyError: 'article' on them)
* context_qa.load_404: {article, unanswerable_question}, the same prompt, and the fixed response
      "The context provided does not contain any information about your inquiry. Therefore, I'm
      unable to answer your question based on the given context."
* context_qa.load_v2: {context, question, answer}, no system line and no roles (the seed's type)
      "Context: {context}\\nQuestion: {question}\\n"                 response: "Answer: {answer}"
* alpaca: {instruction, input (optional), output}, the Stanford Alpaca template.

How axolotl turns them into tokens (prompt_tokenizers.py, InstructionPromptTokenizingStrategy):
the prompt and the response are tokenized *separately*, [BOS] + encode(prompt) and encode(response)
+ [EOS], then concatenated; so the response starts a new SentencePiece word ("▁Answer", "▁SELECT").
qlora/data.py does the same, and infer.py prompts with the same prompt string.
"""

CONTEXT_SYSTEM = "SYSTEM: Use the following contextual information to concisely answer the question.\n\n"
CONTEXT_QA_PROMPT = CONTEXT_SYSTEM + "USER: {article}\n===\n{question}\nASSISTANT:"
MISSING_INFO_ANSWER = ("The context provided does not contain any information about your inquiry. "
                       "Therefore, I'm unable to answer your question based on the given context.")
CONTEXT_V2_PROMPT = "Context: {context}\nQuestion: {question}\n"
CONTEXT_V2_ANSWER = "Answer: "
ALPACA_PROMPT = ("Below is an instruction that describes a task, paired with an input that provides further "
                 "context. Write a response that appropriately completes the request.\n\n"
                 "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                          "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")

# The fields a row of each type must have; ("article", "context") means either name.
REQUIRED_FIELDS = {
    "context_qa": (("article", "context"), "question", "answer"),
    "context_qa.load": (("article", "context"), "question", "answer"),
    "context_qa.load_404": (("article", "context"), "unanswerable_question"),
    "context_qa.load_v2": ("context", "question", "answer"),
    "alpaca": ("instruction", "output"),
}
# What infer.py strips from a generated answer before scoring it (the response's fixed start).
RESPONSE_PREFIX = {"context_qa.load_v2": CONTEXT_V2_ANSWER}
QA_TYPES = ("context_qa", "context_qa.load", "context_qa.load_v2", "context_qa.load_404")  # (context, question)


def check_type(kind: str) -> None:
    if kind not in REQUIRED_FIELDS:
        raise ValueError(f"unknown dataset type {kind!r}: use one of {sorted(REQUIRED_FIELDS)}")


def field_names(kind: str) -> list[str]:
    """The required fields of a row of type `kind`, as a user reads them ("article|context")."""
    check_type(kind)
    return ["|".join(f) if isinstance(f, tuple) else f for f in REQUIRED_FIELDS[kind]]


def missing_field(row: dict, kind: str) -> str | None:
    """The first required field `row` lacks (as field_names spells it), or None."""
    for f, name in zip(REQUIRED_FIELDS[kind], field_names(kind)):
        if not any(n in row for n in (f if isinstance(f, tuple) else (f,))):
            return name
    return None


def format_row(row: dict, kind: str) -> tuple[str, str]:
    """(prompt, response) text of a row; the EOS token is added as an id, not as text."""
    check_type(kind)
    if kind == "alpaca":
        if row.get("input"):
            return ALPACA_PROMPT.format(instruction=row["instruction"], input=row["input"]), row["output"]
        return ALPACA_PROMPT_NO_INPUT.format(instruction=row["instruction"]), row["output"]
    if kind == "context_qa.load_v2":
        return CONTEXT_V2_PROMPT.format(context=row["context"], question=row["question"]), \
            CONTEXT_V2_ANSWER + row["answer"]
    article = row["article"] if "article" in row else row["context"]
    if kind == "context_qa.load_404":
        return CONTEXT_QA_PROMPT.format(article=article, question=row["unanswerable_question"]), MISSING_INFO_ANSWER
    return CONTEXT_QA_PROMPT.format(article=article, question=row["question"]), row["answer"]


def sql_prompt(kind: str, context: str, question: str) -> str:
    """The prompt an adapter trained on `kind` rows expects for (context, question)."""
    if kind not in QA_TYPES:
        raise ValueError(f"type {kind!r} has no (context, question) prompt: use one of {list(QA_TYPES)}")
    row = {"context": context, "question": question, "unanswerable_question": question, "answer": ""}
    return format_row(row, kind)[0]


def strip_response_prefix(text: str, kind: str) -> str:
    """A generated response without the fixed start its format puts before the answer ("Answer: ")."""
    prefix = RESPONSE_PREFIX.get(kind, "").strip()
    text = text.strip()
    return text[len(prefix):].strip() if prefix and text.startswith(prefix) else text
