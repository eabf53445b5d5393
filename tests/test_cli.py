"""The `hf-distill` command line: help, train from flags and YAML, precompute -> train, dtypes, refused input.

Tiny BERT/GPT-2 models built from configs, a word-level tokenizer built offline over the docstrings of a few standard
library modules, and CSV files in tmp_path: nothing is downloaded.
"""

from __future__ import annotations

import csv
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import REPO_ROOT
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    PreTrainedTokenizerFast,
)

from hf_distill.cli import BadInputError, build_trainer, main, parse_args, run


SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
LABELS = ["negative", "neutral", "positive"]
COMMON = ["--max_steps", "3", "--per_device_train_batch_size", "4", "--per_device_eval_batch_size", "8"]
COMMON += ["--report_to", "none", "--use_cpu", "--logging_steps", "1", "--save_strategy", "no", "--seed", "0"]


def _words() -> list[str]:
    import argparse as a
    import csv as c
    import json as j
    import textwrap as t

    text = " ".join(filter(None, [m.__doc__ for m in (a, c, j, t)]))
    return re.findall(r"[a-z]+", text.lower())


def _tokenizer(words: list[str], size: int) -> PreTrainedTokenizerFast:
    vocab = {token: i for i, token in enumerate(SPECIAL)}
    for word in sorted(set(words))[:size]:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]"
    )


def _bert(vocab_size: int, num_labels: int = 3, seed: int = 0) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=37,
        max_position_embeddings=64,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(config)


