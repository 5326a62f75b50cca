"""The bad-input corpus (issue 12): every entry point — study specs, data files, answers files, checkpoints, CLI options
— given what a tired or hostile user would give. Each case must end in one line ``evalkit: error: …`` naming the value
and what was expected, exit status 2, and leave every existing artifact byte-identical.

Cases run in-process through ``evalkit.cli.main`` (the same path as the installed command, without the import cost of
a subprocess). HTTP requests go over a socket to the labeling app served by `evalkit study serve` in its own
process: each must get its 4xx page (never a 500 or a traceback) and leave the stored judgments and the study's files as
they were.
"""

import json
import sys
from pathlib import Path

import pytest
from conftest import ROOT, baseline_study

RECORD = json.loads((ROOT / "evalkit/data/bundled/openai_sff/batch18.json").read_text().splitlines()[0])


@pytest.fixture(scope="module")
def world(tmp_path_factory, pretrained):
    """A built study (tasks, no judgments yet), a checkpoint, and a snapshot function over every file."""
    root = tmp_path_factory.mktemp("bad")
    cfg, built = baseline_study(root / "run", "data.n_items=20", "design.items_per_policy=8", "labelers.count=3")
    import shutil

    shutil.copytree(pretrained, root / "ckpt")
    tasks = built["tasks"]
    return {"root": root, "run": root / "run", "ckpt": root / "ckpt", "task": tasks["task_id"].iloc[0],
            "labeler": tasks["labeler_id"].iloc[0]}


def snapshot(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file() and "cases" not in p.parts}


def run_main(args, monkeypatch, capsys):
    from evalkit.cli import main

    monkeypatch.setattr(sys, "argv", ["evalkit", *map(str, args)])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:
        main()
    out = capsys.readouterr()
    return exc.value.code, out.err


def _rec(**changes):
    rec = json.loads(json.dumps(RECORD))
    for key, value in changes.items():
        node, *path = key.split(".")
        target = rec
        for k in [node, *path][:-1]:
            target = target[int(k)] if isinstance(target, list) else target[k]
        last = [node, *path][-1]
        if isinstance(target, list):
            target[int(last)] = value
        else:
            target[last] = value
    return json.dumps(rec)


def _spec(body: str) -> str:
    return "[study]\nid = 'bad'\n" + body


# ---------------------------------------------------------------------------------------------- the cases
# (name, kind, content, args, expected words); kind: spec (study.toml), file (written as given), none.
# {file} is the case's file, {run} the study folder, {ckpt} a trained checkpoint, {task}/{labeler} a real task.

