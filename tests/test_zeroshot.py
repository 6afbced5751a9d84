"""Local zero-shot tasks: the shipped configs against lm-eval's own built-in configs on the same 3-example files,
metrics against loglikelihoods computed by hand, and the missing-file errors."""

import json
import math
import struct
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from any4lib.llama2c import Llama2cTokenizer
from any4lib.zeroshot import evaluate_tasks, list_tasks, task_config

lm_eval = pytest.importorskip("lm_eval")

# Three records per task in the hub datasets' schemas, including hellaswag's WikiHow artifacts, ARC's numeric
# answer labels and winogrande's answer "2".
FIXTURES = {
    "piqa": [
        {"goal": "How do I dry wet shoes?", "sol1": "Stuff them with paper.", "sol2": "Put them in water.", "label": 0},
        {"goal": "To cut bread,", "sol1": "use a spoon.", "sol2": "use a knife.", "label": 1},
        {"goal": "Keep a cat cool", "sol1": "Give it shade and water.", "sol2": "Give it a heater.", "label": 0},
    ],
    "hellaswag": [
        {"ind": 4, "activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow.",
         "ctx_b": "then", "ctx": "", "endings": [" , the man adds wax to the window.", "a woman smiles.",
         "the man continues [step] removing snow.", "the man sits down."], "source_id": "a", "split": "val",
         "split_type": "indomain", "label": "3"},
        {"ind": 9, "activity_label": "Home and Garden", "ctx_a": "[header] How to plant tulips [title] Dig a hole.",
         "ctx_b": "Place the bulb", "ctx": "", "endings": ["pointy end up. [title] Cover it.", "upside  down.",
         "in the fridge.", "on the roof [substeps] twice."], "source_id": "b", "split": "val",
         "split_type": "zeroshot", "label": "0"},
        {"ind": 12, "activity_label": "Baking cookies", "ctx_a": "A girl mixes flour and sugar.", "ctx_b": "",
         "ctx": "", "endings": ["She bakes them.", "She eats the bowl.", "She sings.", "She sleeps."],
         "source_id": "c", "split": "val", "split_type": "indomain", "label": "0"},
    ],  # fmt: skip
    "arc_easy": [
        {"id": "e1", "question": "Which is a liquid?", "choices": {"text": ["ice", "water", "steam"],
         "label": ["A", "B", "C"]}, "answerKey": "B"},
        {"id": "e2", "question": "What do plants need?", "choices": {"text": ["light", "noise", "plastic", "salt"],
         "label": ["1", "2", "3", "4"]}, "answerKey": "1"},
        {"id": "e3", "question": "The sun is a", "choices": {"text": ["planet", "star", "moon", "comet"],
         "label": ["A", "B", "C", "D"]}, "answerKey": "B"},
    ],  # fmt: skip
    "winogrande": [
        {"sentence": "Sarah was a better surgeon than Maria so _ got the hard cases.", "option1": "Sarah",
         "option2": "Maria", "answer": "1"},
        {"sentence": "The trophy did not fit in the case because _ was too small.", "option1": "the trophy",
         "option2": "the case", "answer": "2"},
        {"sentence": "Tom lent Bill money because _ was broke.", "option1": "Tom", "option2": "Bill", "answer": "2"},
    ],  # fmt: skip
    "lambada_openai": [
        {"text": "The cat sat on the mat and the dog sat on the mat"},
        {"text": "She opened the door and saw her friend standing by the door"},
        {"text": "He read a book"},
    ],
}
FIXTURES["arc_challenge"] = FIXTURES["arc_easy"]
SPLIT = {"piqa": "validation", "hellaswag": "validation", "arc_easy": "test", "arc_challenge": "test",
         "winogrande": "validation", "lambada_openai": "test"}  # fmt: skip


BUILTIN_YAML = {"piqa": "piqa/piqa.yaml", "hellaswag": "hellaswag/hellaswag.yaml", "arc_easy": "arc/arc_easy.yaml",
                "arc_challenge": "arc/arc_challenge.yaml", "winogrande": "winogrande/default.yaml",
                "lambada_openai": "lambada/lambada_openai.yaml"}  # fmt: skip


