"""bayeskern-finetune on text (issue 18, item 3): ``--model hf:DIR`` with ``--dataset csv:``/``json:``.

A tiny LLaMA sequence classifier (``hf_models``) saved with ``save_pretrained`` to a temporary folder,
a word-level tokenizer built offline with ``tokenizers`` and saved next to it, and small CSV / JSON
files the tests write.  Every run goes through ``bayeskern.app.cli.main`` in this process.
"""

from __future__ import annotations

import json
import random

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from hf_models import llama_classifier, roberta_classifier

from bayeskern.app.cli import main
from bayeskern.app.config import ALL_METHODS
from bayeskern.app.errors import UsageError
from bayeskern.app.methods import METHODS
from bayeskern.app.text import PadCollate, TextOptions, load_text_dataset

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")

WORDS = [f"w{i}" for i in range(2, 64)]  # ids 2..63 after [PAD], [UNK]: the model's vocabulary of 64
TINY = [
    "--epochs",
    "1",
    "--sgld-epochs",
    "1",
    "--sgld-thin",
    "1",
    "--sgld-burnin",
    "0",
    "--dropout-epochs",
    "1",
    "--batch-size",
    "16",
    "--num-samples",
    "2",
    "--lr",
    "1e-2",
    "--quiet",
    "--corruptions",
    "none",
    "--laplace-optimize",
    "marglik",  # the val_nll grid search runs the predictive 17 times
]


def save_checkpoint(model, folder):
    """``model`` and a word-level tokenizer of ``WORDS``, saved as a hub checkpoint is."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    model.save_pretrained(folder)
    vocab = {word: i for i, word in enumerate(["[PAD]", "[UNK]", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]").save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """The tiny LLaMA classifier (3 labels) and its tokenizer."""
    return save_checkpoint(llama_classifier(), tmp_path_factory.mktemp("tiny-llama"))


def rows(n: int = 48, seed: int = 0) -> list[dict]:
    """Texts of 2-9 words; the label says whether ``w2`` (pos) or ``w3`` (neg) leads."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        label = ("neg", "pos")[i % 2]
        words = [("w3", "w2")[i % 2], *rng.choices(WORDS[2:], k=rng.randint(1, 8))]
        out.append({"text": " ".join(words), "label": label})
    return out


def write_csv(path, records: list[dict]) -> str:
    columns = list(records[0])
    lines = [",".join(columns)] + [",".join(str(r[c]) for c in columns) for r in records]
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def _run(tmp_path, model_dir, dataset, *extra, name="run"):
    argv = [*TINY, "--model", f"hf:{model_dir}", "--dataset", dataset, "--out", str(tmp_path), "--name", name]
    return main([*argv, *extra])


def _checkpoint_state(run_dir, method):
    return torch.load(run_dir / method / "checkpoint.pt", weights_only=True)["state"]


# -- data: fast, no model ------------------------------------------------------------------------------
def _options(model_dir, **overrides) -> TextOptions:
    return TextOptions(str(model_dir), **overrides)


def test_one_file_is_split_70_15_15_with_the_seed_and_class_names_sorted(tmp_path, model_dir):
    data = write_csv(tmp_path / "d.csv", rows(40))
    splits = load_text_dataset(f"csv:{data}", _options(model_dir), seed=0)
    again = load_text_dataset(f"csv:{data}", _options(model_dir), seed=0)
    other = load_text_dataset(f"csv:{data}", _options(model_dir), seed=1)
    assert [len(s) for s in (splits.train, splits.val, splits.test)] == [28, 6, 6]
    assert splits.class_names == ["neg", "pos"] and splits.num_classes == 2
    assert splits.train.encodings == again.train.encodings and splits.train.encodings != other.train.encodings
    first = splits.train[0]
    leading = first["input_ids"][0].item()  # w2 (id 2) leads the pos texts, w3 (id 3) the neg ones
    assert first["labels"].item() == {2: 1, 3: 0}[leading]


def test_split_column_and_three_files_choose_the_splits(tmp_path, model_dir):
    records = rows(12)
    for i, r in enumerate(records):
        r["split"] = ("train", "train", "validation", "test")[i % 4]
    splits = load_text_dataset(f"csv:{write_csv(tmp_path / 's.csv', records)}", _options(model_dir), seed=0)
    assert [len(s) for s in (splits.train, splits.val, splits.test)] == [6, 3, 3]
    paths = [write_csv(tmp_path / f"{n}.csv", rows(k, seed)) for n, k, seed in (("a", 10, 0), ("b", 4, 1), ("c", 6, 2))]
    splits = load_text_dataset("csv:" + ",".join(paths), _options(model_dir), seed=0)
    assert [len(s) for s in (splits.train, splits.val, splits.test)] == [10, 4, 6]
    two = load_text_dataset(f"csv:{paths[0]},{paths[2]}", _options(model_dir), seed=0)
    assert [len(s) for s in (two.train, two.val, two.test)] == [8, 2, 6]  # 15% of train held out