SPEC_CASES = [
    ("spec-not-utf8", b"[study]\nid = '\xff\xfe'\n", "not UTF-8"),
    ("spec-invalid-toml", "[study\nid = 1", "invalid TOML"),
    ("spec-unknown-section", _spec("[colours]\nred = 1\n"), "unknown key 'colours'"),
    ("spec-unknown-key", _spec("[data]\ncolour = 'red'\n"), "unknown key 'colour'"),
    ("spec-n-items-str", _spec("[data]\nn_items = 'many'\n"), "data.n_items: expected int"),
    ("spec-n-items-neg", _spec("[data]\nn_items = -3\n"), "data.n_items is -3"),
    ("spec-n-items-float", _spec("[data]\nn_items = 2.5\n"), "data.n_items: expected int"),
    ("spec-n-items-bool", _spec("[data]\nn_items = true\n"), "data.n_items: expected int"),
    ("spec-split-int", _spec("[data]\nsplit = 3\n"), "data.split: expected str"),
    ("spec-split-unknown", _spec("[data]\nsplit = 'valid9'\n"), "valid9"),
    ("spec-dataset-unknown", _spec("[data]\ndataset = 'reddit'\n"), "unknown dataset 'reddit'"),
    ("spec-data-path-missing", _spec("[data]\npath = '/no/such/file.csv'\n"), "/no/such/file.csv"),
    ("spec-transfer-unknown", _spec("[data]\ntransfer = 'xsum'\n"), "data.transfer is 'xsum'"),
    ("spec-transfer-same", _spec("[data]\ntransfer = 'tldr'\n"), "data.transfer is 'tldr'"),
    ("spec-transfer-items-neg", _spec("[data]\ntransfer_items = -1\n"), "data.transfer_items is -1"),
    ("spec-items-per-policy-neg", _spec("[design]\nitems_per_policy = -5\n"), "design.items_per_policy is -5"),
    ("spec-items-per-policy-zero", _spec("[design]\nitems_per_policy = 0\n"), "design.items_per_policy is 0"),
    ("spec-overlap-labelers-zero", _spec("[design]\noverlap_labelers = 0\n"), "design.overlap_labelers is 0"),
    ("spec-sentinels-neg", _spec("[design]\nsentinels_per_batch = -2\n"), "design.sentinels_per_batch is -2"),
    ("spec-batch-size-zero", _spec("[design]\nbatch_size = 0\n"), "design.batch_size is 0"),
    ("spec-overlap-fraction", _spec("[design]\noverlap_fraction = 2.0\n"), "design.overlap_fraction is 2.0"),
    ("spec-gold-fraction-neg", _spec("[design]\ngold_fraction = -0.1\n"), "design.gold_fraction is -0.1"),
    ("spec-design-kind", _spec("[design]\nkind = 'ranking'\n"), "design.kind 'ranking'"),
    ("spec-labelers-zero", _spec("[labelers]\ncount = 0\n"), "labelers.count is 0"),
    ("spec-labelers-dup", _spec("[labelers]\nids = ['a', 'a']\n"), "labelers"),
    ("spec-labelers-str", _spec("[labelers]\ncount = 'six'\n"), "labelers.count: expected int"),
    ("spec-crowd-no-code", _spec("[crowd]\nenrol = true\n"), "no crowd.completion_code"),
    ("spec-crowd-url-js", _spec("[crowd]\ncompletion_code = 'C1'\ncompletion_url = 'javascript:alert(1)'\n"), "crowd.completion_url"),
    ("spec-crowd-url-quote", _spec("[crowd]\ncompletion_url = \"https://x.org/'onclick\"\n"), "crowd.completion_url"),
    ("spec-crowd-code-markup", _spec("[crowd]\ncompletion_code = '<b>C</b>'\n"), "crowd.completion_code"),
    ("spec-crowd-attempts-zero", _spec("[crowd]\nattempts = 0\n"), "crowd.attempts is 0"),
    ("spec-crowd-abandon-neg", _spec("[crowd]\nabandon_minutes = -5.0\n"), "crowd.abandon_minutes is -5.0"),
    ("spec-crowd-abandon-nan", _spec("[crowd]\nabandon_minutes = nan\n"), "crowd.abandon_minutes is nan"),
    ("spec-crowd-cap-neg", _spec("[crowd]\nmax_participants = -1\n"), "crowd.max_participants is -1"),
    ("spec-crowd-rate-zero", _spec("[crowd]\nenrolments_per_minute = 0\n"), "crowd.enrolments_per_minute is 0"),
    ("spec-crowd-answer-not-offered", _spec("[[crowd.questions]]\nquestion = 'Q?'\nchoices = ['a', 'b']\nanswer = 'c'\n"),
     "crowd.questions[0]"),
    ("spec-crowd-one-choice", _spec("[[crowd.questions]]\nquestion = 'Q?'\nchoices = ['a']\nanswer = 'a'\n"), "crowd.questions[0]"),
    ("spec-crowd-unknown-key", _spec("[crowd]\nplatform = 'prolific'\n"), "unknown key 'platform'"),
    ("spec-policy-no-checkpoint", _spec("[[policies]]\nid = 'x'\n"), "checkpoint"),
    ("spec-policy-null-name", _spec("[[policies]]\nid = ''\ncheckpoint = ''\n"), "checkpoint"),
    ("spec-policy-missing-folder", _spec("[[policies]]\nid = 'x'\ncheckpoint = '/no/such/ckpt'\n"), "/no/such/ckpt"),
    ("spec-policy-dup", _spec("[[policies]]\nid = 'x'\ncheckpoint = '{ckpt}'\n[[policies]]\nid = 'x'\ncheckpoint = '{ckpt}'\n"), "'x' is used twice"),
    ("spec-policy-unknown-key", _spec("[[policies]]\nname = 'x'\n"), "unknown key 'name'"),
    ("spec-temperature-neg", _spec("[generate]\ntemperature = -1.0\n"), "temperature -1.0"),
    ("spec-temperature-nan", _spec("[generate]\ntemperature = nan\n"), "temperature nan"),
    ("spec-temperature-inf", _spec("[generate]\ntemperature = inf\n"), "temperature inf"),
    ("spec-top-p-zero", _spec("[generate]\ntop_p = 0.0\n"), "top_p 0.0"),
    ("spec-top-p-big", _spec("[generate]\ntop_p = 1.5\n"), "top_p 1.5"),
    ("spec-samples-zero", _spec("[generate]\nn_samples = 0\n"), "n_samples 0"),
    ("spec-gen-batch-zero", _spec("[generate]\nbatch_size = 0\n"), "generate.batch_size is 0"),
    ("spec-dtype", _spec("[generate]\ndtype = 'int8'\n"), "dtype 'int8'"),
    ("spec-baseline-unknown", _spec("[generate]\nbaselines = ['bogus']\n"), "unknown baseline 'bogus'"),
    ("spec-baselines-str", _spec("[generate]\nbaselines = 'ref'\n"), "generate.baselines: expected a list"),
    ("spec-max-query-small", _spec("[generate]\nmax_query_tokens = 4\n"), "max_query_tokens 4"),
    ("spec-n-boot-neg", _spec("[report]\nn_boot = -1\n"), "report.n_boot is -1"),
    ("spec-report-source", _spec("[report]\nsource = 'twitter'\n"), "report.source 'twitter'"),
    ("spec-train-preset", _spec("[[train]]\npreset = 'huge'\n"), "unknown ladder preset 'huge'"),
    ("spec-train-no-preset", _spec("[[train]]\nkinds = ['sft']\n"), "train[0] has no preset"),
    ("spec-train-kinds", _spec("[[train]]\npreset = 'tiny'\nkinds = ['rlhf']\n"), "train[0].kinds has 'rlhf'"),
    ("spec-train-depth-zero", _spec("[[train]]\npreset = 'tiny'\ndepths = [0]\n"), "depths [0]"),
    ("spec-train-base", _spec("[[train]]\npreset = 'tiny'\nbases = ['gpt5']\n"), "unknown ladder base 'gpt5'"),
    ("spec-train-set-key", _spec("[[train]]\npreset = 'tiny'\nset = ['nope=1']\n"), "unknown key 'nope'"),
    ("spec-train-set-type", _spec("[[train]]\npreset = 'tiny'\nset = ['sft_steps=many']\n"), "sft_steps=many"),
    ("spec-train-set-form", _spec("[[train]]\npreset = 'tiny'\nset = ['sft_steps']\n"), "expected section.key=value"),
    ("spec-released-unknown", _spec("[released]\ncomparisons = ['batch99']\n"), "unknown comparison batch 'batch99'"),
    ("spec-seed-str", "[study]\nid = 'bad'\nseed = 'x'\n", "study.seed: expected int"),
    ("spec-simulate-str", "[study]\nid = 'bad'\nsimulate = 'yes'\n", "study.simulate: expected bool"),
]

