"""Instruction data for fine-tuning: rows -> prompt and completion -> token ids and labels -> batches.

QLoRA (arXiv 2305.14314, section 5 and appendix B) trains on the response only: the loss is
computed on the completion tokens and the prompt's labels are masked. We do the same with
train_on_inputs=False (the default): prompt positions get label IGNORE_INDEX (-100), which
F.cross_entropy(ignore_index=-100) skips. Labels are aligned with input_ids, as in Hugging Face
models: the loss compares logits[:, :-1] with labels[:, 1:].

Row types: axolotl's names and prompt strings (qlora/prompts.py): context_qa (= context_qa.load),
context_qa.load_404, context_qa.load_v2 (know_sql's {context, question, answer}) and alpaca.

Sources: a local JSON (a list of rows) or JSONL file, or a folder of them; a Hugging Face hub
dataset id ("owner/name"), whose JSON/JSONL files are downloaded; or "builtin:sql" / "builtin:finance",
the generated datasets of qlora/sql_dataset.py / qlora/finance_dataset.py, which need no network.

Lengths. A row longer than sequence_len is dropped and counted in `dropped`, as axolotl drops it.

Packing (sample_packing=True) puts whole rows into sequences of at most sequence_len tokens and
keeps them apart, as axolotl's multipack does: positions restart at 0 in every row, attention
never crosses a row boundary (block-diagonal causal mask, qlora/attention.py) and no label is
predicted across one. A packed batch computes what its rows would compute one by one, in fewer,
fuller sequences (tests/test_packing.py).
"""

import bisect
import hashlib
import json
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from qlora.atomic import write_file
from qlora.errors import read_text
from qlora.loss import IGNORE_INDEX
from qlora.finance_dataset import finance_rows
from qlora.prompts import check_type, field_names, format_row, missing_field
from qlora.sql_dataset import sql_rows

BUILTIN_SQL = "builtin:sql"
BUILTIN_FINANCE = "builtin:finance"    # alpaca rows of qlora/finance_dataset.py, finance-alpaca's stand-in
BUILTINS = {BUILTIN_SQL: sql_rows, BUILTIN_FINANCE: finance_rows}    # generated rows, no files


# ----------------------------------------------------------------------------- rows

def check_rows(rows: list, kind: str, source: str) -> None:
    """Raise a ValueError naming the first row (1-based) that is not a row of type `kind`."""
    check_type(kind)
    if not rows:
        raise ValueError(f"dataset {source} holds no rows")
    for number, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise ValueError(f"row {number} of {source} is a {type(row).__name__}, not an object with "
                             f"fields {field_names(kind)}")
        missing = missing_field(row, kind)
        if missing:
            raise ValueError(f"row {number} of {source} has no field {missing!r} "
                             f"({kind} rows need {', '.join(field_names(kind))})")
        for name in [n for n in ("article", "context", "question", "answer", "unanswerable_question",
                                 "instruction", "input", "output") if n in row]:
            if not isinstance(row[name], str):
                raise ValueError(f"row {number} of {source}: field {name!r} is {type(row[name]).__name__}, "
                                 "expected a string")


def _read_json_file(path: Path) -> list:
    text = read_text(path, "dataset")
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


# The words that name a split in a file name, as the datasets library reads a repository's files
# (datasets/data_files.py): "validation" also matches valid/val/dev, e.g. data/dev-00000.jsonl.
SPLIT_WORDS = {"train": ("train", "training"), "validation": ("validation", "valid", "val", "dev"),
               "test": ("test", "testing", "eval", "evaluation")}


def split_files(files: list[Path], split: str, root: Path) -> list[Path]:
    """The files of `split` (train_on_split): those whose path below root names it."""
    words = SPLIT_WORDS.get(split, (split,))
    pattern = re.compile(r"(^|[-._ /0-9])(" + "|".join(map(re.escape, words)) + r")([-._ /0-9]|$)")
    chosen = [f for f in files if pattern.search(str(f.relative_to(root).with_suffix("")).lower())]
    if not chosen:
        raise ValueError(f"train_on_split {split!r}: no file of {root} names that split "
                         f"({[str(f.relative_to(root)) for f in files][:5]}): pick another split or the file")
    return chosen