@pytest.fixture
def tasks_dir(tmp_path):
    for task, records in FIXTURES.items():
        (tmp_path / task).mkdir()
        lines = "".join(json.dumps(r) + "\n" for r in records)
        (tmp_path / task / f"{SPLIT[task]}.jsonl").write_text(lines)
    return tmp_path


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A random 2-layer Llama and a byte-level llama2.c tokenizer with a few merges, built without any download."""
    path = tmp_path_factory.mktemp("tok") / "tok.bin"
    pieces = ["<unk>", "\n<s>\n", "\n</s>\n"] + [f"<0x{b:02X}>" for b in range(256)]
    pieces += [" ", "e", "t", "a", "h", "th", " th", "the", " the", "he"]
    with open(path, "wb") as f:
        f.write(struct.pack("<i", max(len(p.encode()) for p in pieces)))
        for i, p in enumerate(pieces):
            raw = p.encode()
            f.write(struct.pack("<fi", len(p) - i / 1000, len(raw)) + raw)  # longer merges win
    tok = Llama2cTokenizer.from_file(path)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(pieces), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         bos_token_id=1, eos_token_id=2)  # fmt: skip
    return LlamaForCausalLM(config).eval(), tok


def requests(config):
    from lm_eval.tasks import TaskManager

    task = TaskManager(include_defaults=False).load([config])["tasks"][config["task"]]
    task.build_all_requests(rank=0, world_size=1)
    return [inst.args for inst in task.instances]


@pytest.mark.parametrize("task", sorted(FIXTURES))
def test_prompts_equal_lm_eval_builtin(tasks_dir, task):
    """Our config and lm-eval's own YAML for the task, both pointed at the same file, make the same requests."""
    from lm_eval.tasks._yaml_loader import load_yaml

    ours = task_config(task, tasks_dir)
    reference = load_yaml(Path(lm_eval.__file__).parent / "tasks" / BUILTIN_YAML[task])
    for key in ("training_split", "validation_split", "test_split", "dataset_name", "fewshot_split"):
        reference.pop(key, None)
    reference.update(dataset_path="json", dataset_kwargs=ours["dataset_kwargs"], tag=[])
    reference[f"{SPLIT[task]}_split"] = SPLIT[task]
    assert [m["metric"] for m in ours["metric_list"]] == [m["metric"] for m in reference["metric_list"]]
    assert requests(ours) == requests(reference)


def loglikelihood(model, tok, context, continuation):
    """log p(continuation | context) and whether it is the greedy continuation, tokenized as lm-eval 0.4 does:
    BOS (the tokenizer's default) + context + continuation encoded together, the continuation being the tokens
    after the context's own encoding."""
    whole = tok.encode(context + continuation)
    n_ctx = len(tok.encode(context))
    assert whole[0] == tok.bos_token_id
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].double(), -1)
    target = torch.tensor(whole[n_ctx:])
    rows = logp[n_ctx - 1 : len(whole) - 1]
    return rows.gather(1, target[:, None]).sum().item(), bool((rows.argmax(-1) == target).all())


def test_metrics_equal_hand_computed_loglikelihoods(tasks_dir, tiny_lm):
    model, tok = tiny_lm
    got = evaluate_tasks(model, tok, list(FIXTURES), data_dir=tasks_dir, batch_size=8)
    assert set(got) == set(FIXTURES)
    for task in got:
        assert 0.0 <= got[task]["acc"] <= 1.0

    acc, acc_norm = [], []
    for doc in FIXTURES["piqa"]:
        choices = [doc["sol1"], doc["sol2"]]
        ll = [loglikelihood(model, tok, f"Question: {doc['goal']}\nAnswer:", " " + c)[0] for c in choices]
        acc.append(max(range(2), key=lambda i: ll[i]) == doc["label"])
        acc_norm.append(max(range(2), key=lambda i: ll[i] / len(choices[i])) == doc["label"])
    assert got["piqa"]["acc"] == pytest.approx(sum(acc) / 3)
    assert got["piqa"]["acc_norm"] == pytest.approx(sum(acc_norm) / 3)

    scored = []
    for doc in FIXTURES["lambada_openai"]:
        context, last_word = doc["text"].rsplit(" ", 1)
        scored.append(loglikelihood(model, tok, context, " " + last_word))
    assert got["lambada_openai"]["perplexity"] == pytest.approx(math.exp(-sum(ll for ll, _ in scored) / 3))
    assert got["lambada_openai"]["acc"] == pytest.approx(sum(greedy for _, greedy in scored) / 3)


