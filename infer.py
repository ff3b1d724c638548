"""Generate with a (4-bit) Llama or Falcon plus a LoRA adapter; merge and export; score generated SQL.

    python infer.py --adapter out/demo/adapter --context "CREATE TABLE head (age INTEGER)" \\
                    --question "How many heads are older than 56?"          # streamed answer
    python infer.py --adapter out/demo/adapter --eval rows.jsonl            # exact match + runs on schema
    python infer.py --adapter out/demo/adapter --export merged/             # merged bf16 HF checkpoint
    python infer.py --adapter out/demo/adapter --export merged4/ --4bit     # merged, NF4 (bitsandbytes format)
    python infer.py --base meta-llama/Llama-2-7b-hf --prompt "Hello"             # no adapter
    python infer.py --adapter out/tiny-falcon/adapter \
                    --instruction "How do I figure out how much money I need to retire?"   # alpaca format

The base defaults to the adapter's base_model_name_or_path; its config.json's model_type picks the
architecture. train.py leaves training_config.json and the tokenizer (tokenizer.model, or Falcon's
tokenizer.json + tokenizer_config.json) beside the adapter's PEFT files: the prompt format (the
dataset type it was trained on: context_qa, context_qa.load_v2, alpaca, ...; qlora/prompts.py), the
tokenizer and, for the demo, the seed of the random base come from there; the format used is
printed. A PEFT adapter without them works too; then pass --tokenizer if the base has no tokenizer.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

from falcon.load import load_base
from llama.generate import TextStream, generate
from llama.load import config_path, is_random_base, model_dir
from llama.tokenizer import TOKENIZER_FILES, load_tokenizer
from qlora.config import TrainConfig
from qlora import progress
from qlora.data import BUILTIN_SQL, check_rows, load_rows
from qlora.adapter import load_adapter, merged_state_dict, read_adapter_config, save_merged
from qlora.prompts import QA_TYPES, format_row, sql_prompt, strip_response_prefix
from qlora.sql_eval import score
from qlora.errors import read_json, read_text, run_cli
from qlora.trainer import pick_device

TRAINING_CONFIG = "training_config.json"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help gives each option's default, where it has one to show (not None, "", or a flag's False)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == "":
            return action.help
        return super()._get_help_string(action)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    p.add_argument("--base", help="base model: checkpoint dir, hub id or (demo) config.json; "
                                  "default: the adapter's base_model_name_or_path")
    p.add_argument("--adapter", help="adapter directory (ours or PEFT's: the same files)")
    p.add_argument("--tokenizer", help="tokenizer.model or tokenizer.json; default: beside the adapter, else the base's")
    p.add_argument("--bf16", action="store_true",
                   help="load the base unquantized (bf16 on a GPU, fp32 on the CPU) instead of NF4")
    p.add_argument("--merge", action="store_true",
                   help="fold the adapter into dense weights before generating (W + s*BA, no LoRA step)")
    p.add_argument("--export", help="write the merged model as a Hugging Face safetensors checkpoint here")
    p.add_argument("--4bit", dest="export_4bit", action="store_true",
                   help="with --export: store the merged linear weights in NF4, in bitsandbytes' format "
                        "(transformers + bitsandbytes load it; so does this project)")
    p.add_argument("--prompt", help="raw prompt text (no template); streamed")
    p.add_argument("--prompts", help="a file of raw prompts, one per line, generated in batches")
    p.add_argument("--context", default="", help="context_qa: the CREATE TABLE context")
    p.add_argument("--question", help="context_qa: the question")
    p.add_argument("--instruction", help="alpaca: the instruction")
    p.add_argument("--input", default="", help="alpaca: the input")
    p.add_argument("--interactive", action="store_true",
                   help="read prompts from stdin (context_qa: CONTEXT ||| QUESTION; alpaca: the instruction)")
    p.add_argument("--eval", help="JSON/JSONL rows {context, question, answer}, or builtin:sql: score generated SQL")
    p.add_argument("--eval_limit", type=int, default=0, help="score only the first N rows (0: all)")
    p.add_argument("--batch_size", type=int, default=8, help="prompts generated together (--prompts, --eval)")
    p.add_argument("--max_new_tokens", type=int, default=128, help="stop each completion after this many tokens")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy)")
    p.add_argument("--top_p", type=float, default=1.0, help="nucleus sampling: keep the smallest set of tokens "
                                                           "with this much probability (1: all)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--eager", action="store_true",
                   help="on a GPU, run the decode step eagerly instead of replaying it as a CUDA graph "
                        "(the graph gives the same tokens, 5x faster on an H100: docs/benchmarks.md)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    args = p.parse_args(argv)

    # Check what the user typed here, before minutes of loading.
    for name in ("prompt", "question", "instruction"):
        if getattr(args, name) is not None and not getattr(args, name).strip():
            raise ValueError(f"empty prompt: --{name} is blank; give it some text")
    if args.prompt is not None and (args.question is not None or args.instruction is not None):
        raise ValueError("--prompt is raw text: leave out --question/--instruction (or drop --prompt)")
    if args.question is not None and args.instruction is not None:
        raise ValueError("--question (context_qa) and --instruction (alpaca) are two prompt formats: pick one")
    if not any([args.prompt, args.prompts, args.question, args.instruction, args.interactive, args.eval,
                args.export]):
        raise ValueError("nothing to do: pass --prompt, --prompts FILE, --context/--question, --instruction, "
                         "--interactive, --eval FILE or --export DIR")
    export = Path(args.export) if args.export else None
    if args.export_4bit and not export:
        raise ValueError("--4bit applies to --export: pass --export DIR too")
    if export and export.exists() and (not export.is_dir() or any(export.iterdir())):
        raise ValueError(f"--export {export} exists and is not an empty directory: choose a new one or remove it")
    if args.batch_size < 1 or args.max_new_tokens < 1 or args.eval_limit < 0:
        raise ValueError(f"need --batch_size >= 1, --max_new_tokens >= 1, --eval_limit >= 0; got "
                         f"{args.batch_size}, {args.max_new_tokens}, {args.eval_limit}")
    return args


def find_tokenizer(args, base: str):
    """--tokenizer, else the one train.py left beside the adapter, else the base checkpoint's."""
    if args.tokenizer:
        if not Path(args.tokenizer).exists():
            raise FileNotFoundError(f"no {' or '.join(TOKENIZER_FILES)} at {args.tokenizer}: pass --tokenizer PATH")
        return load_tokenizer(args.tokenizer)
    candidates = [Path(args.adapter)] if args.adapter else []
    if not is_random_base(base):
        candidates.append(model_dir(base))
    for directory in candidates:
        if any((directory / name).is_file() for name in TOKENIZER_FILES):
            return load_tokenizer(directory)
    raise FileNotFoundError(f"no {' or '.join(TOKENIZER_FILES)} in {[str(c) for c in candidates]}: "
                            "pass --tokenizer PATH")


