"""Progress bars for the long, quiet stretches (loading, training, evaluation, generation).

A bar is a real tqdm when someone watches: stderr is a terminal and `CI` is not set. Otherwise it
is tqdm's disabled bar, which iterates and accepts update/set_postfix but prints nothing, so logs
and CI output stay one line per event. The bar goes to stderr (tqdm's default) so that what the
scripts print on stdout (infer.py's JSON lines and tables) stays clean when piped to a file.

Lines printed while a bar is on screen go through `write`, which prints them above the bar.
"""

import os
import sys

from tqdm import tqdm


def interactive() -> bool:
    """Whether bars are drawn: stderr is a terminal, the CI variable is unset (or empty), and this is
    not a rank above 0 of a torchrun job (RANK, qlora/distributed.py: rank 0 speaks for all)."""
    return sys.stderr.isatty() and not os.environ.get("CI") and os.environ.get("RANK", "0") == "0"


def bar(iterable=None, total: int | None = None, desc: str | None = None, unit: str = "it",
        enabled: bool = True, **kwargs) -> tqdm:
    """A tqdm bar over `iterable` (or updated by hand up to `total`); silent unless interactive()."""
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=not (enabled and interactive()),
                dynamic_ncols=True, **kwargs)


def write(line: str) -> None:
    """print(line) to stdout, above any bar on screen (tqdm clears and redraws it)."""
    tqdm.write(line, file=sys.stdout)
    sys.stdout.flush()
