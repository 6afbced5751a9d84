"""stories260K (llama2.c, TinyStories) perplexity per format: `python results/stories260k/run.py` from the checkout.

Held-out sample procedure. The model's training set (TinyStories) is not on our machines, and any story we would
write by hand is out of its distribution in small ways that dominate a 260K-parameter model's perplexity. So the
held-out text is drawn from the model itself: N stories sampled from the unquantized fp32 model, each started
from BOS, at temperature 1 with no top-k / top-p (the model's exact distribution), ended where the model emits BOS
(llama2.c's story delimiter) or at 512 tokens, with a fixed seed. The samples are new text (not training
documents) in the model's own domain. The cross-entropy of a quantized model q on samples x ~ p of the reference
p is H(p) + KL(p || q): the reference's perplexity is exp(entropy rate) and every increase over it measures how
far quantization moved the distribution. Stories are joined by a blank line and scored by
any4lib's windowed perplexity (512-token windows, the model's context).

The sample is written once to heldout_samples.txt (committed, so the numbers do not depend on torch's RNG) and
the per-format records go to this folder, one JSON each (a rerun computes only what is missing); the table of
perplexity and storage bits per weight (scales, zeros and anyN's per-row tables included) goes to table.md.

Methods (round to nearest, GPTQ, AWQ, AWQ + GPTQ; any4lib.pipeline) calibrate on text disjoint from the held-out
sample: 32 more stories sampled the same way with another seed (calibration_samples.txt, committed too), of which
16 random windows of 512 tokens feed every method (RTN included, so the methods table compares like with like; the
RTN rows of table.md keep their calibration on the paper's prompt). The learned formats run with k-means seeds
0, 1 and 2. The methods table (seed 0; the learned formats' mean and range over the three seeds beside it) goes to
table_methods.md.
Group sizes: the layers have K = 64 (attention, gate/up) and K = 172 (down), so 128 divides none of them; the
sizes valid for every layer are 2 and 4, plus per-row (group_size None).
"""

import os
from pathlib import Path

import pandas as pd
import torch

from any4lib.experiments import accuracy_records
from any4lib.llama2c import BOS_ID, UNK_ID, load_llama2c
from any4lib.paths import data_root

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parents[1]
SAMPLES = HERE / "heldout_samples.txt"
CALIBRATION_SAMPLES = HERE / "calibration_samples.txt"
N_STORIES, SEED, MAX_TOKENS = 160, 0, 512
N_CALIBRATION_STORIES, CALIBRATION_SEED, CALIBRATION_WINDOWS = 32, 1, 16
FORMATS = ["bf16", "int4", "nf4", "any4", "int3", "any3", "int2", "any2"]
GROUP_SIZES = [None, 4]
METHODS = ["rtn", "gptq", "awq", "awq+gptq"]
SEEDS = [0, 1, 2]


@torch.no_grad()
def sample_stories(n: int = N_STORIES, seed: int = SEED) -> list[str]:
    folder = data_root() / "models" / "stories260K"
    model, tokenizer = load_llama2c(folder / "stories260K.bin")
    torch.manual_seed(seed)
    out = model.generate(
        torch.full((n, 1), BOS_ID), do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
        max_new_tokens=MAX_TOKENS - 1, eos_token_id=BOS_ID, pad_token_id=UNK_ID,
    )  # fmt: skip
    stories = []
    for row in out[:, 1:].tolist():
        story = row[: row.index(BOS_ID)] if BOS_ID in row else row
        stories.append(tokenizer.decode([BOS_ID] + story, skip_special_tokens=True).strip())
    return stories


def groups_label(group_size) -> str:
    return "per-row" if pd.isna(group_size) else f"g{int(group_size)}"


def format_table(frame: pd.DataFrame) -> str:
    """table.md: perplexity and bits per weight per format, per-row and g4 (RTN, calibrated on the prompt)."""
    frame = frame.assign(groups=frame["group_size"].map(groups_label))
    table = frame.pivot_table(index="format", columns="groups", values=["ppl", "bits_per_weight"], sort=False)
    table.columns = [f"{groups} {'ppl' if value == 'ppl' else 'bits/weight'}" for value, groups in table.columns]
    columns = [f"{g} {v}" for g in ("per-row", "g4") for v in ("ppl", "bits/weight")]
    return table[columns].to_markdown(floatfmt=".3f")


def methods_table(frame: pd.DataFrame) -> str:
    """table_methods.md: per-row then g4, one row per format and one column per method, perplexity at k-means seed
    0; below each learned format, the mean and min-max over its seeds."""
    frame = frame.assign(groups=frame["group_size"].map(groups_label))
    rows = []
    for groups in ("per-row", "g4"):
        for fmt, cell in frame[frame["groups"] == groups].groupby("format", sort=False):
            ppl = cell.pivot_table(index="seed", columns="method", values="ppl")[METHODS]
            rows.append({"groups": groups, "format": fmt} | {m: f"{ppl.loc[0, m]:.3f}" for m in METHODS})
            if len(ppl) > 1:
                rows.append({"groups": groups, "format": f"{fmt}, seeds {ppl.index.min()}-{ppl.index.max()}"} | {
                    m: f"{ppl[m].mean():.3f} ({ppl[m].min():.3f}-{ppl[m].max():.3f})" for m in METHODS})
    return pd.DataFrame(rows).to_markdown(index=False, disable_numparse=True)


def main() -> None:
    os.chdir(REPO_ROOT)  # the samples' paths in the records stay relative to the checkout
    if not SAMPLES.is_file():
        SAMPLES.write_text("\n\n".join(sample_stories()) + "\n")
    if not CALIBRATION_SAMPLES.is_file():
        CALIBRATION_SAMPLES.write_text("\n\n".join(sample_stories(N_CALIBRATION_STORIES, CALIBRATION_SEED)) + "\n")
    heldout = [str(SAMPLES.relative_to(REPO_ROOT))]
    frame = accuracy_records(
        "stories260K", FORMATS, GROUP_SIZES, datasets=heldout, calibration="prompt", seq_len=MAX_TOKENS, store=HERE,
    )  # fmt: skip
    (HERE / "table.md").write_text(format_table(frame) + "\n")
    calibration = f"{CALIBRATION_SAMPLES.relative_to(REPO_ROOT)}:{CALIBRATION_WINDOWS}x{MAX_TOKENS}"
    methods = accuracy_records(
        "stories260K", FORMATS[1:], GROUP_SIZES, datasets=heldout, calibration=calibration, seq_len=MAX_TOKENS,
        store=HERE, seeds=SEEDS, methods=METHODS,
    )  # fmt: skip
    (HERE / "table_methods.md").write_text(methods_table(methods) + "\n")
    print(format_table(frame), methods_table(methods), sep="\n\n")


if __name__ == "__main__":
    main()