OVERRIDE_CASES = [  # evalkit run --set …, on the default study
    ("set-no-equals", ["data.n_items"], "expected section.key=value"),
    ("set-unknown-section", ["colour.red=1"], "unknown section 'colour'"),
    ("set-unknown-key", ["data.colour=red"], "unknown key 'colour'"),
    ("set-int", ["data.n_items=many"], "data.n_items=many"),
    ("set-float", ["generate.temperature=hot"], "generate.temperature=hot"),
    ("set-bool", ["study.simulate=perhaps"], "study.simulate=perhaps"),
    ("set-train-index", ["train.9.preset=tiny"], "train.N.key with N below 2"),
    ("set-train-noindex", ["train.preset=tiny"], "train.N.key"),
    ("set-n-boot", ["report.n_boot=-1"], "report.n_boot is -1"),
    ("set-quick-bad", ["study.quick=data.n_items"], "expected section.key=value"),
]

FILE_CASES = [
    # TL;DR and CNN/DM data files (evalkit data show --path)
    ("tldr-missing-column", "query\nx\n", ["data", "show", "tldr", "--path", "{file}.csv"], "missing column 'reference_responses'"),
    ("tldr-not-utf8", b"query,reference_responses\n\xff\xfe,\xff\n", ["data", "show", "tldr", "--path", "{file}.csv"], "not a readable CSV"),
    ("tldr-empty", "", ["data", "show", "tldr", "--path", "{file}.csv"], "empty file"),
    ("tldr-header-only", "query,reference_responses\n", ["data", "show", "tldr", "--path", "{file}.csv"], "no rows"),
    ("tldr-bad-query", "query,reference_responses\nhello,world\n", ["data", "show", "tldr", "--path", "{file}.csv"], "SUBREDDIT"),
    ("tldr-jsonl-broken", "{not json\n", ["data", "show", "tldr", "--path", "{file}.jsonl"], "malformed JSON"),
    ("tldr-jsonl-array", "[1, 2]\n", ["data", "show", "tldr", "--path", "{file}.jsonl"], "expected a JSON object"),
    ("tldr-jsonl-not-utf8", b'{"a": "\xff"}\n', ["data", "show", "tldr", "--path", "{file}.jsonl"], "not UTF-8"),
    ("tldr-wrong-suffix", "x", ["data", "show", "tldr", "--path", "{file}.xlsx"], ".xlsx"),
    ("cnndm-missing-column", "article,id\nhello,1\n", ["data", "show", "cnndm", "--path", "{file}.csv"], "missing column 'highlights'"),
    ("cnndm-not-utf8", b"article,highlights,id\n\xff,\xfe,1\n", ["data", "show", "cnndm", "--path", "{file}.csv"], "not a readable CSV"),
    ("data-path-dir", None, ["data", "show", "tldr", "--path", "{root}"], "is a directory"),
    ("data-path-missing", None, ["data", "show", "tldr", "--path", "/no/such.csv"], "/no/such.csv"),
    # released comparison files (evalkit data import-openai)
    ("rel-broken-json", "{oops\n", ["data", "import-openai", "{file}.json", "--out", "{root}/cases/rel"], "malformed JSON"),
    ("rel-not-utf8", b"\xff\xfe\n", ["data", "import-openai", "{file}.json", "--out", "{root}/cases/rel"], "not UTF-8"),
    ("rel-empty", "", ["data", "import-openai", "{file}.json", "--out", "{root}/cases/rel"], "empty file"),
    ("rel-missing-info", json.dumps({"summaries": [], "choice": 0}), ["data", "import-openai", "{file}.json", "--out", "{root}/cases/rel"], "missing field 'info'"),
    ("rel-info-list", _rec(info=[1, 2]), ["data", "import-openai", "{file}.json", "--out", "{root}/cases/rel"], "field 'info' should be an object"),
    ("rel-post-number", _rec(**{"info.post": 5}), ["data", "import-openai", "{file}.json", "--out", "{root}/cases/rel"], "info.post"),
    ("rel-title-null", _rec(**{"info.title": None}), ["data", "import-openai", "{file}.json", "--out", "{root}/cases/rel"], "info.title"),
    ("rel-extra-list", _rec(extra=[1]), ["data", "import-openai", "{file}.json", "--out", "{root}/cases/rel"], "extra"),
    ("rel-summaries-strings", _rec(summaries=["a", "b"]), ["data", "import-openai", "{file}.json", "--out", "{root}/cases/rel"], "summar"),
    ("rel-summary-text-null", _rec(**{"summaries.0.text": None}), ["data", "import-openai", "{file}.json", "--out", "{root}/cases/rel"], "text"),
    ("rel-summary-text-number", _rec(**{"summaries.1.text": 3}), ["data", "import-openai", "{file}.json", "--out", "{root}/cases/rel"], "text"),
    ("rel-summaries-three", _rec(summaries=[RECORD["summaries"][0]] * 3), ["data", "import-openai", "{file}.json", "--out", "{root}/cases/rel"], "exactly 2 summaries"),
    ("rel-choice-2", _rec(choice=2), ["data", "import-openai", "{file}.json", "--out", "{root}/cases/rel"], "'choice' is 2"),
    ("rel-choice-str", _rec(choice="0"), ["data", "import-openai", "{file}.json", "--out", "{root}/cases/rel"], "'choice' is '0'"),
    ("rel-split-bad", _rec(split="test9"), ["data", "import-openai", "{file}.json", "--out", "{root}/cases/rel"], "test9"),
    ("rel-confidence-bad", _rec(extra={"confidence": 12}), ["data", "import-openai", "{file}.json", "--out", "{root}/cases/rel"], "extra.confidence is 12"),
    ("rel-policy-null", _rec(**{"summaries.0.policy": None}), ["data", "import-openai", "{file}.json", "--out", "{root}/cases/rel"], "policy"),
    ("rel-unknown-short-name", None, ["data", "import-openai", "batch99", "--out", "{root}/cases/rel"], "unknown comparison batch 'batch99'"),
]

