"""bench/ddp_scaling.py at test size on the CPU (gloo, 2 processes): the sides issue #19 runs on 2 GPUs
train to the end, and each FSDP2 rank holds half the base weights. (It found train.py's FSDP2 eval
hang: a validation set whose batches the ranks do not divide.)"""

import json
import re

from bench.ddp_scaling import main


def test_single_ddp_and_fsdp_sides_run_and_fsdp_halves_the_base(tmp_path):
    out = tmp_path / "ddp.json"
    assert main(["--tiny", "--nproc", "2", "--steps", "4", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    for side in ("single", "ddp_2", "fsdp_2"):
        assert result[side]["tokens_per_s"] > 0 and result[side]["ratio"] > 0, side
    shares = [re.search(r"\(([\d.]+)\)", line).group(1) for line in result["fsdp_2"]["rank_lines"]]
    assert [float(s) for s in shares] == [0.5, 0.5]
