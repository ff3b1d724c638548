"""The Llama 2 tokenizer: a sentencepiece BPE model (tokenizer.model), used as Meta's reference code does.

Text is encoded as plain text: a literal "<s>" in a prompt stays the characters "<", "s", ">" and
never becomes the BOS id (transformers' tokenizer turns it into BOS; sentencepiece and Meta's code
do not). BOS/EOS are added only through the `bos` / `eos` flags.
"""

import tempfile
from pathlib import Path

import sentencepiece as spm
from sentencepiece import SentencePieceProcessor

from qlora.atomic import write_bytes


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