def source_files(path: str, data_files: list[str] | None = None, split: str | None = None) -> list[Path]:
    """The JSON/JSONL files of a local file or folder or a hub dataset id (only `split`'s, if given)."""
    local = Path(path)
    if local.is_file():
        return [local]                       # one file is one split: train_on_split keeps it whole
    if local.is_dir():
        files = sorted(p for p in local.rglob("*") if p.suffix in (".json", ".jsonl"))
        if not files:
            raise FileNotFoundError(f"dataset folder {path} holds no .json or .jsonl files")
        root = local
    elif re.fullmatch(r"[\w.-]+/[\w.-]+", path) and not local.suffix:
        files = _download_from_hub(path, data_files)
        root = Path(os.path.commonpath([f.parent for f in files])) if len(files) > 1 else files[0].parent
    else:
        raise FileNotFoundError(f"dataset {path!r} not found: pass a JSON/JSONL file, a hub dataset id "
                                f"(owner/name), {BUILTIN_SQL} or {BUILTIN_FINANCE}")
    return split_files(files, split, root) if split and len(files) > 1 else files


def load_rows(path: str, data_files: list[str] | None = None, split: str | None = None) -> list[dict]:
    """Rows from a local JSON/JSONL file or folder, a hub dataset id, builtin:sql or builtin:finance.

    split (axolotl's train_on_split): of a folder or hub dataset with several files, only the files
    that name that split (SPLIT_WORDS); a single file is used whole.
    """
    if path in BUILTINS:
        return BUILTINS[path]()
    return [row for f in source_files(path, data_files, split) for row in _read_json_file(f)]


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
    labels: list[int]                  # IGNORE_INDEX where no loss is taken
    seq_lens: list[int] | None = None  # packed: the lengths of its rows, in order; None: one row


def pad_id_of(tokenizer) -> int:
    """The id to pad with: the tokenizer's pad id, or EOS where it has none (Llama's pad_id is -1).

    Padding goes on the right and its labels are IGNORE_INDEX, so under causal attention the id
    never influences a real token; it only has to be a valid embedding row.
    """
    pad = getattr(tokenizer, "pad_id", -1)
    return pad if pad is not None and pad >= 0 else tokenizer.eos_id


def tokenize_example(prompt: str, response: str, tokenizer, train_on_inputs: bool = False) -> tuple[Example, int]:
    """(Example [BOS] prompt response [EOS], number of prompt tokens), as axolotl tokenizes a row.

    The prompt and the response are encoded separately and concatenated (axolotl's
    InstructionPromptTokenizingStrategy): [BOS] + encode(prompt), encode(response) + [EOS]. The
    prompt's labels are masked unless train_on_inputs.
    """
    prompt_ids = tokenizer.encode(prompt, bos=True, eos=False)
    response_ids = tokenizer.encode(response, bos=False, eos=True)
    input_ids = list(prompt_ids) + list(response_ids)
    labels = list(input_ids) if train_on_inputs else [IGNORE_INDEX] * len(prompt_ids) + list(response_ids)
    return Example(input_ids, labels), len(prompt_ids)


def tokenize_rows(rows: list[dict], kind: str, tokenizer, sequence_len: int, train_on_inputs: bool = False,
                  source: str = "the dataset") -> tuple[list[Example | None], int]:
    """One Example per row, None for a row longer than sequence_len; and how many those were.

    Long rows are dropped, not cut, as axolotl drops them (utils/trainer.py drop_long_seq): a cut
    row would teach an answer without its end.
    """
    if sequence_len <= 0:
        raise ValueError(f"sequence_len must be > 0, got {sequence_len}")
    check_rows(rows, kind, source)
    examples, dropped = [], 0
    for row in rows:
        example, _ = tokenize_example(*format_row(row, kind), tokenizer, train_on_inputs)
        if len(example.input_ids) > sequence_len:
            dropped += 1
            example = None
        examples.append(example)
    return examples, dropped