ANSWER_CASES = [  # evalkit study import
    ("ans-not-utf8", b"task_id,labeler_id,confidence\n\xff,\xfe,2\n", "csv", "not UTF-8"),
    ("ans-empty", "", "csv", "empty file"),
    ("ans-header-only", "task_id,labeler_id,confidence\n", "csv", "no answers"),
    ("ans-unknown-task", "task_id,labeler_id,confidence\nt-nope,{labeler},2\n", "csv", "unknown task id 't-nope'"),
    ("ans-missing-labeler", "task_id,labeler_id,confidence\n{task},,2\n", "csv", "missing labeler_id"),
    ("ans-confidence-5", "task_id,labeler_id,confidence\n{task},{labeler},5\n", "csv", "confidence is '5'"),
    ("ans-confidence-abc", "task_id,labeler_id,confidence\n{task},{labeler},abc\n", "csv", "confidence"),
    ("ans-confidence-10", "task_id,labeler_id,confidence\n{task},{labeler},10\n", "csv", "confidence"),
    ("ans-confidence-float", "task_id,labeler_id,confidence\n{task},{labeler},2.5\n", "csv", "confidence"),
    ("ans-duration-abc", "task_id,labeler_id,confidence,duration_s\n{task},{labeler},2,abc\n", "csv", "duration_s is 'abc'"),
    ("ans-duration-neg", "task_id,labeler_id,confidence,duration_s\n{task},{labeler},2,-4\n", "csv", "duration_s is '-4'"),
    ("ans-duration-inf", "task_id,labeler_id,confidence,duration_s\n{task},{labeler},2,inf\n", "csv", "duration_s is 'inf'"),
    ("ans-submitted-bad", "task_id,labeler_id,confidence,submitted_at\n{task},{labeler},2,yesterday\n", "csv", "submitted_at is 'yesterday'"),
    ("ans-twice", "task_id,labeler_id,confidence\n{task},{labeler},2\n{task},{labeler},8\n", "csv", "answered twice"),
    ("ans-wrong-study", "task_id,labeler_id,confidence,study_id\n{task},{labeler},2,other\n", "csv", "study 'other'"),
    ("ans-missing-task-col", "labeler_id,confidence\nx,2\n", "csv", "missing column 'task_id'"),
    ("ans-jsonl-broken", '{"task_id": \n', "jsonl", "malformed JSON"),
    ("ans-jsonl-list", "[1]\n", "jsonl", "expected a JSON object"),
    ("ans-jsonl-not-utf8", b'{"task_id": "\xff"}\n', "jsonl", "not UTF-8"),
    ("ans-ls-dict", '{"tasks": []}', "json", "Label Studio"),
    ("ans-ls-number", "42", "json", "Label Studio"),
    ("ans-ls-annotations-dict", '[{"data": {"task_id": "{task}"}, "annotations": {"a": 1}}]', "json", "annotations"),
    ("ans-ls-no-data", '[{"annotations": []}]', "json", "data"),
    ("ans-ls-broken", "[{", "json", "malformed JSON"),
    ("ans-suffix", "x", "txt", ".txt"),
]

CHECKPOINT_CASES = [  # evalkit generate --policy <damaged copy of a trained checkpoint>
    ("ckpt-truncated-weights", "model.safetensors", "truncate", "not a loadable causal LM checkpoint"),
    ("ckpt-no-weights", "model.safetensors", "delete", "weights"),
    ("ckpt-corrupt-metadata", "evalkit.json", "garbage", "evalkit.json"),
    ("ckpt-corrupt-config", "config.json", "garbage", "config.json"),
    ("ckpt-no-config", "config.json", "delete", "config.json"),
    ("ckpt-no-tokenizer", "tokenizer.json", "delete", "tokenizer"),
    ("ckpt-corrupt-best-of-n", "best_of_n.json", "garbage", "best_of_n.json"),
    ("ckpt-best-of-n-list", "best_of_n.json", "list", "best_of_n.json"),
]