def merged_model(model: nn.Module) -> nn.Module:
    """The same architecture with dense linear weights dequant(W) + s * B A (QLoRA eq. 5 folded in)."""
    weight = model.lm_head.weight
    with torch.device("meta"):
        merged = type(model)(model.config)
    # The embedding's name if lm_head is tied to it: assign=True gives each key its own parameter.
    tied = next((n for n, p in merged.named_parameters() if p is merged.lm_head.weight and n != "lm_head.weight"), None)
    merged.load_state_dict(merged_state_dict(model, weight.dtype, weight.device), assign=True)
    if tied:
        merged.lm_head.weight = merged.get_parameter(tied)
    merged.inv_freq = model.inv_freq                       # not in the state dict
    return merged.eval()


def alpaca_prompt(instruction: str, input: str = "") -> str:
    return format_row({"instruction": instruction, "input": input, "output": ""}, "alpaca")[0]


def interactive_prompt(line: str, kind: str | None) -> str:
    """A line typed at --interactive in the adapter's format (raw text when it has none)."""
    if kind == "alpaca":
        return alpaca_prompt(line)
    if kind in QA_TYPES and "|||" in line:
        context, question = line.split("|||", 1)
        return sql_prompt(kind, context.strip(), question.strip())
    return line


def main(argv=None) -> int:
    return run_cli(run, argv)   # bad input: one line naming the problem and the fix (--debug: traceback)