def pack(examples: list[Example], sequence_len: int) -> list[Example]:
    """Pack whole rows into sequences of at most sequence_len tokens, kept apart (sample_packing).

    Bins by best-fit decreasing (longest row first, into the fullest sequence it fits; first-fit
    decreasing's sibling, within 11/9 of the fewest sequences + 1). Within a sequence the rows keep
    their dataset order, and `seq_lens` records their lengths: collate turns them into positions that
    restart at 0 per row and segment ids for the block-diagonal attention mask (qlora/attention.py).
    Each row's first label is masked: it would be predicted from the previous row's last token.
    """
    order = sorted(range(len(examples)), key=lambda i: -len(examples[i].input_ids))
    bins, free = [], []                 # bins[j]: example indices; free: sorted (room left, j)
    for i in order:
        n = len(examples[i].input_ids)
        if n > sequence_len:
            raise ValueError(f"an example has {n} tokens, more than sequence_len={sequence_len}")
        at = bisect.bisect_left(free, (n, -1))
        if at == len(free):
            bins.append([i])
            bisect.insort(free, (sequence_len - n, len(bins) - 1))
        else:
            room, j = free.pop(at)
            bins[j].append(i)
            bisect.insort(free, (room - n, j))
    packed = []
    for members in bins:
        ids, labels, lens = [], [], []
        for i in sorted(members):
            e = examples[i]
            ids += e.input_ids
            labels += [IGNORE_INDEX] + e.labels[1:]
            lens.append(len(e.input_ids))
        packed.append(Example(ids, labels, lens))
    return packed


@dataclass
class Data:
    """What training needs from the datasets, plus counts for the log."""
    train: list[Example]
    val: list[Example]
    val_rows: list[tuple[dict, str]] = field(default_factory=list)  # (row, type), for generation evals
    rows: int = 0                 # rows read, before the split
    dropped: int = 0              # rows (train + val) longer than sequence_len, left out
    train_tokens: int = 0         # real (non-pad) tokens in train
    train_label_tokens: int = 0   # tokens that carry a loss
    train_rows: int = 0           # rows in train (fewer sequences when packed)
    empty_answers: int = 0        # rows whose response is blank (only EOS left to learn)

    def summary(self) -> str:
        packed = f" (packed from {self.train_rows} rows)" if self.train_rows != len(self.train) else ""
        return (f"{self.rows} rows: {len(self.train)} train sequences{packed}, {len(self.val)} val; "
                f"{self.dropped} longer than sequence_len dropped; {self.train_tokens} train tokens, "
                f"{self.train_label_tokens} with a loss")


def prepare_data(datasets: list[dict], tokenizer, sequence_len: int, val_set_size: float = 0.0, seed: int = 0,
                 train_on_inputs: bool = False, sample_packing: bool = False) -> Data:
    """datasets: [{path, type, data_files?, train_on_split?}] -> train/val Examples (train packed if asked).

    As axolotl: rows are split into train and val (val_set_size), then rows longer than
    sequence_len are dropped from both.
    """
    if not datasets:
        raise ValueError("no datasets given: pass at least one {path, type} (e.g. builtin:sql)")
    examples, rows, dropped, empty = [], [], 0, 0  # rows: (row, type), parallel to examples
    for spec in datasets:
        kind = spec.get("type", "context_qa")
        check_type(kind)
        loaded = load_rows(spec["path"], spec.get("data_files"), spec.get("train_on_split"))
        tokenized, n_long = tokenize_rows(loaded, kind, tokenizer, sequence_len, train_on_inputs, spec["path"])
        examples += tokenized
        rows += [(row, kind) for row in loaded]
        dropped += n_long
        empty += sum(not format_row(row, kind)[1].strip() for row in loaded)
    train_ids, val_ids = split_train_val(list(range(len(examples))), val_set_size, seed)
    train_ids = [i for i in train_ids if examples[i] is not None]
    val_ids = [i for i in val_ids if examples[i] is not None]
    if not train_ids:
        raise ValueError(f"every training row is longer than sequence_len {sequence_len}: raise sequence_len")
    train, val = [examples[i] for i in train_ids], [examples[i] for i in val_ids]
    n_train_rows = len(train)
    if sample_packing:
        train = pack(train, sequence_len)
    return Data(train=train, val=val, val_rows=[rows[i] for i in val_ids], rows=len(rows), dropped=dropped,
                train_tokens=sum(len(e.input_ids) for e in train),
                train_label_tokens=sum(sum(l != IGNORE_INDEX for l in e.labels[1:]) for e in train),
                train_rows=n_train_rows, empty_answers=empty)