def test_json_and_json_lines_with_integer_labels_keep_their_ids(tmp_path, model_dir):
    records = [{"sentence": r["text"], "y": i % 3} for i, r in enumerate(rows(20))]
    (tmp_path / "a.json").write_text(json.dumps(records))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    options = _options(model_dir, text_column="sentence", label_column="y")
    for name in ("a.json", "b.jsonl"):
        splits = load_text_dataset(f"json:{tmp_path / name}", options, seed=0)
        assert splits.class_names == ["0", "1", "2"]
        every = torch.cat([splits.train.targets, splits.val.targets, splits.test.targets])
        assert sorted(every.tolist()) == sorted(i % 3 for i in range(20))


def test_texts_are_truncated_and_batches_padded_on_the_tokenizer_side(tmp_path, model_dir):
    data = write_csv(tmp_path / "d.csv", rows(20))
    splits = load_text_dataset(f"csv:{data}", _options(model_dir, max_length=3), seed=0)
    assert max(len(e) for e in splits.train.encodings) == 3
    examples = [{"input_ids": torch.tensor(ids), "attention_mask": torch.ones(len(ids), dtype=torch.long),
                 "labels": torch.tensor(label)} for ids, label in (([5, 6, 7], 0), ([8], 1))]  # fmt: skip
    right, left = PadCollate(0, "right")(examples), PadCollate(9, "left")(examples)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert left["input_ids"].tolist() == [[5, 6, 7], [9, 9, 8]] and left["attention_mask"][1].tolist() == [0, 0, 1]
    assert right["labels"].tolist() == [0, 1]


@pytest.mark.parametrize(
    "labels, message",
    [
        (["0.5", "1"], "is not an integer"),
        (["1", "pos"], "mixes integer class ids and class names"),
        (["-1", "0"], "must be >= 0"),
        (["pos", ""], "is empty"),
    ],
)
def test_labels_that_cannot_be_class_ids_are_rejected(tmp_path, model_dir, labels, message):
    records = [{"text": r["text"], "label": labels[i % 2]} for i, r in enumerate(rows(20))]
    with pytest.raises(UsageError, match=message):
        load_text_dataset(f"csv:{write_csv(tmp_path / 'd.csv', records)}", _options(model_dir), seed=0)


def test_a_class_unseen_in_train_is_rejected(tmp_path, model_dir):
    train = write_csv(tmp_path / "train.csv", rows(10))
    test = write_csv(tmp_path / "test.csv", [{"text": "w5 w6", "label": "maybe"}, *rows(4)])
    with pytest.raises(UsageError, match="'maybe' of the test split does not occur in train"):
        load_text_dataset(f"csv:{train},{test}", _options(model_dir), seed=0)


# -- the CLI end to end --------------------------------------------------------------------------------
@pytest.mark.slow
def test_every_method_runs_on_a_csv_and_records_the_class_names(tmp_path, model_dir, capsys):
    data = write_csv(tmp_path / "d.csv", rows(48))
    assert _run(tmp_path, model_dir, f"csv:{data}") == 0
    table = capsys.readouterr().out
    assert all(f"| {m} |" in table for m in ALL_METHODS)
    payload = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert set(payload["methods"]) == set(ALL_METHODS)
    assert payload["config"]["class_names"] == ["neg", "pos"] and payload["config"]["pretrained"] == "hf"
    for result in payload["methods"].values():
        assert set(result["test"]) >= {"error", "ece", "mce", "nll", "brier"} and result["temperature"] > 0
    assert all((tmp_path / "run" / f"reliability_{m}.png").stat().st_size > 0 for m in ALL_METHODS)


def _base_name(name: str) -> str:
    """A LoRA-wrapped parameter's name in the plain model (``base_model.model.`` and ``base_layer.`` dropped)."""
    return name.removeprefix("base_model.model.").replace(".base_layer.", ".")