def run(argv=None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # fp32 is the fast CPU dtype

    # ---- the adapter's files: PEFT's config, and what train.py keeps beside it
    adapter_cfg, train_cfg = {}, {}
    if args.adapter:
        if not Path(args.adapter).is_dir():
            raise FileNotFoundError(f"adapter directory {args.adapter} not found: pass the adapter/ folder "
                                    "train.py wrote (or a PEFT save_pretrained folder)")
        adapter_cfg = read_adapter_config(args.adapter)
        if (Path(args.adapter) / TRAINING_CONFIG).is_file():
            train_cfg = read_json(Path(args.adapter) / TRAINING_CONFIG, "training config")
    trained_on = adapter_cfg.get("base_model_name_or_path")
    base = args.base or trained_on
    if not base:
        raise ValueError("no base model: pass --base (the adapter names none)")
    if args.base and trained_on and Path(args.base) != Path(trained_on):
        print(f"note: the adapter was trained on {trained_on}, loading it on {args.base}", file=sys.stderr)
    # The prompt format: the dataset type the adapter was trained on (its training_config.json).
    kind = train_cfg.get("datasets", [{}])[0].get("type", "context_qa") if train_cfg else None
    if kind == "alpaca" and (args.question is not None or args.eval):
        raise ValueError("this adapter was trained on alpaca prompts: use --instruction/--input "
                         "(--context/--question and --eval are for context_qa SQL adapters)")
    if kind in QA_TYPES and args.instruction is not None:
        raise ValueError(f"this adapter was trained on {kind} prompts: use --context/--question")
    qa_kind = kind if kind in QA_TYPES else "context_qa"        # no training_config.json: context_qa
    if args.question is not None or args.eval or args.instruction is not None or args.interactive:
        source = f"{Path(args.adapter) / TRAINING_CONFIG}" if kind else "the default: no training_config.json"
        used = "alpaca" if args.instruction is not None else (kind or qa_kind)
        print(f"prompt format: {used} ({source})", file=sys.stderr)

    # ---- the prompts: streamed one by one, or a file of them in batches (checked before loading)
    streamed = [args.prompt] if args.prompt is not None else []
    if args.question is not None:
        streamed.append(sql_prompt(qa_kind, args.context, args.question))
    if args.instruction is not None:
        streamed.append(alpaca_prompt(args.instruction, args.input))
    batched = []
    if args.prompts:
        if not Path(args.prompts).is_file():
            raise FileNotFoundError(f"prompts file {args.prompts} not found: pass a text file, one prompt a line")
        batched = [line for line in read_text(args.prompts, "prompts file").splitlines() if line.strip()]
        if not batched:
            raise ValueError(f"empty prompt: {args.prompts} holds no non-blank line")

    # ---- load: base (NF4 unless --bf16 or trained on a 16-bit base), adapter, tokenizer
    t0 = time.time()
    load_in_4bit = not args.bf16 and train_cfg.get("load_in_4bit", True)
    # The demo's random base is rebuilt from its config.json and the seed training used.
    model = load_base(base, device, dtype, load_in_4bit, train_cfg.get("seed", TrainConfig().seed))
    if args.adapter:
        try:
            # A and B stored in the compute dtype: forward casts them to it anyway, now once, not every step.
            load_adapter(model, args.adapter, dtype=dtype)
        except ValueError as e:
            if "does not fit this model" not in str(e):   # a damaged file, not the wrong base
                raise
            raise ValueError(f"{e}; pass the --base it was trained on") from None
    model.eval()
    tokenizer = find_tokenizer(args, base)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {tokenizer.vocab_size} ids but the model only {model.config.vocab_size}: "
                         "pass the --tokenizer the model was trained with")
    print(f"loaded {base} ({'NF4' if load_in_4bit else dtype}) + {args.adapter or 'no adapter'} on {device} "
          f"in {time.time() - t0:.1f}s", file=sys.stderr)

    # ---- merge / export
    if args.export:
        if not args.adapter:
            raise ValueError("--export writes base + adapter merged: pass --adapter too")
        config = read_json(config_path(base), "model config")
        # One atomic write (a temp dir, then renamed) of the weights and the tokenizer: a whole checkpoint or none.
        out = save_merged(model, config, args.export, load_in_4bit=args.export_4bit,
                          extra_files=tokenizer.files())
        print(f"merged model written to {out}", file=sys.stderr)
    if args.merge:
        model = merged_model(model)

    # ---- generate
    generator = torch.Generator(device).manual_seed(args.seed)
    new_tokens, seconds = 0, 0.0

    def complete(prompts: list[str], stream: bool = False) -> list[str]:
        """Generated texts, a batch at a time; one prompt alone is printed as it is generated.

        Prompts are batched in order of length: generate() decodes a batch from its shortest prompt
        on, feeding the longer prompts' own tokens meanwhile, so similar lengths waste fewest steps.
        Each row's tokens are its batch-1 tokens (tests/test_generate.py); the texts return in order."""
        nonlocal new_tokens, seconds
        encoded = [tokenizer.encode(p, bos=True, eos=False) for p in prompts]
        order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
        texts = [""] * len(prompts)
        bar = progress.bar(total=len(prompts), desc="generating", unit="prompt", enabled=not stream)
        for start in range(0, len(prompts), args.batch_size):
            rows = order[start:start + args.batch_size]
            ids = [encoded[i] for i in rows]
            longest = max(len(i) for i in ids) + args.max_new_tokens
            if longest > model.config.max_position_embeddings:
                raise ValueError(f"a prompt of {longest - args.max_new_tokens} tokens + --max_new_tokens "
                                 f"{args.max_new_tokens} exceeds the model's {model.config.max_position_embeddings} "
                                 "positions: shorten the prompt or lower --max_new_tokens")
            on_token = None
            if stream and len(ids) == 1:
                text_stream = TextStream(tokenizer)
                on_token = lambda t: print(text_stream.push(int(t[0])), end="", flush=True)  # noqa: E731
            t = time.time()
            out = generate(model, ids, args.max_new_tokens, args.temperature, args.top_p, tokenizer.eos_id,
                           generator, on_token=on_token, cuda_graph=device.type == "cuda" and not args.eager)
            seconds += time.time() - t
            new_tokens += sum(len(o) for o in out)
            for i, o in zip(rows, out):
                texts[i] = tokenizer.decode(o).strip()
            bar.update(len(rows))
            if on_token is not None:
                print(text_stream.flush(), flush=True)
        bar.close()
        return texts

    if args.eval:
        if args.eval == BUILTIN_SQL:
            print(f"warning: {BUILTIN_SQL} holds the demo's training rows, so this scores memory, not "
                  "generalisation; for held-out rows: python -m qlora.sql_dataset --held_out --rows 100 "
                  "--seed 1 --out heldout.jsonl, then --eval heldout.jsonl", file=sys.stderr)
        rows = load_rows(args.eval)
        check_rows(rows, "context_qa.load_v2", args.eval)   # {context, question, answer}
        rows = rows[:args.eval_limit or None]
        prompts = [sql_prompt(qa_kind, r["context"], r["question"]) for r in rows]
        predictions = [strip_response_prefix(t, qa_kind) for t in complete(prompts)]
        model_name = f"{base} + {args.adapter}" if args.adapter else f"{base} (no adapter)"
        print(score(rows, predictions).table(model_name, Path(args.eval).name))
    for prompt in streamed:
        complete([prompt], stream=True)
    if batched:
        for prompt, text in zip(batched, complete(batched)):
            print(json.dumps({"prompt": prompt, "completion": text}))
    if args.interactive:
        print("a prompt per line (context_qa: CONTEXT ||| QUESTION); an empty line or Ctrl-D ends", file=sys.stderr)
        for line in sys.stdin:
            if not line.strip():
                break
            complete([interactive_prompt(line.strip(), kind)], stream=True)

    if new_tokens:
        print(f"{new_tokens} new tokens in {seconds:.2f}s: {new_tokens / seconds:.1f} tokens/s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