def fingerprint(datasets: list[dict], **settings) -> str:
    """A hash of what a prepared dataset depends on: each source's bytes, its type and split, and
    `settings` (tokenizer bytes, sequence_len, ...); the name of its dataset_prepared_path entry."""
    h = hashlib.sha256(json.dumps([{k: str(v) for k, v in sorted(spec.items())} for spec in datasets]).encode())
    for spec in datasets:
        if spec["path"] not in BUILTINS:
            for f in source_files(spec["path"], spec.get("data_files"), spec.get("train_on_split")):
                h.update(f.read_bytes())
    for key, value in sorted(settings.items()):
        h.update(key.encode() + b"=" + (value if isinstance(value, bytes) else repr(value).encode()))
    return h.hexdigest()[:16]


def prepare_data_cached(prepared_path: str | Path | None, key: str, make) -> tuple[Data, str]:
    """make() -> Data, kept in prepared_path/<key>.pt (axolotl's dataset_prepared_path) and reused
    when the same key comes again. Returns (data, where it came from) for the log."""
    if not prepared_path:
        return make(), "tokenized"
    path = Path(prepared_path) / f"{key}.pt"
    if path.is_file():
        state = torch.load(path, weights_only=False)
        return Data(**{**state, "train": [Example(**e) for e in state["train"]],
                       "val": [Example(**e) for e in state["val"]]}), f"read from {path}"
    data = make()
    state = {**vars(data), "train": [vars(e) for e in data.train], "val": [vars(e) for e in data.val]}
    write_file(path, lambda tmp: torch.save(state, tmp))   # never a half-written cache entry
    return data, f"tokenized, saved to {path}"


# ----------------------------------------------------------------------------- batches

def collate(examples: list[Example], pad_id: int, pad_to: int | None = None) -> dict[str, torch.Tensor]:
    """Right-pad to pad_to (or the longest example): input_ids, labels, attention_mask, all (B, T) int64.

    With packed examples also position_ids (restarting at 0 in every row) and segment_ids (the row
    each token belongs to; padding is a segment of its own), (B, T) int64, for Llama.forward.
    """
    longest = max(len(e.input_ids) for e in examples)
    length = pad_to or longest
    if longest > length:
        raise ValueError(f"an example has {longest} tokens, more than pad_to={length}")
    B = len(examples)
    input_ids = torch.full((B, length), pad_id, dtype=torch.long)          # (B, T)
    labels = torch.full((B, length), IGNORE_INDEX, dtype=torch.long)       # (B, T)
    attention_mask = torch.zeros((B, length), dtype=torch.long)            # (B, T)
    for i, e in enumerate(examples):
        n = len(e.input_ids)
        input_ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        attention_mask[i, :n] = 1
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask}
    if any(e.seq_lens is not None for e in examples):
        position_ids = torch.zeros((B, length), dtype=torch.long)          # (B, T)
        segment_ids = torch.zeros((B, length), dtype=torch.long)           # (B, T)
        for i, e in enumerate(examples):
            lens = e.seq_lens or [len(e.input_ids)]
            lens = lens + [length - sum(lens)] * (sum(lens) < length)       # the padding: one more segment
            position_ids[i] = torch.cat([torch.arange(n) for n in lens])
            segment_ids[i] = torch.repeat_interleave(torch.arange(len(lens)), torch.tensor(lens))
        batch.update(position_ids=position_ids, segment_ids=segment_ids)
    return batch


