"""The Llama 2 tokenizer: a sentencepiece BPE model (tokenizer.model), used as Meta's reference code does;
and BPETokenizer, a tokenizer.json (Falcon's byte-level BPE) through Hugging Face's `tokenizers`.

Text is encoded as plain text: a literal "<s>" in a prompt stays the characters "<", "s", ">" and
never becomes the BOS id (transformers' tokenizer turns it into BOS; sentencepiece and Meta's code
do not). BOS/EOS are added only through the `bos` / `eos` flags.
"""

import json
import tempfile
from pathlib import Path

import sentencepiece as spm
from sentencepiece import SentencePieceProcessor

from qlora.atomic import write_bytes, write_text


class Tokenizer:
    def __init__(self, model_path):
        model_path = Path(model_path)
        if not model_path.is_file():
            raise FileNotFoundError(f"tokenizer model {model_path} does not exist: pass the path of a "
                                    f"sentencepiece tokenizer.model (it comes with Llama 2 checkpoints)")
        self.sp = SentencePieceProcessor()
        try:
            self.sp.Load(str(model_path))
        except (RuntimeError, OSError) as e:
            raise ValueError(f"{model_path} is not a sentencepiece model ({e}): pass a tokenizer.model file") from e
        self.path = model_path
        self.vocab_size: int = self.sp.vocab_size()
        self.bos_id: int = self.sp.bos_id()
        self.eos_id: int = self.sp.eos_id()
        self.pad_id: int = self.sp.pad_id()  # -1 for Llama 2: it has no padding token

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Text -> token ids, with BOS in front / EOS at the end when asked."""
        if not isinstance(text, str):
            raise ValueError(f"encode takes a str, got {type(text).__name__}")
        return [self.bos_id] * bos + self.sp.encode(text) + [self.eos_id] * eos

    def decode(self, ids: list[int]) -> str:
        """Token ids -> text. BOS, EOS and other control ids decode to nothing."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        return self.sp.decode(ids)

    def files(self) -> dict[str, bytes]:
        """The file that makes this tokenizer, to copy beside an adapter or an exported model."""
        return {"tokenizer.model": self.sp.serialized_model_proto()}

    def special_tokens(self) -> dict[str, str | None]:
        """The bos/eos/unk/pad tokens as strings (None: the tokenizer has none), by axolotl's key names."""
        ids = {"bos_token": self.bos_id, "eos_token": self.eos_id, "unk_token": self.sp.unk_id(), "pad_token": self.pad_id}
        return {key: self.sp.id_to_piece(i) if i >= 0 else None for key, i in ids.items()}


def train_tokenizer(texts: list[str], vocab_size: int, out_path: str | Path) -> Path:
    """Train a BPE sentencepiece model on `texts` with Llama's special ids (unk 0, bos 1, eos 2)."""
    out_path = Path(out_path)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus.txt"
        corpus.write_text("\n".join(t.replace("\n", " ") for t in texts))
        spm.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=str(Path(tmp) / "tok"), vocab_size=vocab_size,
            model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1, byte_fallback=True,
            character_coverage=1.0, num_threads=2, minloglevel=2)
        write_bytes(out_path, (Path(tmp) / "tok.model").read_bytes())
    return out_path


# ----------------------------------------------------------------------------- byte-level BPE (tokenizer.json)

TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")   # sentencepiece (Llama 2), byte-level BPE (Falcon)
ENDOFTEXT = "<|endoftext|>"                               # Falcon's (and GPT-2's) end-of-text token


