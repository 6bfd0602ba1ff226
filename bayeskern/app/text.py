"""Text classification for ``bayeskern-finetune``: ``--model hf:<hub id or directory>`` and
``--dataset csv:...`` / ``json:...``.

Data.  ``csv:PATH`` or ``json:PATH`` (a JSON list of objects or JSON Lines, one object a line) with
the text in ``--text-column`` and the label in ``--label-column``.  The splits:

* one file with a ``split`` column: its values ``train``, ``val`` (or ``validation``) and ``test``
  choose each row's split (all three must occur);
* one file without it: a seeded 70/15/15 split (``--seed``), as ``imagefolder:`` splits;
* ``PATH_TRAIN,PATH_TEST``: 15% of the training rows, seeded, become the validation split;
* ``PATH_TRAIN,PATH_VAL,PATH_TEST``: the three splits as given.

Labels are integer class ids (``0 .. C-1``; in a CSV, cells holding integers) or class names,
which become ids in sorted order (the mapping is recorded as ``class_names`` in ``config.json``
and ``metrics.json``).  A name met outside the training split, a non-integer number or an empty
cell is bad input.  Texts are tokenised once by the model's tokenizer (``AutoTokenizer`` of the same
hub id or directory), truncated to ``--max-length`` tokens; ``collate`` pads each batch to its
longest example on the tokenizer's padding side, giving the Mapping batches ``{input_ids,
attention_mask, labels}`` of ``bayeskern.batches``.

Model.  ``AutoModelForSequenceClassification`` with one output per class, its padding token the
tokenizer's (sequence classifiers pool on the last non-padding token).  The head is every parameter
outside the pretrained body (``model.base_model_prefix``); a head tensor of another shape in the
checkpoint (or none) is initialised afresh (seeded) and reported in ``new_params`` (prior mean
zero).  The loaded weights are the initial point and the prior mean.  With ``--lora-r R`` the model
is wrapped by ``peft`` with LoRA adapters of rank ``R`` on ``--lora-targets`` (peft's default
modules for the architecture when not given; ``lora_dropout`` 0): the base weights are frozen, the
adapters and the whole head are trained, and the Bayesian methods treat exactly those as their
parameters (``Backbone.params``).  The adapters' prior mean is their initial value (``B = 0``: the
pretrained function; docs/design.md, section 14), as for ``params="lora"`` in the library.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from ..posteriors.selection import is_lora_adapter
from .errors import UsageError
from .shared import Backbone, Splits, classifier_prefix, seeded_split, under

FORMATS = ("csv", "json")
SPLIT_COLUMN = "split"
_SPLIT_NAMES = {"train": "train", "val": "val", "validation": "val", "test": "test"}
_INTEGER = re.compile(r"[+-]?\d+")


@dataclass
class TextOptions:
    """What a text run needs beyond ``DataOptions``: the model's hub id or directory (the tokenizer
    lives there), the columns, the token budget and the LoRA settings."""

    model: str
    text_column: str = "text"
    label_column: str = "label"
    max_length: int = 128
    lora_r: int | None = None
    lora_alpha: float | None = None  # None: 2 * lora_r
    lora_targets: list[str] | None = None  # None: peft's default modules for the architecture


def is_text_dataset(spec: str) -> bool:
    return spec.partition(":")[0] in FORMATS and ":" in spec


def options_from_args(args: Any) -> TextOptions | None:
    """The text options of a parsed command line; None for an image run.  Raises UsageError when a
    text dataset meets a non-``hf:`` model (or the reverse) or a text option is out of range."""
    text_data, hf_model = is_text_dataset(args.dataset), args.model.startswith("hf:")
    if text_data != hf_model:
        if hf_model:
            raise UsageError(
                f"--model {args.model} classifies text: give --dataset csv:PATH or json:PATH, not {args.dataset!r}"
            )
        raise UsageError(f"--dataset {args.dataset} holds text: give --model hf:<hub id or directory>")
    lora_given = args.lora_targets is not None or args.lora_alpha is not None
    if not text_data:
        if lora_given or args.lora_r is not None:
            raise UsageError("--lora-r / --lora-targets / --lora-alpha need --model hf:...")
        return None
    if args.pretrained not in (None, "source", "none", "hf"):  # "source": the default, nothing to pretrain on
        raise UsageError("--model hf:... loads its weights from the checkpoint; drop --pretrained")
    if args.max_length < 1:
        raise UsageError("--max-length must be at least 1")
    if args.lora_r is None and lora_given:
        raise UsageError("--lora-targets / --lora-alpha need --lora-r")
    if args.lora_r is not None and args.lora_r < 1:
        raise UsageError("--lora-r must be at least 1")
    if args.lora_alpha is not None and args.lora_alpha <= 0:
        raise UsageError("--lora-alpha must be positive")
    targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()] if args.lora_targets else None
    if args.lora_targets is not None and not targets:
        raise UsageError("--lora-targets names no module")
    return TextOptions(
        args.model.removeprefix("hf:"),
        args.text_column,
        args.label_column,
        args.max_length,
        args.lora_r,
        args.lora_alpha,
        targets,
    )


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers' load reports and progress bars off while loading (restored after)."""
    from transformers.utils import logging

    level, bars = logging.get_verbosity(), logging.is_progress_bar_enabled()
    logging.set_verbosity_error()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        logging.set_verbosity(level)
        if bars:
            logging.enable_progress_bar()