OPTION_CASES = [  # evalkit <command> with a bad option value
    ("gen-temperature-nan", ["generate", "--policy", "{ckpt}", "--temperature", "nan", "--out", "{root}/cases/g"], "temperature nan"),
    ("gen-temperature-neg", ["generate", "--policy", "{ckpt}", "--temperature", "-1", "--out", "{root}/cases/g"], "temperature -1.0"),
    ("gen-top-p", ["generate", "--policy", "{ckpt}", "--top-p", "2", "--out", "{root}/cases/g"], "top_p 2.0"),
    ("gen-greedy-samples", ["generate", "--policy", "{ckpt}", "--samples", "3", "--out", "{root}/cases/g"], "would all be identical"),
    ("gen-no-policy", ["generate", "--out", "{root}/cases/g"], "nothing to generate"),
    ("gen-missing-policy", ["generate", "--policy", "/no/such/ckpt", "--out", "{root}/cases/g"], "/no/such/ckpt"),
    ("gen-policy-is-file", ["generate", "--policy", "{root}/run/study/tasks.parquet", "--out", "{root}/cases/g"], "tasks.parquet"),
    ("gen-baseline", ["generate", "--baseline", "gpt9", "--out", "{root}/cases/g"], "unknown baseline 'gpt9'"),
    ("gen-split", ["generate", "--baseline", "ref", "--split", "valid9", "--out", "{root}/cases/g"], "valid9"),
    ("gen-dataset", ["generate", "--baseline", "ref", "--dataset", "xsum", "--out", "{root}/cases/g"], "unknown dataset 'xsum'"),
    ("gen-query-too-long", ["generate", "--policy", "{ckpt}", "--max-query-tokens", "100000", "--out", "{root}/cases/g"], "100000"),
    ("gen-out-is-file", ["generate", "--baseline", "ref", "--out", "{root}/run/study/tasks.parquet"], "is a file"),
    ("power-alpha-zero", ["study", "power", "--p1", "0.5", "--p2", "0.6", "--alpha", "0"], "--alpha 0.0"),
    ("power-alpha-one", ["study", "power", "--p1", "0.5", "--p2", "0.6", "--alpha", "1"], "--alpha 1.0"),
    ("power-power-one", ["study", "power", "--p1", "0.5", "--p2", "0.6", "--power", "1"], "--power 1.0"),
    ("power-p1-big", ["study", "power", "--p1", "1.5", "--p2", "0.6"], "1.5"),
    ("power-equal", ["study", "power", "--p1", "0.5", "--p2", "0.5"], "two different rates"),
    ("power-icc", ["study", "power", "--p1", "0.5", "--p2", "0.6", "--icc", "1.5"], "--icc 1.5"),
    ("ladder-depths", ["train", "ladder", "--out", "{root}/cases/l", "--depths", "a,b"], "--depths 'a,b'"),
    ("ladder-depth-zero", ["train", "ladder", "--out", "{root}/cases/l", "--depths", "0"], "depths [0]"),
    ("ladder-preset", ["train", "ladder", "--out", "{root}/cases/l", "--preset", "huge"], "unknown ladder preset 'huge'"),
    ("ladder-base", ["train", "ladder", "--out", "{root}/cases/l", "--base", "gpt5"], "unknown ladder base 'gpt5'"),
    ("ladder-set", ["train", "ladder", "--out", "{root}/cases/l", "--set", "steps=3"], "unknown key 'steps'"),
    ("sft-no-init", ["train", "sft", "--init", "/no/such", "--out", "{root}/cases/s"], "/no/such"),
    ("sft-set-type", ["train", "sft", "--init", "{ckpt}", "--out", "{root}/cases/s", "--set", "steps=abc"], "steps=abc"),
    ("sft-set-neg", ["train", "sft", "--init", "{ckpt}", "--out", "{root}/cases/s", "--set", "steps=-3"], "steps"),
    ("sft-set-lr", ["train", "sft", "--init", "{ckpt}", "--out", "{root}/cases/s", "--set", "lr=-1"], "lr"),
    ("sft-trainable-too-many", ["train", "sft", "--init", "{ckpt}", "--out", "{root}/cases/s", "--set", "trainable_layers=99"], "trainable_layers"),
    ("rm-comparisons", ["train", "rm", "--init", "{ckpt}", "--comparisons", "batch99", "--out", "{root}/cases/r"], "batch99"),
    ("ppo-no-rm", ["train", "ppo", "--policy", "{ckpt}", "--reward-model", "/no/rm", "--out", "{root}/cases/p"], "/no/rm"),
    ("ppo-set-neg", ["train", "ppo", "--policy", "{ckpt}", "--reward-model", "{ckpt}", "--out", "{root}/cases/p", "--set", "iterations=0"], "iterations is 0"),
    ("tok-vocab", ["train", "tokenizer", "--out", "{root}/cases/t", "--set", "vocab_size=10"], "vocab_size"),
    ("tok-out-not-a-tokenizer", ["train", "tokenizer", "--out", "{run}/study"], "not a tokenizer"),
    ("import-gguf-missing", ["train", "import-gguf", "/no/such.gguf", "--out", "{root}/cases/i"], "/no/such.gguf"),
    ("import-gguf-not-gguf", ["train", "import-gguf", "{root}/run/study/tasks.parquet", "--out", "{root}/cases/i"], "GGUF"),
    ("report-no-spec", ["report", "{root}/cases/nowhere"], "no study spec"),
    ("report-n-boot", ["report", "studies/openai_released", "--out", "{root}/cases/rep", "--set", "report.n_boot=-1"], "report.n_boot is -1"),
    ("report-source", ["report", "studies/openai_released", "--out", "{root}/cases/rep", "--set", "report.source=twitter"], "report.source 'twitter'"),
    ("report-rm-missing", ["report", "studies/openai_released", "--out", "{root}/cases/rep", "--set", "report.reward_models=/no/rm"], "/no/rm"),
    ("serve-proxy-name", ["study", "serve", "{spec}", "--trusted-proxy", "my-proxy"], "--trusted-proxy 'my-proxy'"),
    ("export-format", ["study", "export", "{spec}", "--format", "xls", "--out", "{root}/cases/x.xls"], "'xls' is not one of"),
    ("import-missing-file", ["study", "import", "{spec}", "/no/answers.csv"], "/no/answers.csv"),
    ("collect-no-db", ["study", "collect", "{spec}"], "no labels database"),
    ("show-n-neg", ["data", "show", "tldr", "-n", "-2"], "-2 is not in the range"),
    ("run-quick-no-profile", ["run", "{spec}", "--quick"], "--quick needs a study.quick"),
    ("report-out-not-a-report", ["report", "studies/openai_released", "--out", "{run}/study"], "not an evalkit report"),
    ("report-out-is-a-file", ["report", "studies/openai_released", "--out", "{run}/study/tasks.parquet"], "is a file"),
]

