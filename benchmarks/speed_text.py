"""Sentences/s of recforge's offline sentence encoder against sentence-transformers' own ``encode``.

Both encode the same review texts (the women's clothing reviews under ``$RECFORGE_DATA``, else
generated sentences of mixed length) with the same all-MiniLM-L6-v2 weights, batch 64 and the same
torch threads; the vectors are checked equal within 1e-5 before anything is timed, and the word pieces
each side feeds the model (padding included) are counted on that first call. The timed calls
alternate between the two sides (A B, B A, ...) and the best call of each is kept. A sanity check
follows: cosine similarities of fixed paraphrase and unrelated pairs, every paraphrase pair above
every unrelated one.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import polars as pl
import torch
from _common import Row, parse_args, write_results

from recforge.study.runs import environment
from recforge.text import SentenceEncoder

REVIEWS = Path("womens-ecommerce-clothing-reviews") / "WomensClothingE-CommerceReviews.parquet.brotli"
BATCH = 64
PARAPHRASES = [
    ("A man is playing a guitar.", "Someone is playing the guitar."),
    ("The dress fits perfectly and looks great.", "This dress has a perfect fit and looks lovely."),
    ("The shipping was very slow.", "Delivery took a long time."),
    ("How do I reset my password?", "What are the steps to change my password?"),
    ("The cat is sleeping on the sofa.", "A cat naps on the couch."),
    ("The sweater is too small for me.", "This jumper runs small on me."),
    ("I would like to return these shoes.", "I want to send these shoes back."),
    ("The weather is cold and rainy today.", "It is chilly and wet outside today."),
    ("She bought a new car last week.", "Last week she purchased a new automobile."),
    ("The restaurant serves excellent pasta.", "The pasta at this restaurant is superb."),
]
UNRELATED = [
    ("A man is playing a guitar.", "The stock market fell sharply today."),
    ("The dress fits perfectly and looks great.", "Quantum computers use qubits."),
    ("The shipping was very slow.", "Elephants live in large family groups."),
    ("How do I reset my password?", "The river flooded the village in spring."),
    ("The cat is sleeping on the sofa.", "Interest rates were raised by the central bank."),
    ("The sweater is too small for me.", "The volcano erupted after centuries of silence."),
    ("I would like to return these shoes.", "Photosynthesis converts light into chemical energy."),
    ("The weather is cold and rainy today.", "He scored the winning goal in the final minute."),
    ("She bought a new car last week.", "The algorithm sorts the list in linear time."),
    ("The restaurant serves excellent pasta.", "The telescope observed a distant galaxy."),
]


def texts(count: int) -> tuple[list[str], str]:
    root = os.environ.get("RECFORGE_DATA")
    if root and (Path(root) / REVIEWS).is_file():
        frame = pl.read_parquet(Path(root) / REVIEWS).filter(pl.col("Review Text").str.len_chars() > 0)
        return frame["Review Text"].head(count).to_list(), f"the first {count} review texts of {REVIEWS.parent}"
    words = "the fabric fits well and the colour is lovely but the sleeves run long for me".split()
    rng = np.random.default_rng(0)
    made = [" ".join(rng.choice(words, int(rng.integers(3, 60)))) for _ in range(count)]
    return made, f"{count} generated sentences of 3 to 60 words"


@contextlib.contextmanager
def counted_word_pieces(model: torch.nn.Module) -> Iterator[list[int]]:
    """The token positions (padding included) of every batch ``model``'s embedding layer sees inside the block."""
    counts: list[int] = []
    count = lambda _, args, kwargs: counts.append(kwargs["input_ids"].numel())  # noqa: E731
    hook = model.embeddings.register_forward_pre_hook(count, with_kwargs=True)
    try:
        yield counts
    finally:
        hook.remove()


