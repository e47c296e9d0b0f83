"""Synthetic multimodal catalogue whose content genuinely predicts interactions (DESIGN.md §4).

Every item has latent attributes (category, colour, pattern, style) that are rendered into a real
PNG (`train/synthetic_draw.py`) and a templated description with noise words. Every user has latent
preferences over the same attributes; interactions are sampled without replacement (Gumbel top-k)
from a softmax over log-preference of the item's attributes plus a weaker Zipf log-popularity term.
The result is written in the MMRec-compatible format: `<name>.inter` (per-user random 8:1:1 split
with MMRec's rule), `items.tsv`, `images/<id>.png`, and `attributes.tsv` for analysis and tests.

Usage: `python -m train.synthetic --out data/synthetic --users 1000 --items 500 --seed 0`.
"""
from __future__ import annotations

import argparse
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from train.synthetic_draw import CATEGORIES, COLOURS, PATTERNS, STYLES, draw_item

log = logging.getLogger(__name__)

COLOUR_NAMES = tuple(COLOURS)
PATTERN_WORDS = {"plain": ("plain", "solid", "solid-colour"), "striped": ("striped", "pinstripe"),
                 "dotted": ("polka-dot", "dotted", "spotted"), "checked": ("checked", "plaid")}
STYLE_WORDS = {
    "vintage": ("vintage", "retro", "old-school"), "sporty": ("sporty", "athletic", "active"),
    "minimal": ("minimal", "clean", "simple"), "luxury": ("luxury", "premium", "elegant"),
    "cozy": ("cozy", "warm", "soft"), "rustic": ("rustic", "handmade", "farmhouse"),
    "modern": ("modern", "sleek", "contemporary"), "playful": ("playful", "fun", "quirky"),
}
NOUNS = {
    "shoe": (("sneaker", "shoe", "trainer"), ("canvas", "leather", "suede"),
             ("everyday walks", "the gym", "weekend trips")),
    "bag": (("bag", "tote", "handbag"), ("canvas", "leather", "nylon"),
            ("the office", "grocery runs", "travel")),
    "hat": (("hat", "fedora", "cap"), ("wool", "felt", "straw"),
            ("sunny days", "cold mornings", "festivals")),
    "lamp": (("lamp", "desk lamp", "table lamp"), ("metal", "ceramic", "brass"),
             ("reading", "the bedside", "a home office")),
    "mug": (("mug", "cup", "coffee mug"), ("ceramic", "stoneware", "porcelain"),
            ("morning coffee", "tea time", "hot chocolate")),
    "chair": (("chair", "seat", "dining chair"), ("wooden", "oak", "steel"),
              ("the dining room", "a reading nook", "the patio")),
    "watch": (("watch", "wristwatch", "timepiece"), ("steel", "titanium", "gold-tone"),
              ("daily wear", "running", "formal events")),
    "shirt": (("shirt", "t-shirt", "tee"), ("cotton", "linen", "jersey"),
              ("summer days", "casual fridays", "lounging")),
}
NOISE = ("Free shipping.", "Great gift idea.", "New arrival.", "Best seller.", "Limited stock.",
         "Ships in 2 days.", "Customer favourite.", "Easy returns.", "Imported.", "One size.")
INTER_HEADER = "userID\titemID\trating\ttimestamp\tx_label"


@dataclass(frozen=True)
class Catalogue:
    """Latent item attributes as index arrays into the vocabularies, plus popularity weights."""

    category: np.ndarray
    colour: np.ndarray
    pattern: np.ndarray
    style: np.ndarray
    popularity: np.ndarray


@dataclass(frozen=True)
class Preferences:
    """Per-user probability vectors over each attribute vocabulary, shape (U, |vocab|)."""

    category: np.ndarray
    colour: np.ndarray
    pattern: np.ndarray
    style: np.ndarray


