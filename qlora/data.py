"""Instruction data for fine-tuning: rows -> prompt and completion -> token ids and labels -> batches.

QLoRA (arXiv 2305.14314, section 5 and appendix B) trains on the response only: the loss is
computed on the completion tokens and the prompt's labels are masked. We do the same with
train_on_inputs=False (the default): prompt positions get label IGNORE_INDEX (-100), which
F.cross_entropy(ignore_index=-100) skips. Labels are aligned with input_ids, as in Hugging Face
models: the loss compares logits[:, :-1] with labels[:, 1:].

Row types (axolotl's names):
* "context_qa": {context, question, answer}, the know_sql / text-to-SQL format;
* "alpaca": {instruction, input, output} with the Stanford Alpaca template ("input" may be empty).

Sources: a local JSON (a list of rows) or JSONL file, or a folder of them; a Hugging Face hub
dataset id ("owner/name"), whose JSON/JSONL files are downloaded; or "builtin:sql" / "builtin:finance",
the generated datasets of qlora/sql_dataset.py / qlora/finance_dataset.py, which need no network.

Lengths. A row whose prompt alone fills sequence_len leaves no token to learn from: that is an
error naming the row (raise sequence_len or remove the row). A row whose completion does not fit
is cut at sequence_len (its EOS is lost) and counted in `truncated`.

Packing (sample_packing=True) concatenates whole rows, each ending in EOS, into sequences of at
most sequence_len tokens. Each row's prompt is still masked, so no label crosses a row boundary
(the first token of a row is its BOS, a prompt token). Nothing else is masked: a token still
attends to the earlier rows of its sequence and position ids run on across rows. That is the
usual cheap packing; it changes what the model sees, so it is off by default.
"""

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from qlora.loss import IGNORE_INDEX
from qlora.finance_dataset import finance_rows
from qlora.sql_dataset import sql_rows

BUILTIN_SQL = "builtin:sql"
BUILTIN_FINANCE = "builtin:finance"    # alpaca rows of qlora/finance_dataset.py, finance-alpaca's stand-in

CONTEXT_QA_PROMPT = ("SYSTEM: Use the following contextual information to concisely answer the question.\n\n"
                     "USER: {context}\n===\n{question}\nASSISTANT:")
ALPACA_PROMPT = ("Below is an instruction that describes a task, paired with an input that provides further "
                 "context. Write a response that appropriately completes the request.\n\n"
                 "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that appropriately "
                          "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n")

# the fields a row of each type must have (alpaca's "input" is optional)
REQUIRED_FIELDS = {"context_qa": ("context", "question", "answer"), "alpaca": ("instruction", "output")}


# ----------------------------------------------------------------------------- rows

def check_type(kind: str) -> None:
    if kind not in REQUIRED_FIELDS:
        raise ValueError(f"unknown dataset type {kind!r}: use one of {sorted(REQUIRED_FIELDS)}")


def check_rows(rows: list, kind: str, source: str) -> None:
    """Raise a ValueError naming the first row (1-based) that is not a row of type `kind`."""
    check_type(kind)
    if not rows:
        raise ValueError(f"dataset {source} holds no rows")
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise ValueError(f"row {number} of {source} is a {type(row).__name__}, not an object with "
                             f"fields {REQUIRED_FIELDS[kind]}")
        for name in REQUIRED_FIELDS[kind] + (("input",) if kind == "alpaca" and "input" in row else ()):
            if name not in row:
                raise ValueError(f"row {number} of {source} has no field {name!r} "
                                 f"({kind} rows need {', '.join(REQUIRED_FIELDS[kind])})")
            if not isinstance(row[name], str):
                raise ValueError(f"row {number} of {source}: field {name!r} is {type(row[name]).__name__}, "
                                 "expected a string")