def _first_line(error: Exception) -> str:
    return next((line.strip() for line in str(error).splitlines() if line.strip()), type(error).__name__)[:300]


@functools.lru_cache(maxsize=4)
def load_tokenizer(name: str) -> Any:
    """The model's tokenizer, with a padding token (its end-of-sequence token when it has none)."""
    from transformers import AutoTokenizer

    if name.startswith(("/", "./", "../", "~")) and not Path(name).expanduser().is_dir():
        raise UsageError(f"--model hf:{name}: no such directory")
    try:
        with _quiet_transformers():
            tokenizer = AutoTokenizer.from_pretrained(name)
    except (OSError, ValueError) as error:
        raise UsageError(f"--model hf:{name}: no tokenizer could be loaded ({_first_line(error)})") from None
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise UsageError(f"--model hf:{name}: the tokenizer has neither a padding nor an end-of-sequence token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# -- data ----------------------------------------------------------------------------------------------
class TextDataset(Dataset):
    """Tokenised examples: ``dataset[i]`` is ``{"input_ids", "attention_mask", "labels"}`` (1-D
    tensors and a scalar), ``targets`` the class ids (read by ``data.targets_of``)."""

    def __init__(self, encodings: list[list[int]], targets: torch.Tensor):
        self.encodings, self.targets = encodings, targets

    def __len__(self) -> int:
        return len(self.encodings)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids = torch.tensor(self.encodings[index], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": self.targets[index]}


@dataclass
class PadCollate:
    """Pads a list of ``TextDataset`` examples to the longest one (``pad_id``, attention mask 0) on
    ``side`` (``"right"`` or ``"left"``) and stacks them into one Mapping batch."""

    pad_id: int
    side: str = "right"

    def __call__(self, examples: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        length = max(len(e["input_ids"]) for e in examples)
        ids = torch.full((len(examples), length), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(examples), length), dtype=torch.long)
        for row, example in enumerate(examples):
            n = len(example["input_ids"])
            cols = slice(length - n, length) if self.side == "left" else slice(0, n)
            ids[row, cols], mask[row, cols] = example["input_ids"], example["attention_mask"]
        return {"input_ids": ids, "attention_mask": mask, "labels": torch.stack([e["labels"] for e in examples])}


def _read_rows(fmt: str, path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        raise UsageError(f"--dataset {fmt}: {path} not found")
    text = path.read_text(encoding="utf-8")
    if fmt == "csv":
        return list(csv.DictReader(text.splitlines()))
    try:
        rows = json.loads(text)
    except json.JSONDecodeError:
        try:
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]  # JSON Lines
        except json.JSONDecodeError as error:
            raise UsageError(f"--dataset json: {path} is neither JSON nor JSON Lines ({error})") from None
    if not isinstance(rows, list) or not all(isinstance(row, dict) for row in rows):
        raise UsageError(f"--dataset json: {path} must hold a list of objects (or one object a line)")
    return rows


def _column(rows: list[dict[str, Any]], column: str, option: str, path: Path) -> list[Any]:
    if not rows:
        raise UsageError(f"--dataset: {path} holds no rows")
    values = []
    for number, row in enumerate(rows, start=1):
        if column not in row:
            raise UsageError(f"{option} {column!r}: row {number} of {path} has no such column (it has {sorted(row)})")
        if row[column] is None or row[column] == "":
            raise UsageError(f"{option} {column!r}: row {number} of {path} is empty")
        values.append(row[column])
    return values


def _class_id(label: Any) -> int | str:
    """An integer label as an int, a class name as a str; a non-integer number is bad input."""
    if isinstance(label, bool) or not isinstance(label, (int, float, str)):
        raise UsageError(f"--label-column: label {label!r} is neither an integer class id nor a class name")
    if isinstance(label, str):
        stripped = label.strip()
        if _INTEGER.fullmatch(stripped):
            return int(stripped)
        try:
            float(stripped)
        except ValueError:
            return label
        label = float(stripped)
    if isinstance(label, float) and not label.is_integer():
        raise UsageError(
            f"--label-column: label {label!r} is not an integer: classification needs class ids or class names"
        )
    return int(label)


def _label_ids(labels: dict[str, list[Any]]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Class ids of every split's labels and the class names (index = id); see the module docstring."""
    parsed = {split: [_class_id(label) for label in values] for split, values in labels.items()}
    every = [label for values in parsed.values() for label in values]
    if all(isinstance(label, int) for label in every):
        negative = [label for label in every if label < 0]  # type: ignore[operator]
        if negative:
            raise UsageError(f"--label-column: class ids must be >= 0, got {negative[0]}")
        names = [str(i) for i in range(max(every) + 1)]  # type: ignore[type-var]
        return {split: torch.tensor(values) for split, values in parsed.items()}, names
    if not all(isinstance(label, str) for label in every):
        raise UsageError("--label-column mixes integer class ids and class names")
    names = sorted(set(parsed["train"]))  # type: ignore[arg-type]
    index = {name: i for i, name in enumerate(names)}
    for split, values in parsed.items():
        unseen = [label for label in values if label not in index]
        if unseen:
            raise UsageError(f"--label-column: class {unseen[0]!r} of the {split} split does not occur in train")
    return {split: torch.tensor([index[v] for v in values]) for split, values in parsed.items()}, names


def _split_rows(fmt: str, paths: list[Path], seed: int) -> dict[str, list[dict[str, Any]]]:
    """Rows of each split, following the module docstring's rules."""
    files = [_read_rows(fmt, path) for path in paths]
    if len(files) == 3:
        return dict(zip(("train", "val", "test"), files))
    rows = files[0]
    if len(files) == 1 and rows and SPLIT_COLUMN in rows[0]:
        by_split: dict[str, list[dict[str, Any]]] = {"train": [], "val": [], "test": []}
        for number, row in enumerate(rows, start=1):
            name = _SPLIT_NAMES.get(str(row.get(SPLIT_COLUMN, "")).strip().lower())
            if name is None:
                raise UsageError(
                    f"--dataset: row {number} of {paths[0]} has split {row.get(SPLIT_COLUMN)!r} "
                    "(expected train, val, validation or test)"
                )
            by_split[name].append(row)
        empty = [name for name, part in by_split.items() if not part]
        if empty:
            raise UsageError(f"--dataset: the {SPLIT_COLUMN!r} column of {paths[0]} names no {empty[0]} row")
        return by_split
    fractions = (0.7, 0.15, 0.15) if len(files) == 1 else (0.85, 0.15)
    parts = seeded_split(len(rows), fractions, seed)
    split = {name: [rows[i] for i in part] for name, part in zip(("train", "val", "test"), parts)}
    if len(files) == 2:
        split["test"] = files[1]
    return split


def load_text_dataset(spec: str, options: TextOptions, seed: int) -> Splits:
    """``csv:...`` / ``json:...`` tokenised by the model's tokenizer (module docstring)."""
    fmt, _, rest = spec.partition(":")
    paths = [Path(p) for p in rest.split(",") if p]
    if not 1 <= len(paths) <= 3:
        raise UsageError(f"--dataset {fmt}: give PATH, TRAIN,TEST or TRAIN,VAL,TEST, got {rest!r}")
    rows = _split_rows(fmt, paths, seed)
    where = dict(zip(("train", "val", "test"), paths if len(paths) == 3 else [paths[0], paths[0], paths[-1]]))
    texts, labels = {}, {}
    for name, part in rows.items():
        if not part:
            raise UsageError(f"--dataset: the {name} split of {spec} is empty; give more rows")
        texts[name] = [str(t) for t in _column(part, options.text_column, "--text-column", where[name])]
        labels[name] = _column(part, options.label_column, "--label-column", where[name])
    targets, names = _label_ids(labels)
    tokenizer = load_tokenizer(options.model)
    datasets = {}
    for name in rows:
        encoded = tokenizer(texts[name], truncation=True, max_length=options.max_length)["input_ids"]
        datasets[name] = TextDataset(encoded, targets[name])
    collate = PadCollate(tokenizer.pad_token_id, tokenizer.padding_side)
    return Splits(datasets["train"], datasets["val"], datasets["test"], len(names), class_names=names, collate=collate)


# -- model ---------------------------------------------------------------------------------------------
def hf_backbone(name: str, num_classes: int, options: TextOptions | None) -> Backbone:
    """``AutoModelForSequenceClassification`` from ``name`` for ``num_classes``, optionally with
    LoRA adapters (module docstring)."""
    from transformers import AutoModelForSequenceClassification

    labels = {i: str(i) for i in range(num_classes)}
    try:
        with _quiet_transformers():
            model, info = AutoModelForSequenceClassification.from_pretrained(
                name,
                num_labels=num_classes,
                id2label=labels,
                label2id={v: k for k, v in labels.items()},
                ignore_mismatched_sizes=True,
                output_loading_info=True,
                dtype=torch.float32,
            )
    except (OSError, ValueError) as error:
        raise UsageError(f"--model hf:{name}: no sequence classifier could be loaded ({_first_line(error)})") from None
    model.config.pad_token_id = load_tokenizer(name).pad_token_id  # what the batches are padded with
    fresh = set(info["missing_keys"]) | {key for key, *_ in info["mismatched_keys"]}
    new = [n for n, _ in model.named_parameters() if n in fresh]
    names = [n for n, _ in model.named_parameters()]
    classifier = [n for n in names if not under(model.base_model_prefix, n)]  # what the task added
    if not classifier or len(classifier) == len(names):
        classifier = [n for n in names if under(classifier_prefix(model), n)]
    if options is None or options.lora_r is None:
        return Backbone(model, classifier, new_params=new)
    return _with_lora(model, classifier, new, options)


def _with_lora(model: torch.nn.Module, classifier: list[str], new: list[str], options: TextOptions) -> Backbone:
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(
        r=options.lora_r,
        lora_alpha=options.lora_alpha if options.lora_alpha is not None else 2 * options.lora_r,
        target_modules=options.lora_targets,
        lora_dropout=0.0,
    )
    try:
        wrapped = get_peft_model(model, config)
    except ValueError as error:
        raise UsageError(f"--lora-targets: {_first_line(error)}") from None
    inner = "base_model.model."
    head = [inner + n for n in classifier]
    for name, param in wrapped.named_parameters():
        if name in head:
            param.requires_grad_(True)
    adapters = [n for n, _ in wrapped.named_parameters() if is_lora_adapter(n)]
    trained = set(adapters) | set(head)
    params = [n for n, _ in wrapped.named_parameters() if n in trained]
    fresh = {inner + n for n in new}
    return Backbone(wrapped, head, new_params=[n for n in params if n in fresh], params=params)