@pytest.mark.slow
def test_lora_trains_only_the_adapters_and_the_head_on_json(tmp_path, model_dir):
    from safetensors.torch import load_file

    records = [{"review": r["text"], "label": r["label"]} for r in rows(48)]
    (tmp_path / "d.json").write_text(json.dumps(records))
    code = _run(
        tmp_path,
        model_dir,
        f"json:{tmp_path / 'd.json'}",
        "--text-column",
        "review",
        "--lora-r",
        "2",
        "--lora-targets",
        "q_proj,v_proj",
        "--method",
        "vanilla,vi,mc_dropout,sgld,laplace,kron_laplace,ivon",
        name="lora",
    )
    assert code == 0
    saved = load_file(str(model_dir / "model.safetensors"))
    for method in ("vanilla", "sgld", "ivon"):
        state = _checkpoint_state(tmp_path / "lora", method)["model"]
        base = {k: v for k, v in state.items() if "lora_" not in k and "score" not in k}
        assert base and all(torch.equal(v, saved[_base_name(k)]) for k, v in base.items()), method
        adapters = [v for k, v in state.items() if "lora_B" in k]
        assert len(adapters) == 4 and all(v.abs().sum() > 0 for v in adapters)  # peft starts B at zero
        assert state["base_model.model.score.weight"].shape == (2, 32)
    for method in ("vi", "mc_dropout"):
        posterior = _checkpoint_state(tmp_path / "lora", method)["posterior"]
        bayesian = {k.split(".", 1)[1].replace("/", ".") for k in posterior if k.startswith("prior.")}
        assert bayesian and all("lora_" in n or n == "base_model.model.score.weight" for n in bayesian)
        assert not any(k.startswith("point.") for k in posterior)  # the frozen base is read, never copied
        lora_a = [v for k, v in posterior.items() if k.startswith("prior.") and "lora_A" in k and ":" not in k]
        assert lora_a and all(v.dim() == 2 and v.abs().sum() > 0 for v in lora_a)  # the initial adapters, not zero
    result = json.loads((tmp_path / "lora" / "metrics.json").read_text())
    assert set(result["methods"]) == set(METHODS)


@pytest.mark.slow
def test_lora_on_roberta_with_peft_default_targets_trains_the_whole_head(tmp_path):
    folder = save_checkpoint(roberta_classifier(), tmp_path / "tiny-roberta")
    data = write_csv(tmp_path / "d.csv", rows(48))
    extra = ("--lora-r", "2", "--max-length", "8", "--method", "vanilla,laplace")  # 11 positions, 2 reserved
    assert _run(tmp_path, folder, f"csv:{data}", *extra, name="roberta") == 0
    before = roberta_classifier().state_dict()
    state = _checkpoint_state(tmp_path / "roberta", "vanilla")["model"]
    adapters = {k for k in state if "lora_" in k}
    assert adapters and all(".query." in k or ".value." in k for k in adapters)  # peft's defaults for RoBERTa
    for key, value in state.items():
        if key not in adapters:
            changed = not torch.equal(value, before[_base_name(key)])
            assert changed == (".classifier." in key), key  # dense and out_proj both train; the body does not


@pytest.mark.slow
def test_resume_continues_a_text_run_exactly(tmp_path, model_dir):
    data = write_csv(tmp_path / "d.csv", rows(48))
    args = ("--method", "vanilla,vi,sgld", "--epochs", "2", "--sgld-epochs", "2", "--lora-r", "2")
    assert _run(tmp_path, model_dir, f"csv:{data}", *args, name="whole") == 0
    assert _run(tmp_path, model_dir, f"csv:{data}", *args, "--stop-after-epoch", "1", name="cut") == 3
    assert _run(tmp_path, model_dir, f"csv:{data}", *args, "--resume", name="cut") == 0
    whole = json.loads((tmp_path / "whole" / "metrics.json").read_text())["methods"]
    resumed = json.loads((tmp_path / "cut" / "metrics.json").read_text())["methods"]
    for method in ("vanilla", "vi", "sgld"):
        assert whole[method]["test"] == pytest.approx(resumed[method]["test"], rel=1e-6, abs=1e-9), method


@pytest.mark.slow
@pytest.mark.parametrize(
    "extra, message",
    [
        (["--text-column", "sentence"], "--text-column 'sentence': row 1"),
        (["--dataset", "csv:/no/such/file.csv"], "/no/such/file.csv not found"),
        (["--lora-r", "2", "--lora-targets", "no_such_proj"], "--lora-targets: "),
        (["--lora-targets", "q_proj"], "need --lora-r"),
        (["--dataset", "digits"], "classifies text"),
        (["--model", "convnet"], "holds text"),
        (["--model", "hf:/no/such/model"], "--model hf:/no/such/model: no such directory"),
        (["--max-length", "0"], "--max-length must be at least 1"),
        (["--pretrained", "timm"], "drop --pretrained"),
    ],
)
def test_bad_text_input_exits_2_with_one_line(tmp_path, model_dir, capsys, extra, message):
    data = write_csv(tmp_path / "d.csv", rows(20))
    code = _run(tmp_path, model_dir, f"csv:{data}", "--method", "vanilla", *extra)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1 and message in err and "Traceback" not in err