def format_row(row: dict, kind: str) -> tuple[str, str]:
    """(prompt, completion) text of a row; the EOS token is added as an id, not as text."""
    if kind == "context_qa":
        return CONTEXT_QA_PROMPT.format(context=row["context"], question=row["question"]), " " + row["answer"]
    if kind == "alpaca":
        if row.get("input"):
            return ALPACA_PROMPT.format(instruction=row["instruction"], input=row["input"]), row["output"]
        return ALPACA_PROMPT_NO_INPUT.format(instruction=row["instruction"]), row["output"]
    check_type(kind)


def _read_json_file(path: Path) -> list:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as e:
            if not e.msg.startswith("Extra data"):  # "Extra data": JSON lines in a .json file
                raise ValueError(f"{path} is not valid JSON: {e}") from None
        else:
            if not isinstance(rows, list):
                raise ValueError(f"{path} holds a JSON {type(rows).__name__}; expected a list of rows")
            return rows
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path} line {number} is not valid JSON: {e}") from None
    return rows


def _download_from_hub(repo_id: str, data_files: list[str] | None) -> list[Path]:
    """The JSON/JSONL files of a hub dataset, downloaded (or found in the local cache)."""
    from huggingface_hub import snapshot_download

    patterns = data_files or ["*.json", "*.jsonl"]
    try:
        folder = snapshot_download(repo_id, repo_type="dataset", allow_patterns=patterns)
    except Exception as e:  # offline, unknown repository, network failure: all end here
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConnectionError(f"cannot get dataset {repo_id!r} from the Hugging Face hub ({reason}); when "
                              "offline, pass a local JSON/JSONL file or use builtin:sql") from None
    files = sorted(p for p in Path(folder).rglob("*") if p.suffix in (".json", ".jsonl"))
    if not files:
        raise ValueError(f"hub dataset {repo_id!r} has no JSON/JSONL files matching {patterns}: "
                         "convert it to JSONL and pass the local file")
    return files


def load_rows(path: str, data_files: list[str] | None = None) -> list[dict]:
    """Rows from a local JSON/JSONL file or folder, a hub dataset id, or builtin:sql."""
    if path == BUILTIN_SQL:
        return sql_rows()
    if path == BUILTIN_FINANCE:
        return finance_rows()
    local = Path(path)
    if local.is_dir():
        files = sorted(p for p in local.rglob("*") if p.suffix in (".json", ".jsonl"))
        if not files:
            raise FileNotFoundError(f"dataset folder {path} holds no .json or .jsonl files")
    elif local.is_file():
        files = [local]
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", path) and not local.suffix:
        files = _download_from_hub(path, data_files)
    else:
        raise FileNotFoundError(f"dataset {path!r} not found: pass a JSON/JSONL file, a hub dataset id "
                                f"(owner/name), {BUILTIN_SQL} or {BUILTIN_FINANCE}")
    return [row for f in files for row in _read_json_file(f)]


def split_train_val(items: list, val_set_size: float, seed: int) -> tuple[list, list]:
    """Random split: val_set_size < 1 is a fraction (rounded up), >= 1 a count. Orders are kept."""
    n = len(items)
    if val_set_size < 0:
        raise ValueError(f"val_set_size must be >= 0, got {val_set_size}")
    if val_set_size >= 1 and val_set_size != int(val_set_size):
        raise ValueError(f"val_set_size {val_set_size} >= 1 is a row count and must be whole")
    n_val = math.ceil(val_set_size * n) if val_set_size < 1 else int(val_set_size)
    if n_val >= n:
        raise ValueError(f"val_set_size {val_set_size} takes {n_val} of the {n} rows, leaving none to "
                         "train on: lower it")
    chosen = np.zeros(n, dtype=bool)
    chosen[np.random.default_rng(seed).permutation(n)[:n_val]] = True
    return [x for x, c in zip(items, chosen) if not c], [x for x, c in zip(items, chosen) if c]


# ----------------------------------------------------------------------------- tokens

@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX where no loss is taken