def _rows() -> list[tuple[str, str]]:
    """40 six-word sentences of real text, labelled in turn with the three LABELS."""
    words = _words()
    return [(" ".join(words[i : i + 6]), LABELS[i // 6 % 3]) for i in range(0, 6 * 40, 6)]


def _write_csv(path: Path, rows: list[tuple[str, str]]) -> str:
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.writer(file)
        writer.writerow(["sentence", "label"])
        writer.writerows(rows)
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    words = _words()
    tokenizer, other_tokenizer = _tokenizer(words, 300), _tokenizer(words[::-1], 200)
    paths = {}
    for name, model, tok in (
        ("teacher", _bert(len(tokenizer), seed=1), tokenizer),
        ("other_teacher", _bert(len(tokenizer), seed=2), tokenizer),
        ("student", _bert(len(tokenizer), seed=3), tokenizer),
        ("student_2_labels", _bert(len(tokenizer), num_labels=2, seed=4), tokenizer),
        ("foreign_teacher", _bert(len(other_tokenizer), seed=5), other_tokenizer),
    ):
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
        paths[name] = str(root / name)
    torch.manual_seed(6)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=64))
    gpt2.save_pretrained(root / "gpt2")
    tokenizer.save_pretrained(root / "gpt2")
    paths["gpt2"] = str(root / "gpt2")
    rows = _rows()
    paths["train"] = _write_csv(root / "train.csv", rows[:28])
    paths["validation"] = _write_csv(root / "validation.csv", rows[28:36])
    paths["unseen_label"] = _write_csv(root / "unseen.csv", [(s, "sarcastic") for s, _ in rows[36:]])
    paths["root"] = root
    return paths


def _train_flags(setup, output_dir, *extra) -> list[str]:
    return [
        "--student_model_name_or_path", setup["student"],
        "--teacher_model_name_or_path", setup["teacher"],
        "--train_file", setup["train"],
        "--validation_file", setup["validation"],
        "--text_column", "sentence",
        "--max_length", "16",
        "--output_dir", str(output_dir),
        *COMMON,
        *extra,
    ]  # fmt: skip


def _losses(output_dir) -> list[float]:
    state = json.loads(Path(output_dir, "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


@pytest.fixture(scope="module")
def trained(setup):
    output_dir = setup["root"] / "run_flags"
    main(["train", *_train_flags(setup, output_dir)])
    return output_dir


# ---- help ----


def test_help_lists_commands_and_grouped_arguments(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    assert "train" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for expected in ("model arguments:", "data arguments:", "distillation and training arguments"):
        assert expected in out
    for argument in ("--student_model_name_or_path", "--teacher_model_init_kwargs", "--text_column", "--temperature"):
        assert argument in out
    with pytest.raises(SystemExit):
        main(["precompute", "--help"])
    assert "--top_k" in capsys.readouterr().out


@pytest.mark.slow
def test_python_dash_m_help():
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    for argv in (["--help"], ["train", "--help"]):
        result = subprocess.run(
            [sys.executable, "-m", "hf_distill", *argv], capture_output=True, text=True, env=env, timeout=120
        )
        assert result.returncode == 0, result.stderr
        assert "hf-distill" in result.stdout
    assert "--alpha" in result.stdout and "--train_file" in result.stdout


# ---- train ----


def test_train_writes_student_card_and_metrics(trained):
    for name in ("config.json", "model.safetensors", "tokenizer.json", "README.md", "all_results.json"):
        assert (trained / name).is_file(), name
    eval_results = json.loads((trained / "eval_results.json").read_text())
    for key in ("eval_loss", "eval_loss_kd", "eval_teacher_agreement", "eval_fidelity_kl_teacher_student"):
        assert key in eval_results
    assert 0.0 <= eval_results["eval_fidelity_student_ece"] <= 1.0
    assert "eval_loss" in json.loads((trained / "all_results.json").read_text())
    config = json.loads((trained / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "neutral", "2": "positive"}
    assert "teacher" in (trained / "README.md").read_text().lower()


def test_yaml_config_gives_the_same_run_as_flags(setup, trained, tmp_path):
    flags = _train_flags(setup, tmp_path / "run_yaml")
    values = {}
    for i, token in enumerate(flags):
        if token.startswith("--"):
            following = flags[i + 1] if i + 1 < len(flags) and not flags[i + 1].startswith("--") else True
            values[token[2:]] = following
    values["max_steps"] = 99  # overridden by the flag below
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump(values))
    main(["train", str(config), "--max_steps", "3"])
    assert _losses(tmp_path / "run_yaml") == _losses(trained)
    assert len(_losses(trained)) == 3


# ---- precompute -> train ----


def test_precompute_then_train_without_teacher_and_refuse_another_teacher(setup, tmp_path):
    cache = tmp_path / "cache"
    cached = run(
        ["precompute", "--teacher_model_name_or_path", setup["teacher"], "--train_file", setup["train"]]
        + ["--text_column", "sentence", "--max_length", "16", "--output_dir", str(cache), "--dtype", "float32"]
        + ["--report_to", "none", "--use_cpu"]
    )
    assert "teacher_logits" in cached.column_names and (cache / "dataset_info.json").is_file()
    flags = _train_flags(setup, tmp_path / "from_cache")
    flags = flags[:2] + flags[4:]  # no teacher
    flags[flags.index("--train_file") : flags.index("--train_file") + 2] = ["--train_dataset_path", str(cache)]
    trainer = run(["train", *flags])
    assert trainer.teacher_model is None and (tmp_path / "from_cache" / "model.safetensors").is_file()

    model_args, data_args, training_args = parse_args(
        "train", [*flags, "--teacher_model_name_or_path", setup["other_teacher"]]
    )
    with pytest.raises(BadInputError, match=r"cached teacher outputs come from teacher\(s\)"):
        build_trainer(model_args, data_args, training_args)


# ---- teacher dtype only from its own kwargs ----


@pytest.mark.parametrize("who", ["student", "teacher"])
def test_dtype_of_one_model_leaves_the_other_float32(setup, tmp_path, who):
    kwargs = json.dumps({"dtype": "bfloat16"})
    flags = _train_flags(setup, tmp_path / "out", f"--{who}_model_init_kwargs", kwargs)
    trainer = build_trainer(*parse_args("train", flags))
    expected = {"student": torch.bfloat16, "teacher": torch.float32}
    if who == "teacher":
        expected = {"student": torch.float32, "teacher": torch.bfloat16}
    assert trainer.model.dtype == expected["student"]
    assert trainer.teacher_model.dtype == expected["teacher"]


# ---- refused input ----


def _refused(argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_unknown_task(setup, tmp_path, capsys):
    err = _refused(["train", *_train_flags(setup, tmp_path, "--task", "summarization")], capsys)
    assert "--task" in err and "invalid choice" in err


def test_missing_columns_name_the_columns_that_exist(setup, tmp_path, capsys):
    flags = _train_flags(setup, tmp_path)
    flags[flags.index("sentence")] = "text"
    err = _refused(["train", *flags], capsys)
    assert "no column 'text' (`--text_column`)" in err and "['sentence', 'label']" in err
    err = _refused(["train", *_train_flags(setup, tmp_path, "--label_column", "stars")], capsys)
    assert "`--label_column`" in err and "['sentence', 'label']" in err


def test_validation_label_outside_the_training_labels(setup, tmp_path, capsys):
    flags = _train_flags(setup, tmp_path)
    flags[flags.index(setup["validation"])] = setup["unseen_label"]
    err = _refused(["train", *flags], capsys)
    assert "labels ['sarcastic']" in err and "--validation_file" in err


def test_num_labels_mismatch(setup, tmp_path, capsys):
    flags = _train_flags(setup, tmp_path)
    flags[flags.index(setup["student"])] = setup["student_2_labels"]
    err = _refused(["train", *flags], capsys)
    assert "num_labels=2" in err and "--student_model_init_kwargs '{\"num_labels\": 3}'" in err


def test_teacher_with_another_tokenizer(setup, tmp_path, capsys):
    flags = _train_flags(setup, tmp_path)
    flags[flags.index(setup["teacher"])] = setup["foreign_teacher"]
    err = _refused(["train", *flags], capsys)
    assert "different tokenizer" in err and "--teacher_model_name_or_path" in err


def test_causal_lm_teacher_with_another_tokenizer(setup, tmp_path, capsys):
    argv = ["train", "--student_config", setup["gpt2"], "--teacher_model_name_or_path", setup["foreign_teacher"]]
    argv += ["--task", "causal-lm", "--train_file", setup["train"], "--text_column", "sentence"]
    err = _refused([*argv, "--output_dir", str(tmp_path), "--use_cpu", "--report_to", "none"], capsys)
    assert "tokens, which would not be the student's" in err and "--teacher_model_name_or_path" in err


def test_no_student(setup, tmp_path, capsys):
    flags = _train_flags(setup, tmp_path)
    err = _refused(["train", *flags[2:]], capsys)
    assert "No student given" in err and "--student_config" in err


# ---- recipes ----

RECIPES = sorted((REPO_ROOT / "examples" / "recipes").glob("*.yaml"))


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_recipes_parse(recipe):
    """Each recipe parses with its command's parser (paths are not opened: the assets come from a script)."""
    command = "precompute" if recipe.stem.endswith("_precompute") else "train"
    model_args, data_args, *_, training_args = parse_args(command, [str(recipe)])
    assert training_args.output_dir.startswith("outputs/recipes/")
    assert model_args.teacher_model_name_or_path or data_args.train_dataset_path


def test_there_are_recipes():
    assert {p.name for p in RECIPES} >= {"text_classification.yaml", "causal_lm_top_k.yaml", "distilbert.yaml"}


def test_token_classification_from_jsonl(setup, tmp_path):
    """Words and one tag per word: the first sub-token of each word carries its tag, the student learns from flags."""
    from transformers import BertConfig, BertForTokenClassification

    tokenizer_dir = setup["teacher"]
    config = BertConfig.from_pretrained(tokenizer_dir, num_labels=2, architectures=None)
    for name, seed in (("tok_teacher", 7), ("tok_student", 8)):
        torch.manual_seed(seed)
        BertForTokenClassification(config).save_pretrained(tmp_path / name)
        PreTrainedTokenizerFast.from_pretrained(tokenizer_dir).save_pretrained(tmp_path / name)
    rows = [{"words": s.split(), "tags": ["O" if len(w) < 5 else "LONG" for w in s.split()]} for s, _ in _rows()]
    for split, part in (("train", rows[:16]), ("validation", rows[16:20])):
        (tmp_path / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in part))
    argv = ["train", "--student_model_name_or_path", str(tmp_path / "tok_student")]
    argv += [
        "--teacher_model_name_or_path",
        str(tmp_path / "tok_teacher"),
        "--train_file",
        str(tmp_path / "train.jsonl"),
    ]
    argv += [
        "--validation_file",
        str(tmp_path / "validation.jsonl"),
        "--text_column",
        "words",
        "--label_column",
        "tags",
    ]
    trainer = run([*argv, "--output_dir", str(tmp_path / "out"), *COMMON])
    assert trainer.cli_task == "token-classification"
    labels = trainer.train_dataset[0]["labels"]
    assert len(labels) == len(rows[0]["words"]) and set(labels) <= {0, 1}  # one token per word here: no -100
    assert trainer.model.config.id2label == {0: "LONG", 1: "O"}
    assert "eval_loss" in json.loads((tmp_path / "out" / "eval_results.json").read_text())


def test_console_script_is_declared():
    assert 'hf-distill = "hf_distill.cli:main"' in (REPO_ROOT / "pyproject.toml").read_text()