def sample_catalogue(rng: np.random.Generator, n_items: int, zipf: float = 1.0) -> Catalogue:
    """Draw uniform item attributes and Zipf popularity over a random item ranking."""
    ranks = rng.permutation(n_items) + 1
    pop = 1.0 / ranks.astype(np.float64) ** zipf
    return Catalogue(category=rng.integers(len(CATEGORIES), size=n_items),
                     colour=rng.integers(len(COLOURS), size=n_items),
                     pattern=rng.integers(len(PATTERNS), size=n_items),
                     style=rng.integers(len(STYLES), size=n_items),
                     popularity=pop / pop.sum())


def _peaked(rng: np.random.Generator, n_users: int, size: int, max_liked: int,
            liked_mass: float) -> np.ndarray:
    """Per-user distributions putting `liked_mass` on 1..max_liked favourite values (Dirichlet)."""
    out = np.full((n_users, size), (1.0 - liked_mass) / size)
    n_liked = rng.integers(1, max_liked + 1, size=n_users)
    for u in range(n_users):
        liked = rng.choice(size, size=n_liked[u], replace=False)
        out[u, liked] += liked_mass * rng.dirichlet(np.full(n_liked[u], 2.0))
    return out


def sample_preferences(rng: np.random.Generator, n_users: int) -> Preferences:
    """Draw latent user tastes: strong on category, then colour and style, weak on pattern."""
    return Preferences(category=_peaked(rng, n_users, len(CATEGORIES), 3, 0.95),
                       colour=_peaked(rng, n_users, len(COLOURS), 2, 0.8),
                       pattern=_peaked(rng, n_users, len(PATTERNS), 1, 0.5),
                       style=_peaked(rng, n_users, len(STYLES), 2, 0.8))


def affinity_logits(prefs: Preferences, cat: Catalogue, pop_weight: float,
                    users: slice = slice(None)) -> np.ndarray:
    """User-item logits: sum of log attribute preferences plus weighted log-popularity, (U, I)."""
    logits = np.log(prefs.category[users][:, cat.category])  # (U, I)
    logits += np.log(prefs.colour[users][:, cat.colour])
    logits += np.log(prefs.pattern[users][:, cat.pattern])
    logits += np.log(prefs.style[users][:, cat.style])
    logits += pop_weight * np.log(cat.popularity)[None, :]
    return logits