def pad_id_of(tokenizer) -> int:
    """The id to pad with: the tokenizer's pad id, or EOS where it has none (Llama's pad_id is -1).

    Padding goes on the right and its labels are IGNORE_INDEX, so under causal attention the id
    never influences a real token; it only has to be a valid embedding row.
    """
    pad = getattr(tokenizer, "pad_id", -1)
    return pad if pad is not None and pad >= 0 else tokenizer.eos_id


def tokenize_example(prompt: str, completion: str, tokenizer, train_on_inputs: bool = False) -> tuple[Example, int]:
    """(Example with BOS ... EOS, number of prompt tokens), not truncated.

    The whole text is encoded at once (so the boundary tokenizes as it will at inference) and the
    first len(encode(prompt)) labels are masked, as axolotl does.
    """
    n_prompt = len(tokenizer.encode(prompt, bos=True, eos=False))
    input_ids = list(tokenizer.encode(prompt + completion, bos=True, eos=True))
    labels = list(input_ids) if train_on_inputs else [IGNORE_INDEX] * n_prompt + input_ids[n_prompt:]
    return Example(input_ids, labels), n_prompt


def tokenize_rows(rows: list[dict], kind: str, tokenizer, sequence_len: int, train_on_inputs: bool = False,
                  source: str = "the dataset") -> tuple[list[Example], int]:
    """Examples of at most sequence_len tokens, and how many rows were cut short."""
    if sequence_len <= 0:
        raise ValueError(f"sequence_len must be > 0, got {sequence_len}")
    check_rows(rows, kind, source)
    examples, truncated = [], 0
    for number, row in enumerate(rows, start=1):
        example, n_prompt = tokenize_example(*format_row(row, kind), tokenizer, train_on_inputs)
        if n_prompt >= sequence_len:
            raise ValueError(f"row {number} of {source}: its prompt is {n_prompt} tokens, sequence_len "
                             f"{sequence_len} leaves no room for the answer: raise sequence_len or drop the row")
        if len(example.input_ids) > sequence_len:
            truncated += 1
            example = Example(example.input_ids[:sequence_len], example.labels[:sequence_len])
        examples.append(example)
    return examples, truncated


def pack(examples: list[Example], sequence_len: int) -> list[Example]:
    """Concatenate whole examples, in order, into sequences of at most sequence_len tokens."""
    packed, ids, labels = [], [], []
    for ex in examples:
        if ids and len(ids) + len(ex.input_ids) > sequence_len:
            packed.append(Example(ids, labels))
            ids, labels = [], []
        ids, labels = ids + ex.input_ids, labels + ex.labels
    if ids:
        packed.append(Example(ids, labels))
    return packed


@dataclass
class Data:
    """What training needs from the datasets, plus counts for the log."""
    train: list[Example]
    val: list[Example]
    val_rows: list[tuple[dict, str]] = field(default_factory=list)  # (row, type), for generation evals
    rows: int = 0                 # rows read, before the split
    truncated: int = 0            # rows (train + val) whose completion was cut at sequence_len
    train_tokens: int = 0         # real (non-pad) tokens in train
    train_label_tokens: int = 0   # tokens that carry a loss

    def summary(self) -> str:
        return (f"{self.rows} rows: {len(self.train)} train sequences, {len(self.val)} val; "
                f"{self.truncated} truncated; {self.train_tokens} train tokens, "
                f"{self.train_label_tokens} with a loss")


def prepare_data(datasets: list[dict], tokenizer, sequence_len: int, val_set_size: float = 0.0, seed: int = 0,
                 train_on_inputs: bool = False, sample_packing: bool = False) -> Data:
    """datasets: [{path, type, data_files?}] -> train/val Examples (train packed if asked)."""
    if not datasets:
        raise ValueError("no datasets given: pass at least one {path, type} (e.g. builtin:sql)")
    examples, rows, truncated = [], [], 0  # rows: (row, type), parallel to examples
    for spec in datasets:
        kind = spec.get("type", "context_qa")
        check_type(kind)
        loaded = load_rows(spec["path"], spec.get("data_files"))
        tokenized, cut = tokenize_rows(loaded, kind, tokenizer, sequence_len, train_on_inputs, spec["path"])
        examples += tokenized
        rows += [(row, kind) for row in loaded]
        truncated += cut
    train_ids, val_ids = split_train_val(list(range(len(examples))), val_set_size, seed)
    train, val = [examples[i] for i in train_ids], [examples[i] for i in val_ids]
    if sample_packing:
        train = pack(train, sequence_len)
    return Data(train=train, val=val, val_rows=[rows[i] for i in val_ids], rows=len(rows),
                truncated=truncated, train_tokens=sum(len(e.input_ids) for e in train),
                train_label_tokens=sum(sum(l != IGNORE_INDEX for l in e.labels) for e in train))