# HTTP requests to the labeling app: (name, study kind, method, path, form or raw body, expected status).
# {tok}: the labeler's token, {other}: another labeler's token, {task}: the labeler's first task, {their}: a task of
# the other labeler; a form's csrf "{csrf}" is the right one for {tok} and {task}.
OK = {"csrf": "{csrf}", "confidence": "2"}
LIKERT_OK = {"csrf": "{csrf}", "overall": "5", "accuracy": "5", "coverage": "5", "coherence": "5"}
HTTP_CASES = [
    ("unknown-token", "pairwise", "GET", "/l/nosuchtoken", None, 404),
    ("unknown-token-post", "pairwise", "POST", "/l/nosuchtoken/task/{task}", OK, 404),
    ("case-flipped-token", "pairwise", "GET", "/l/{TOK}", None, 404),
    ("short-token", "pairwise", "GET", "/l/{tok3}", None, 404),
    ("sql-token", "pairwise", "GET", "/l/' OR '1'='1", None, 404),
    ("non-ascii-token", "pairwise", "GET", "/l/ünïcødé/next", None, 404),
    ("nul-token", "pairwise", "GET", "/l/%00", None, 404),
    ("huge-token", "pairwise", "GET", "/l/" + "x" * 6000, None, 404),
    ("other-labelers-task", "pairwise", "GET", "/l/{tok}/task/{their}", None, 404),
    ("other-labelers-task-post", "pairwise", "POST", "/l/{tok}/task/{their}", OK, 404),
    ("unknown-task", "pairwise", "GET", "/l/{tok}/task/nosuchtask", None, 404),
    ("traversal", "pairwise", "GET", "/l/{tok}/../../admin", None, 404),
    ("admin-wrong-token", "pairwise", "GET", "/admin/wrong", None, 404),
    ("admin-post", "pairwise", "POST", "/admin/wrong", OK, 404),
    ("root", "pairwise", "GET", "/", None, 404),
    ("put-task", "pairwise", "PUT", "/l/{tok}/task/{task}", OK, 404),
    ("delete-task", "pairwise", "DELETE", "/l/{tok}/task/{task}", None, 404),
    ("post-instructions", "pairwise", "POST", "/l/{tok}", OK, 404),
    ("no-csrf", "pairwise", "POST", "/l/{tok}/task/{task}", {"confidence": "2"}, 403),
    ("wrong-csrf", "pairwise", "POST", "/l/{tok}/task/{task}", {"csrf": "0" * 64, "confidence": "2"}, 403),
    ("csrf-of-another-task", "pairwise", "POST", "/l/{tok}/task/{task}", {"csrf": "{csrf_task2}", "confidence": "2"}, 403),
    ("csrf-of-another-labeler", "pairwise", "POST", "/l/{tok}/task/{task}", {"csrf": "{csrf_other}", "confidence": "2"}, 403),
    ("non-ascii-csrf", "pairwise", "POST", "/l/{tok}/task/{task}", {"csrf": "ünïcødé", "confidence": "2"}, 403),
    ("no-answer", "pairwise", "POST", "/l/{tok}/task/{task}", {"csrf": "{csrf}"}, 400),
    ("confidence-0", "pairwise", "POST", "/l/{tok}/task/{task}", {"csrf": "{csrf}", "confidence": "0"}, 400),
    ("confidence-10", "pairwise", "POST", "/l/{tok}/task/{task}", {"csrf": "{csrf}", "confidence": "10"}, 400),
    ("confidence-text", "pairwise", "POST", "/l/{tok}/task/{task}", {"csrf": "{csrf}", "confidence": "left"}, 400),
    ("confidence-float", "pairwise", "POST", "/l/{tok}/task/{task}", {"csrf": "{csrf}", "confidence": "2.5"}, 400),
    ("confidence-negative", "pairwise", "POST", "/l/{tok}/task/{task}", {"csrf": "{csrf}", "confidence": "-1"}, 400),
    ("confidence-huge", "pairwise", "POST", "/l/{tok}/task/{task}", {"csrf": "{csrf}", "confidence": "9" * 5000}, 400),
    ("body-not-a-form", "pairwise", "POST", "/l/{tok}/task/{task}", b"\xff\xfe{json: 1}", 403),
    ("bad-content-length", "pairwise", "POST", "/l/{tok}/task/{task}", "content-length:abc", 400),
    ("likert-missing-axis", "likert", "POST", "/l/{tok}/task/{task}", {**LIKERT_OK, "coherence": ""}, 400),
    ("likert-axis-8", "likert", "POST", "/l/{tok}/task/{task}", {**LIKERT_OK, "overall": "8"}, 400),
    ("likert-axis-0", "likert", "POST", "/l/{tok}/task/{task}", {**LIKERT_OK, "accuracy": "0"}, 400),
    ("likert-pairwise-answer", "likert", "POST", "/l/{tok}/task/{task}", {"csrf": "{csrf}", "confidence": "2"}, 400),
    ("likert-no-csrf", "likert", "POST", "/l/{tok}/task/{task}", {k: v for k, v in LIKERT_OK.items() if k != "csrf"}, 403),
]