class BPETokenizer:
    """A Hugging Face tokenizer.json (Falcon's byte-level BPE; Llama 3's too), run by the `tokenizers`
    library, behind the interface of Tokenizer above: encode(text, bos, eos), decode, the special ids.

    The special tokens are those tokenizer_config.json beside the file names (bos_token, eos_token,
    pad_token), as transformers reads them; a missing one has id None (pad) or adds nothing (bos:
    Falcon's tokenizer has no BOS and transformers puts none in front). As with sentencepiece above,
    text is plain text: a literal "<|endoftext|>" in a prompt stays characters (encode_special_tokens),
    and special ids enter only through the bos / eos flags.
    """

    def __init__(self, path):
        from tokenizers import Tokenizer as HFTokenizer

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"tokenizer file {path} does not exist: pass the tokenizer.json of the checkpoint")
        try:
            self.tk = HFTokenizer.from_file(str(path))
        except Exception as e:  # the library raises its own Exception subclass for a bad file
            raise ValueError(f"{path} is not a Hugging Face tokenizer.json ({e}): pass the checkpoint's "
                             "tokenizer.json") from None
        self.tk.encode_special_tokens = True
        self.path = path
        self.config_path = path.with_name("tokenizer_config.json")
        special = json.loads(self.config_path.read_text()) if self.config_path.is_file() else {}
        self.vocab_size: int = self.tk.get_vocab_size(with_added_tokens=True)
        self.bos_id = self._id(special.get("bos_token"))
        self.eos_id = self._id(special.get("eos_token") or ENDOFTEXT)
        self.pad_id = self._id(special.get("pad_token"))
        self.unk_id = self._id(special.get("unk_token"))
        if self.eos_id is None:
            raise ValueError(f"{path} has no end-of-text token (no eos_token in {self.config_path.name} and no "
                             f"{ENDOFTEXT!r}): add tokenizer_config.json with an eos_token")

    def _id(self, token) -> int | None:
        if isinstance(token, dict):                       # {"content": "<|endoftext|>", ...}
            token = token.get("content")
        return None if token is None else self.tk.token_to_id(token)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        """Text -> token ids, BOS in front (if the tokenizer has one) / EOS at the end when asked."""
        if not isinstance(text, str):
            raise ValueError(f"encode takes a str, got {type(text).__name__}")
        ids = self.tk.encode(text, add_special_tokens=False).ids
        return [self.bos_id] * (bos and self.bos_id is not None) + ids + [self.eos_id] * eos

    def decode(self, ids: list[int]) -> str:
        """Token ids -> text. Special ids (EOS, ...) decode to nothing."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is outside the vocabulary [0, {self.vocab_size})")
        return self.tk.decode(ids, skip_special_tokens=True)

    def files(self) -> dict[str, bytes]:
        """The files that make this tokenizer, to copy beside an adapter or an exported model."""
        out = {self.path.name: self.path.read_bytes()}
        if self.config_path.is_file():
            out[self.config_path.name] = self.config_path.read_bytes()
        return out

    def special_tokens(self) -> dict[str, str | None]:
        """The bos/eos/unk/pad tokens as strings (None: the tokenizer has none), by axolotl's key names."""
        ids = {"bos_token": self.bos_id, "eos_token": self.eos_id, "unk_token": self.unk_id, "pad_token": self.pad_id}
        return {key: None if i is None else self.tk.id_to_token(i) for key, i in ids.items()}


def load_tokenizer(path) -> "Tokenizer | BPETokenizer":
    """tokenizer.model -> Tokenizer (sentencepiece); tokenizer.json -> BPETokenizer; a directory: the
    first of those two it holds."""
    path = Path(path)
    if path.is_dir():
        found = [path / name for name in TOKENIZER_FILES if (path / name).is_file()]
        if not found:
            raise FileNotFoundError(f"no {' or '.join(TOKENIZER_FILES)} in {path}: pass --tokenizer PATH")
        path = found[0]
    return BPETokenizer(path) if path.suffix == ".json" else Tokenizer(path)


def train_bpe_tokenizer(texts: list[str], vocab_size: int, out_dir) -> Path:
    """Train a byte-level BPE on `texts` laid out as Falcon's tokenizer.json is (punctuation split,
    GPT-2 byte level, digits one by one; <|endoftext|> id 0) and write tokenizer.json and
    tokenizer_config.json into out_dir (each renamed into place whole); returns tokenizer.json's path."""
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Punctuation(),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
                                                pre_tokenizers.Digits(individual_digits=True)])
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[ENDOFTEXT], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(texts, trainer)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {"eos_token": ENDOFTEXT, "tokenizer_class": "PreTrainedTokenizerFast", "add_prefix_space": False}
    write_text(out_dir / "tokenizer_config.json", json.dumps(config, indent=2) + "\n")
    write_text(out_dir / "tokenizer.json", tk.to_str())
    return out_dir / "tokenizer.json"