# ----------------------------------------------------------------------------- batches

def collate(examples: list[Example], pad_id: int, pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad to pad_to (or the longest example): input_ids, labels, attention_mask, all (B, T) int64."""
    longest = max(len(e.input_ids) for e in examples)
    length = pad_to or longest
    if longest > length:
        raise ValueError(f"an example has {longest} tokens, more than pad_to={length}")
    input_ids = torch.full((len(examples), length), pad_id, dtype=torch.long)          # (B, T)
    labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)       # (B, T)
    attention_mask = torch.zeros((len(examples), length), dtype=torch.long)            # (B, T)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}


class Batches:
    """Shuffled micro-batches, epoch after epoch, that can resume exactly where they stopped.

    Epoch e visits the examples in the order np.random.default_rng([seed, e]).permutation(n); the
    position is (epoch, index), index = examples of that epoch already served. The last batch of an
    epoch may be smaller. pad_to=sequence_len pads every batch to that length (pad_to_sequence_len);
    pad_to=None pads each batch to its longest example.
    """

    def __init__(self, examples: list[Example], micro_batch_size: int, seed: int = 0, pad_id: int = 0,
                 pad_to: int | None = None, shuffle: bool = True):
        if not examples:
            raise ValueError("no examples to batch: the dataset (or this split of it) is empty")
        if micro_batch_size <= 0:
            raise ValueError(f"micro_batch_size must be > 0, got {micro_batch_size}")
        self.examples, self.micro_batch_size, self.seed = examples, micro_batch_size, seed
        self.pad_id, self.pad_to, self.shuffle = pad_id, pad_to, shuffle
        self.epoch, self.index = 0, 0
        self._order_epoch, self._order = None, None

    def __len__(self) -> int:
        """Batches per epoch."""
        return math.ceil(len(self.examples) / self.micro_batch_size)

    def order(self, epoch: int) -> list[int]:
        if self._order_epoch != epoch:
            n = len(self.examples)
            self._order = np.random.default_rng([self.seed, epoch]).permutation(n).tolist() if self.shuffle \
                else list(range(n))
            self._order_epoch = epoch
        return self._order

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        if self.index >= len(self.examples):
            self.epoch, self.index = self.epoch + 1, 0
        chosen = self.order(self.epoch)[self.index: self.index + self.micro_batch_size]
        self.index += len(chosen)
        return collate([self.examples[i] for i in chosen], self.pad_id, self.pad_to)

    @property
    def epochs_done(self) -> float:
        """Fractional epochs served so far, e.g. 1.25."""
        return self.epoch + self.index / len(self.examples)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "num_examples": len(self.examples),
                "shuffle": self.shuffle}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("seed", "num_examples", "shuffle"):
            if state[key] != mine[key]:
                raise ValueError(f"cannot resume batches: saved {key}={state[key]!r} but now {mine[key]!r}; "
                                 "resume with the same data, seed and sequence settings")
        self.epoch, self.index = state["epoch"], state["index"]


def batches_in_order(examples: list[Example], micro_batch_size: int, pad_id: int, pad_to: int | None = None):
    """One pass over the examples in order (for validation), as collated batches."""
    for start in range(0, len(examples), micro_batch_size):
        yield collate(examples[start: start + micro_batch_size], pad_id, pad_to)