class Batches:
    """Shuffled micro-batches, epoch after epoch, that can resume exactly where they stopped.

    Epoch e visits the examples in the order np.random.default_rng([seed, e]).permutation(n); the
    position is (epoch, index), index = examples of that epoch already served. The last batch of an
    epoch may be smaller. pad_to=sequence_len pads every batch to that length (pad_to_sequence_len);
    pad_to=None pads each batch to its longest example. group_by_length (as transformers'
    LengthGroupedSampler): the shuffled order is cut into groups of 50 micro-batches, each sorted
    longest first, so a micro-batch holds rows of similar length and pads little.
    """

    def __init__(self, examples: list[Example], micro_batch_size: int, seed: int = 0, pad_id: int = 0,
                 pad_to: int | None = None, shuffle: bool = True, group_by_length: bool = False):
        if not examples:
            raise ValueError("no examples to batch: the dataset (or this split of it) is empty")
        if micro_batch_size <= 0:
            raise ValueError(f"micro_batch_size must be > 0, got {micro_batch_size}")
        self.examples, self.micro_batch_size, self.seed = examples, micro_batch_size, seed
        self.pad_id, self.pad_to, self.shuffle, self.group_by_length = pad_id, pad_to, shuffle, group_by_length
        self.epoch, self.index = 0, 0
        self._order_epoch, self._order = None, None

    def __len__(self) -> int:
        """Batches per epoch."""
        return math.ceil(len(self.examples) / self.micro_batch_size)

    def order(self, epoch: int) -> list[int]:
        if self._order_epoch != epoch:
            n = len(self.examples)
            order = np.random.default_rng([self.seed, epoch]).permutation(n).tolist() if self.shuffle \
                else list(range(n))
            if self.group_by_length:
                group = 50 * self.micro_batch_size
                order = [i for start in range(0, n, group) for i in
                         sorted(order[start:start + group], key=lambda i: -len(self.examples[i].input_ids))]
            self._order, self._order_epoch = order, epoch
        return self._order

    def __iter__(self):
        return self

    def _take(self) -> list[int]:
        """The example indices of the next micro-batch; the position moves past them."""
        if self.index >= len(self.examples):
            self.epoch, self.index = self.epoch + 1, 0
        chosen = self.order(self.epoch)[self.index: self.index + self.micro_batch_size]
        self.index += len(chosen)
        return chosen

    def __next__(self) -> dict[str, torch.Tensor]:
        return collate([self.examples[i] for i in self._take()], self.pad_id, self.pad_to)

    def skip(self, n: int) -> None:
        """Move past the next n micro-batches without collating them (those other ranks take)."""
        for _ in range(n):
            self._take()

    @property
    def epochs_done(self) -> float:
        """Fractional epochs served so far, e.g. 1.25."""
        return self.epoch + self.index / len(self.examples)

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "num_examples": len(self.examples),
                "shuffle": self.shuffle, "group_by_length": self.group_by_length}

    def load_state_dict(self, state: dict) -> None:
        mine = self.state_dict()
        for key in ("seed", "num_examples", "shuffle", "group_by_length"):
            if state.get(key, False) != mine[key]:
                raise ValueError(f"cannot resume batches: saved {key}={state.get(key)!r} but now {mine[key]!r}; "
                                 "resume with the same data, seed and sequence settings")
        self.epoch, self.index = state["epoch"], state["index"]


def batches_in_order(examples: list[Example], micro_batch_size: int, pad_id: int, pad_to: int | None = None):
    """One pass over the examples in order (for validation), as collated batches."""
    for start in range(0, len(examples), micro_batch_size):
        yield collate(examples[start: start + micro_batch_size], pad_id, pad_to)