CASES = (len(SPEC_CASES) + len(OVERRIDE_CASES) + len(FILE_CASES) + len(ANSWER_CASES) + len(CHECKPOINT_CASES)
         + len(OPTION_CASES) + len(HTTP_CASES))


def test_the_corpus_has_at_least_120_cases():
    assert CASES >= 120, CASES


def _check(world, args, expected, monkeypatch, capsys):
    before = snapshot(world["root"])
    code, err = run_main(args, monkeypatch, capsys)
    lines = err.strip().splitlines()
    assert code == 2, (args, code, err[-2000:])
    assert len(lines) == 1 and lines[0].startswith("evalkit: error:"), err[-2000:]
    assert expected in lines[0], (expected, lines[0])
    assert snapshot(world["root"]) == before, "an existing artifact changed"


def _fill(text, world, file=""):
    return text.replace("{file}", str(file)).replace("{root}", str(world["root"])).replace("{ckpt}", str(world["ckpt"])) \
        .replace("{run}", str(world["run"])).replace("{task}", world["task"]).replace("{labeler}", world["labeler"])


@pytest.mark.parametrize("name,content,expected", SPEC_CASES, ids=[c[0] for c in SPEC_CASES])
def test_bad_study_spec(world, name, content, expected, monkeypatch, capsys):
    folder = world["root"] / "cases" / name
    folder.mkdir(parents=True, exist_ok=True)
    spec = folder / "study.toml"
    if isinstance(content, bytes):
        spec.write_bytes(content)
    else:
        spec.write_text(_fill(content, world) + "\n", "utf-8")
        text = spec.read_text()
        spec.write_text(text.replace("[study]\nid = 'bad'\n", f"[study]\nid = 'bad'\nout_dir = '{folder / 'out'}'\n"), "utf-8")
    _check(world, ["run", spec], expected, monkeypatch, capsys)


@pytest.mark.parametrize("name,overrides,expected", OVERRIDE_CASES, ids=[c[0] for c in OVERRIDE_CASES])
def test_bad_override(world, name, overrides, expected, monkeypatch, capsys):
    args = ["run", ROOT / "studies/default", "--set", f"study.out_dir={world['root'] / 'cases' / name}"]
    for o in overrides:
        args += ["--set", o]
    _check(world, args, expected, monkeypatch, capsys)


@pytest.mark.parametrize("name,content,args,expected", FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_bad_data_file(world, name, content, args, expected, monkeypatch, capsys):
    base = world["root"] / "cases" / name
    base.parent.mkdir(parents=True, exist_ok=True)
    filled = [_fill(a, world, base) for a in args]
    if content is not None:
        target = next(Path(a) for a in filled if a.startswith(str(base)))
        target.write_bytes(content if isinstance(content, bytes) else content.encode())
    _check(world, filled, expected, monkeypatch, capsys)


@pytest.mark.parametrize("name,content,suffix,expected", ANSWER_CASES, ids=[c[0] for c in ANSWER_CASES])
def test_bad_answers_file(world, name, content, suffix, expected, monkeypatch, capsys):
    path = world["root"] / "cases" / f"{name}.{suffix}"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else _fill(content, world).encode())
    args = ["study", "import", ROOT / "studies/default", path, "--set", f"study.out_dir={world['run']}",
            "--set", "data.n_items=20", "--set", "design.items_per_policy=8", "--set", "labelers.count=3"]
    _check(world, args, expected, monkeypatch, capsys)