def test_missing_task_files_name_the_task_and_path(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=f"'piqa'.*{tmp_path / 'piqa' / 'validation.jsonl'}"):
        task_config("piqa", tmp_path)
    monkeypatch.setenv("ANY4_TASKS", str(tmp_path / "elsewhere"))
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "elsewhere" / "lambada_openai" / "test.jsonl")):
        task_config("lambada", None)  # the alias resolves to lambada_openai, the folder to $ANY4_TASKS
    with pytest.raises(ValueError, match="shipped tasks: arc_challenge"):
        task_config("mmlu")
    assert list_tasks() == sorted(FIXTURES)


@pytest.fixture
def registry(tmp_path, monkeypatch):
    """A stand-in for lm-eval's task registry (a TaskManager over one task folder) with the hub 'reachable':
    task `two_choice` has a train split of one record twice (so its 1-shot context is known whichever lm-eval draws)
    and 3 validation records."""
    from lm_eval.tasks import TaskManager

    from any4lib import zeroshot

    train = [{"q": "Is ice cold?", "choices": ["yes", "no"], "label": 0}] * 2
    valid = [{"q": "Is fire cold?", "choices": ["yes", "no"], "label": 1},
             {"q": "Is snow white?", "choices": ["yes", "no"], "label": 0},
             {"q": "Is coal white?", "choices": ["yes", "no"], "label": 1}]  # fmt: skip
    for split, records in (("train", train), ("validation", valid)):
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (tmp_path / "two_choice.yaml").write_text(
        f"task: two_choice\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    train: {tmp_path}/train.jsonl\n"
        f"    validation: {tmp_path}/validation.jsonl\noutput_type: multiple_choice\ntraining_split: train\n"
        "validation_split: validation\ndoc_to_text: \"Q: {{q}}\\nA:\"\ndoc_to_target: label\n"
        "doc_to_choice: \"{{choices}}\"\nmetric_list:\n  - {metric: acc, aggregation: mean, higher_is_better: true}\n"
    )
    manager = TaskManager(include_path=str(tmp_path), include_defaults=False)
    monkeypatch.setattr(zeroshot, "task_registry", lambda: manager)
    monkeypatch.setattr(zeroshot, "hub_reachable", lambda: True)
    monkeypatch.delenv("ANY4_TASKS", raising=False)
    return train, valid


def test_registry_tasks_run_by_name_with_few_shot_and_limit(registry, tiny_lm):
    model, tok = tiny_lm
    train, valid = registry
    seen = []

    def record(module, args, kwargs):
        seen.extend((args[0] if args else kwargs["input_ids"]).tolist())

    handle = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        got = evaluate_tasks(model, tok, ["two_choice"], num_fewshot=1, limit=2, batch_size=4)
    finally:
        handle.remove()
    shot = train[0]
    context = f"Q: {shot['q']}\nA: {shot['choices'][shot['label']]}\n\n"  # the one training record, lm-eval's layout
    correct = []
    for doc in valid[:2]:  # limit=2
        ll = [loglikelihood(model, tok, context + f"Q: {doc['q']}\nA:", " " + c)[0] for c in doc["choices"]]
        correct.append(max(range(2), key=lambda i: ll[i]) == doc["label"])
    assert got["two_choice"]["acc"] == pytest.approx(sum(correct) / 2)
    inputs = [tok.decode(ids) for ids in seen]
    assert any(context + "Q: Is snow white?" in text for text in inputs)  # the shot reached the model
    assert not any("coal" in text for text in inputs)  # the third record is past the limit
    with pytest.raises(ValueError, match="lm-eval has no task 'mmlu_pro_x'.*shipped local tasks: arc_challenge"):
        evaluate_tasks(model, tok, ["mmlu_pro_x"])


def test_offline_without_a_local_copy_names_both_sources(tmp_path, monkeypatch):
    from any4lib import zeroshot

    monkeypatch.setattr(zeroshot, "hub_reachable", lambda: False)
    monkeypatch.delenv("ANY4_TASKS", raising=False)
    monkeypatch.setenv("ANY4_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="'mmlu': the Hugging Face hub is unreachable.*shipped tasks: arc_"):
        zeroshot.resolve_task("mmlu")
    with pytest.raises(FileNotFoundError, match=f"'piqa': the Hugging Face hub is unreachable.*{tmp_path}/tasks/piqa"):
        zeroshot.resolve_task("piqa")
    (tmp_path / "tasks" / "piqa").mkdir(parents=True)
    (tmp_path / "tasks" / "piqa" / "validation.jsonl").write_text("{}\n")
    assert zeroshot.resolve_task("piqa")["dataset_kwargs"]["data_files"]["validation"].startswith(str(tmp_path))