def best_interleaved(runs: dict[str, Callable[[], object]], rounds: int) -> dict[str, float]:
    """Best wall time of each run over ``rounds`` rounds, the order of the runs reversed every other round."""
    best = dict.fromkeys(runs, float("inf"))
    names = list(runs)
    for r in range(rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            start = time.perf_counter()
            runs[name]()
            best[name] = min(best[name], time.perf_counter() - start)
    return best


def sanity(encoder: SentenceEncoder) -> tuple[dict[str, float], list[tuple[str, str, str, float]]]:
    """Cosine of every paraphrase and unrelated pair; the margin is the lowest paraphrase minus the highest unrelated."""
    scored = []
    for kind, pairs in (("paraphrase", PARAPHRASES), ("unrelated", UNRELATED)):
        left, right = (encoder.encode([pair[side] for pair in pairs]) for side in (0, 1))
        scored += [(kind, a, b, float(c)) for (a, b), c in zip(pairs, (left * right).sum(1))]
    paraphrase = [c for kind, *_, c in scored if kind == "paraphrase"]
    unrelated = [c for kind, *_, c in scored if kind == "unrelated"]
    figures = {
        "paraphrase_mean": float(np.mean(paraphrase)),
        "unrelated_mean": float(np.mean(unrelated)),
        "min_margin": min(paraphrase) - max(unrelated),
    }
    return figures, scored


def main() -> None:
    args = parse_args(__doc__.splitlines()[0])
    torch.set_num_threads(args.threads)
    import sentence_transformers

    started = time.perf_counter()
    corpus, source = texts(64 if args.quick else 2048)
    encoder = SentenceEncoder.load()
    reference = sentence_transformers.SentenceTransformer(str(encoder.folder), device="cpu", local_files_only=True)
    runs = {
        "sentence-transformers encode": lambda: reference.encode(corpus, batch_size=BATCH, convert_to_numpy=True),
        "recforge SentenceEncoder.encode": lambda: encoder.encode(corpus, batch_size=BATCH),
    }
    with counted_word_pieces(reference[0].model) as theirs_pieces:
        theirs = runs["sentence-transformers encode"]()
    with counted_word_pieces(encoder.model) as ours_pieces:
        ours = runs["recforge SentenceEncoder.encode"]()
    difference = float(np.abs(ours - theirs).max())
    assert difference < 1e-5, difference
    real = sum(len(ids) for ids in encoder.tokenizer(corpus, truncation=True, max_length=encoder.max_length)["input_ids"])
    pieces = {"sentence-transformers encode": sum(theirs_pieces), "recforge SentenceEncoder.encode": sum(ours_pieces)}
    rounds = 2 if args.quick else 4
    best = best_interleaved(runs, rounds)
    rows: list[Row] = [
        {"name": name, "sentences_per_s": len(corpus) / seconds, "seconds": seconds, "word_pieces_fed": pieces[name]}
        for name, seconds in best.items()
    ]
    checks, scored = sanity(encoder)
    ordered = checks["min_margin"] > 0
    total_s = time.perf_counter() - started
    meta = {
        "environment": environment(),
        "texts": source,
        "batch_size": BATCH,
        "rounds": rounds,
        "max_abs_difference": difference,
        "real_word_pieces": real,
        "sentence_transformers": sentence_transformers.__version__,
        "sanity": checks | {"paraphrases_above_unrelated": ordered, "pairs": scored},
        "total_s": total_s,
    }
    write_results("speed_text", rows, meta, args=args, reference="sentence-transformers encode", figure="sentences_per_s")
    machine = meta["environment"]
    ratio = best["sentence-transformers encode"] / best["recforge SentenceEncoder.encode"]
    header = [
        "# speed_text",
        "",
        f"`{shlex.join(['python', *sys.argv])}` (RECFORGE_DATA={os.environ.get('RECFORGE_DATA', 'unset')}), "
        f"{total_s:.0f} s on {machine['cpu']}, {machine['cores']} cores, {args.threads} torch threads on both sides "
        f"(OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}), sentence-transformers {sentence_transformers.__version__}.",
        f"{source}, batch {BATCH} on both sides, best of {rounds} alternating calls each; ratio = sentences/s over "
        f"sentence-transformers' ({ratio:.3f}x); vectors equal within {difference:.1e}. `word_pieces_fed`: token positions "
        f"the model ran on, padding included, against {real} real word pieces.",
    ]
    sanity_lines = [
        "",
        f"Sanity ({len(PARAPHRASES)} paraphrase and {len(UNRELATED)} unrelated pairs, cosine): paraphrase mean "
        f"{checks['paraphrase_mean']:.3f}, unrelated mean {checks['unrelated_mean']:.3f}, lowest paraphrase minus highest "
        f"unrelated {checks['min_margin']:.3f} ({'every paraphrase pair above every unrelated one' if ordered else 'ORDER VIOLATED'}).",
        "",
        "| pair | cosine | a | b |",
        "|---|---|---|---|",
        *(f"| {kind} | {cosine:.3f} | {a} | {b} |" for kind, a, b, cosine in scored),
        "",
    ]
    table = (args.out / "speed_text.md").read_text()
    (args.out / "speed_text.md").write_text("\n".join(header) + "\n\n" + table + "\n".join(sanity_lines))
    assert ordered, checks


if __name__ == "__main__":
    main()