@pytest.mark.parametrize("name,target,damage,expected", CHECKPOINT_CASES, ids=[c[0] for c in CHECKPOINT_CASES])
def test_bad_checkpoint(world, name, target, damage, expected, monkeypatch, capsys):
    import shutil

    folder = world["root"] / "cases" / name
    shutil.copytree(world["ckpt"], folder, dirs_exist_ok=True)
    if target == "best_of_n.json":
        (folder / target).write_text("{" if damage == "garbage" else "[1, 2]")
    else:
        path = folder / target
        if damage == "delete":
            path.unlink()
        elif damage == "truncate":
            path.write_bytes(path.read_bytes()[:1000])
        else:
            path.write_text("{not json")
    args = ["generate", "--policy", folder, "--n-items", "2", "--out", world["root"] / "cases" / f"{name}-gen"]
    _check(world, args, expected, monkeypatch, capsys)


@pytest.mark.parametrize("name,args,expected", OPTION_CASES, ids=[c[0] for c in OPTION_CASES])
def test_bad_option(world, name, args, expected, monkeypatch, capsys):
    spec = world["root"] / "cases" / "spec" / "study.toml"
    spec.parent.mkdir(parents=True, exist_ok=True)
    spec.write_text(f"[study]\nid = 'opts'\nout_dir = '{world['run']}'\n[data]\nn_items = 20\n[design]\nitems_per_policy = 8\n"
                    "[labelers]\ncount = 3\n")
    filled = [_fill(str(a), world).replace("{spec}", str(spec)) for a in args]
    _check(world, filled, expected, monkeypatch, capsys)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """One pairwise and one Likert study, each served by `evalkit study serve` on a loopback port."""
    import sqlite3

    from conftest import free_port
    from test_study_serve import Server

    from evalkit.study.serve import init_db

    worlds, servers = {}, []
    for kind in ("pairwise", "likert"):
        out = tmp_path_factory.mktemp(f"http-{kind}")
        settings = ["data.n_items=12", "design.items_per_policy=6", "labelers.count=2", "design.overlap_fraction=0",
                    "design.gold_fraction=0", "design.attention_fraction=0", f"design.kind={kind}"]
        baseline_study(out, *settings)
        db = init_db(out / "study")
        server = Server(out, settings, free_port()).start()
        servers.append(server)
        with sqlite3.connect(db) as conn:
            (lab, tok), (_, other) = conn.execute("SELECT labeler_id, token FROM labelers ORDER BY labeler_id").fetchall()
            mine = [r[0] for r in conn.execute("SELECT task_id FROM tasks WHERE labeler_id=? ORDER BY position", (lab,))]
            their = conn.execute("SELECT task_id FROM tasks WHERE labeler_id<>? LIMIT 1", (lab,)).fetchone()[0]
        worlds[kind] = {"dir": out / "study", "db": db, "port": server.port, "tok": tok, "other": other,
                        "task": mine[0], "task2": mine[1], "their": their}
    yield worlds
    for server in servers:
        server.kill()


def _http_state(w) -> tuple:
    import sqlite3

    with sqlite3.connect(w["db"]) as conn:
        stored = conn.execute("SELECT * FROM judgments ORDER BY task_id").fetchall()
    return stored, {p.name: p.read_bytes() for p in w["dir"].glob("*.parquet")}


@pytest.mark.parametrize("name,kind,method,path,form,expected", HTTP_CASES, ids=[c[0] for c in HTTP_CASES])
def test_bad_http_request(served, name, kind, method, path, form, expected):
    import hashlib
    import hmac
    import http.client
    import sqlite3
    from urllib.parse import quote, urlencode

    w = served[kind]
    with sqlite3.connect(w["db"]) as conn:
        secret = conn.execute("SELECT value FROM meta WHERE key='secret'").fetchone()[0].encode()

    def csrf(token, task):
        return hmac.new(secret, f"{token}:{task}".encode(), hashlib.sha256).hexdigest()

    fill = {"{tok}": w["tok"], "{TOK}": w["tok"].swapcase(), "{tok3}": w["tok"][:3], "{other}": w["other"],
            "{task}": w["task"], "{their}": w["their"], "{csrf}": csrf(w["tok"], w["task"]),
            "{csrf_task2}": csrf(w["tok"], w["task2"]), "{csrf_other}": csrf(w["other"], w["task"])}

    def filled(text: str) -> str:
        for key, value in fill.items():
            text = text.replace(key, value)
        return text

    headers = {"Content-Type": "application/x-www-form-urlencoded"}
    if isinstance(form, dict):
        body = urlencode({k: filled(v) for k, v in form.items()}).encode()
    elif isinstance(form, bytes):
        body = form
    elif isinstance(form, str) and form.startswith("content-length:"):
        body, headers["Content-Length"] = b"confidence=2", form.split(":", 1)[1]
    else:
        body = None
    before = _http_state(w)
    conn = http.client.HTTPConnection("127.0.0.1", w["port"], timeout=30)
    conn.putrequest(method, quote(filled(path), safe="/%'=:"), skip_accept_encoding=True)
    for key, value in headers.items():
        conn.putheader(key, value)
    if body is not None and "Content-Length" not in headers:
        conn.putheader("Content-Length", str(len(body)))
    conn.endheaders(body)
    resp = conn.getresponse()
    page = resp.read().decode("utf-8", "replace")
    conn.close()
    assert resp.status == expected, (name, resp.status, page[:300])
    assert "Traceback" not in page and "Internal Server Error" not in page
    assert _http_state(w) == before, "a bad request changed what is stored"