def sample_counts(rng: np.random.Generator, n_users: int, n_items: int,
                  mean: float) -> np.ndarray:
    """Interactions per user: Gamma-distributed around `mean`, at least 5, at most half the items."""
    high = max(5, min(n_items // 2, int(3 * mean)))
    raw = np.rint(rng.gamma(shape=4.0, scale=mean / 4.0, size=n_users))
    return np.clip(raw, 5, high).astype(np.int64)


def sample_interactions(rng: np.random.Generator, prefs: Preferences, cat: Catalogue,
                        pop_weight: float, counts: np.ndarray,
                        block: int = 1024) -> list[np.ndarray]:
    """Sample `counts[u]` distinct items per user from softmax(logits[u]) via Gumbel top-k."""
    out: list[np.ndarray] = []
    for start in range(0, len(counts), block):
        users = slice(start, start + block)
        keys = affinity_logits(prefs, cat, pop_weight, users)  # (b, I)
        keys += rng.gumbel(size=keys.shape)
        kmax = int(counts[users].max())
        top = np.argpartition(-keys, kmax - 1, axis=1)[:, :kmax]  # (b, kmax) unordered
        order = np.argsort(-np.take_along_axis(keys, top, axis=1), axis=1, kind="stable")
        top = np.take_along_axis(top, order, axis=1)  # (b, kmax) by decreasing key
        out.extend(top[j, :c] for j, c in enumerate(counts[users]))
    return out


def split_labels(n: int) -> np.ndarray:
    """MMRec's per-user 8:1:1 labels for n shuffled items: train first, then valid, then test."""
    if n < 10:
        return np.array([0] * (n - 2) + [1, 2], dtype=np.int64)
    val_test = int(n * 0.2)
    val = val_test // 2
    return np.array([0] * (n - val_test) + [1] * val + [2] * (val_test - val), dtype=np.int64)


def interaction_rows(rng: np.random.Generator, per_user: list[np.ndarray], cat: Catalogue,
                     prefs: Preferences) -> np.ndarray:
    """Shuffle and split each user's items; return (E, 5) [user, item, rating, timestamp, label]."""
    blocks = []
    for u, items in enumerate(per_user):
        items = rng.permutation(items)
        matches = sum((getattr(prefs, a)[u].argmax() == getattr(cat, a)[items]).astype(np.int64)
                      for a in ("category", "colour", "pattern", "style"))
        stamps = 1_600_000_000 + 86_400 * np.arange(len(items)) + 60 * u
        blocks.append(np.stack([np.full(len(items), u), items, 1 + matches, stamps,
                                split_labels(len(items))], axis=1))
    return np.concatenate(blocks).astype(np.int64)


def describe(rng: np.random.Generator, category: str, colour: str, pattern: str,
             style: str) -> str:
    """Templated product text from the attributes, with word variation and noise phrases."""
    nouns, materials, uses = NOUNS[category]
    noun, pat = rng.choice(nouns), rng.choice(PATTERN_WORDS[pattern])
    style_word, adj = rng.choice(STYLE_WORDS[style], size=2)
    title = f"{style_word.capitalize()} {colour} {pat} {noun}."
    body = rng.choice([f"A {adj} {rng.choice(materials)} {noun} for {rng.choice(uses)}.",
                       f"Made of {rng.choice(materials)}, perfect for {rng.choice(uses)}.",
                       f"This {adj} piece comes in {colour}."])
    noise = rng.choice(NOISE, size=rng.integers(0, 3), replace=False)
    return " ".join([title, str(body), *map(str, noise)])


def _missing(rng: np.random.Generator, n_items: int, frac: float) -> np.ndarray:
    """Boolean mask of `round(frac * n)` randomly chosen items (at least one when frac > 0)."""
    n = max(1, int(round(frac * n_items))) if frac > 0 else 0
    mask = np.zeros(n_items, dtype=bool)
    mask[rng.choice(n_items, size=n, replace=False)] = True
    return mask


def write_items(out: Path, rng: np.random.Generator, cat: Catalogue, image_size: int,
                seed: int, no_text: np.ndarray, no_image: np.ndarray) -> None:
    """Write images/<id>.png, items.tsv and attributes.tsv."""
    (out / "images").mkdir(parents=True, exist_ok=True)
    items, attrs = ["itemID\ttext\timage"], ["itemID\tcategory\tcolour\tpattern\tstyle"]
    for i in range(len(cat.category)):
        names = (CATEGORIES[cat.category[i]], COLOUR_NAMES[cat.colour[i]],
                 PATTERNS[cat.pattern[i]], STYLES[cat.style[i]])
        text = "" if no_text[i] else describe(rng, *names)
        image = "" if no_image[i] else f"images/{i}.png"
        if image:
            draw_item(*names, size=image_size, seed=seed * 1_000_003 + i).save(
                out / image, format="PNG", optimize=False)
        items.append(f"{i}\t{text}\t{image}")
        attrs.append("\t".join([str(i), *names]))
    (out / "items.tsv").write_text("\n".join(items) + "\n", encoding="utf-8")
    (out / "attributes.tsv").write_text("\n".join(attrs) + "\n", encoding="utf-8")


def _remove_previous(out: Path) -> None:
    """Delete the files a previous generation wrote into `out`."""
    shutil.rmtree(out / "images", ignore_errors=True)
    for f in [*out.glob("*.inter"), out / "items.tsv", out / "attributes.tsv"]:
        f.unlink(missing_ok=True)


def _check_args(seed: int, n_users: int, n_items: int, image_size: int,
                mean_interactions: float, missing_text: float, missing_image: float) -> None:
    """Raise ValueError with a clear message for unusable generation arguments."""
    if seed < 0:
        raise ValueError(f"seed must be non-negative, got {seed}")
    if n_users < 2:
        raise ValueError(f"need at least 2 users, got {n_users}")
    if n_items < 10:
        raise ValueError(f"need at least 10 items (5 interactions per user), got {n_items}")
    if image_size < 16:
        raise ValueError(f"image size must be at least 16 pixels, got {image_size}")
    if mean_interactions < 5:
        raise ValueError(f"mean interactions per user must be at least 5, got {mean_interactions}")
    for name, frac in (("missing text", missing_text), ("missing image", missing_image)):
        if not 0.0 <= frac < 1.0:
            raise ValueError(f"{name} fraction must be in [0, 1), got {frac}")


def generate(out: Path, n_users: int, n_items: int, seed: int, image_size: int = 64,
             mean_interactions: float = 20.0, missing_text: float = 0.02,
             missing_image: float = 0.02, pop_weight: float = 1.0, name: str = "synthetic",
             overwrite: bool = False) -> Path:
    """Write a synthetic dataset directory to `out` and return it; deterministic per seed."""
    _check_args(seed, n_users, n_items, image_size, mean_interactions, missing_text, missing_image)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise FileExistsError(f"{out} is not empty (use overwrite=True / --overwrite)")
        _remove_previous(out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    rng_items, rng_users, rng_inter, rng_text = np.random.default_rng(seed).spawn(4)
    cat = sample_catalogue(rng_items, n_items)
    prefs = sample_preferences(rng_users, n_users)
    counts = sample_counts(rng_inter, n_users, n_items, mean_interactions)
    per_user = sample_interactions(rng_inter, prefs, cat, pop_weight, counts)
    rows = interaction_rows(rng_inter, per_user, cat, prefs)
    lines = [INTER_HEADER] + ["\t".join(map(str, r)) for r in rows.tolist()]
    (out / f"{name}.inter").write_text("\n".join(lines) + "\n", encoding="utf-8")
    no_text = _missing(rng_text, n_items, missing_text)
    no_image = _missing(rng_text, n_items, missing_image)
    write_items(out, rng_text, cat, image_size, seed, no_text, no_image)
    log.info("synthetic dataset %s: %d users, %d items, %d interactions (train/valid/test "
             "%d/%d/%d), density %.4f, %d items without text, %d without image, %.1fs", out,
             n_users, n_items, len(rows), *np.bincount(rows[:, 4], minlength=3),
             len(rows) / (n_users * n_items), no_text.sum(), no_image.sum(),
             time.perf_counter() - start)
    return out


def build_parser() -> argparse.ArgumentParser:
    """Command-line arguments of `python -m train.synthetic`."""
    p = argparse.ArgumentParser(prog="python -m train.synthetic", description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True, help="dataset directory to write")
    p.add_argument("--users", type=int, default=1000, help="number of users")
    p.add_argument("--items", type=int, default=500, help="number of items")
    p.add_argument("--seed", type=int, default=0, help="random seed (same seed, same bytes)")
    p.add_argument("--image-size", type=int, default=64, help="image side in pixels")
    p.add_argument("--mean-interactions", type=float, default=20.0, help="mean per user")
    p.add_argument("--missing-text", type=float, default=0.02, help="fraction without text")
    p.add_argument("--missing-image", type=float, default=0.02, help="fraction without image")
    p.add_argument("--pop-weight", type=float, default=1.0, help="weight of log-popularity")
    p.add_argument("--name", default="synthetic", help="stem of the .inter file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing dataset")
    return p


def main(argv: list[str] | None = None) -> None:
    """Parse arguments and generate the dataset."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        generate(args.out, args.users, args.items, args.seed, image_size=args.image_size,
                 mean_interactions=args.mean_interactions, missing_text=args.missing_text,
                 missing_image=args.missing_image, pop_weight=args.pop_weight, name=args.name,
                 overwrite=args.overwrite)
    except (ValueError, FileExistsError) as exc:
        parser.error(str(exc))


if __name__ == "__main__":
    main()
