"""Study configuration: frozen dataclasses loaded from ``studies/<id>/study.toml``, with type-checked dotted overrides
(``--set data.split=valid1``). An unknown key or a value of the wrong type is an error naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
import tomllib
import typing
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from evalkit.contract import Decoding
from evalkit.data import comparison_batch
from evalkit.data.splits import check_split
from evalkit.errors import EvalkitError
from evalkit.spec import NOT_A_KEY, _type_name, apply_overrides, from_mapping
from evalkit.train.presets import ladder_config
from evalkit.vocab import BASELINES, TRAINED_KINDS


@dataclass(frozen=True)
class DataConfig:
    """Which items the study is about."""

    dataset: str = "tldr"  # tldr or cnndm
    split: str = "valid2"  # train, valid1 or valid2 (valid2: the paper's final evaluation split)
    path: str | None = None  # a user's own file; the bundled data when unset
    n_items: int = 0  # 0 = every item of the split
    transfer: str = ""  # a second dataset the same policies summarise out of domain (cnndm), compared with its reference
    transfer_split: str = "valid2"  # CNN/DM: no split is trained on; valid2 has 86 articles
    transfer_items: int = 80  # the first N items by id (0 = all)


@dataclass(frozen=True)
class TrainConfig:
    """``evalkit run``'s training stage (``[[train]]``, repeatable): a ladder (``evalkit train ladder``) whose policies
    enter the study by name.

    Policies are named ``<kind>-<size>`` (``sft-d2``, ``ppo-smollm2``, ``bo4-smollm2``); sizes are ``d<depth>`` for
    from-scratch models and the real base's name otherwise.
    """

    preset: str = ""  # a ladder preset: tiny, default, smollm2-cpu, smollm2
    bases: tuple[str, ...] = ()  # default: the preset's
    depths: tuple[int, ...] = ()  # default: the preset's
    kinds: tuple[str, ...] = TRAINED_KINDS  # which of the ladder's policies enter the study; none (e.g. `--set train.1.kinds=`): the entry is left out
    set: tuple[str, ...] = ()  # ladder field overrides, e.g. ["sft_steps=20", "eval_posts=50"]
    out_dir: str = ""  # default: <study out_dir>/ladder-<hash of its bases and depths>


@dataclass(frozen=True)
class ReleasedConfig:
    """OpenAI's released human comparisons to bring in (bundled short names or file paths)."""

    comparisons: tuple[str, ...] = ("batch18", "batch13", "batch0_cnndm")  # bundled batch names or paths of OpenAI-format files
    external_summaries: bool = True  # OpenAI's 1.3B RLHF summaries of the bundled TL;DR posts


@dataclass(frozen=True)
class PolicyConfig:
    """A checkpoint that enters the study (``[[policies]]`` in study.toml)."""

    id: str = ""  # the policy's name in the tables (default: the folder's name)
    checkpoint: str = ""  # a Hugging Face causal-LM folder
    kind: str = ""  # read from the checkpoint's evalkit.json when empty
    n_params: int = 0  # read or counted when 0


@dataclass(frozen=True)
class GenerateConfig:
    """Decoding for ``evalkit generate`` (the paper's evaluation default: greedy, 48 tokens)."""

    temperature: float = 0.0  # 0 = greedy (the paper's evaluation default)
    top_p: float = 1.0  # nucleus sampling (with a temperature)
    n_samples: int = 1  # samples per item (with a temperature)
    seed: int = 0  # sampling seed; each sample's is derived from (policy, item, sample index)
    batch_size: int = 64  # items decoded together
    dtype: str = "auto"  # decoding precision: auto (bfloat16 where the device has bf16 matrix units) | float32 | bfloat16
    max_query_tokens: int = 0  # 0: each checkpoint's recorded contract (a longer query than it was trained on is an error)
    baselines: tuple[str, ...] = ("ref",)  # non-model policies to add: ref, lead3, openai-ppo-1.3b

    def decoding(self, **overrides) -> Decoding:
        """The decoding these settings describe (the one conversion; ``overrides`` that are None keep the spec's)."""
        dec = Decoding(temperature=self.temperature, top_p=self.top_p, n_samples=self.n_samples, seed=self.seed,
                       max_query_tokens=self.max_query_tokens or None, dtype=self.dtype)
        return replace(dec, **{k: v for k, v in overrides.items() if v is not None})


@dataclass(frozen=True)
class DesignConfig:
    """How ``evalkit study build`` turns generations into labeling tasks."""

    kind: str = ""  # pairwise | likert; default: pairwise for TL;DR, likert for CNN/DM
    baseline: str = "ref"  # pairwise: every policy is compared with this one
    policies: tuple[str, ...] = ()  # policy ids to evaluate; default: every policy but the baseline
    generations: str = ""  # a generations.parquet; default: <out_dir>/generations/generations.parquet
    items_per_policy: int = 100  # items compared with the baseline per policy
    overlap_fraction: float = 0.15  # of main tasks, each given to overlap_labelers labelers
    overlap_labelers: int = 3  # labelers per overlap task (agreement)
    gold_fraction: float = 0.05  # a summary of another post vs the right one: the answer is known
    attention_fraction: float = 0.05  # the reference with its words shuffled vs the reference
    sentinel_policy: str = ""  # e.g. an SFT policy: its pairs with the baseline recur in every batch
    sentinels_per_batch: int = 2  # sentinel pairs in each labeler batch
    batch_size: int = 40  # tasks per labeler batch


@dataclass(frozen=True)
class LabelersConfig:
    count: int = 6  # how many labelers the tasks are spread over
    ids: tuple[str, ...] = ()  # default: labeler-01 ... labeler-NN
    judge: str = "encoder"  # the simulated panel's judge: encoder, features, length, rm:<folder> or llm:<folder> (evalkit.judges)


@dataclass(frozen=True)
class QuestionConfig:
    """One comprehension-check question, asked after the instructions and before the first task."""

    question: str = ""  # e.g. "Which summary should win when one says something the post does not?"
    choices: tuple[str, ...] = ()  # the answers offered, in this order
    answer: str = ""  # the right one (one of choices)


@dataclass(frozen=True)
class CrowdConfig:
    """Labelers from a crowd platform (Prolific, MTurk or any site that can add a participant id to a link)."""

    enrol: bool = False  # serve one public study link (/s/<link>) that enrols participants and gives each the next free batch
    completion_code: str = ""  # shown once a participant's batch is complete (Prolific: the study's completion code)
    completion_url: str = ""  # where "finish" leads, {code} replaced (e.g. https://app.prolific.com/submissions/complete?cc={code})
    screened_out_code: str = ""  # shown when the comprehension check is failed on every attempt
    screened_out_url: str = ""  # where a screened-out participant is sent, {code} replaced
    attempts: int = 2  # tries at the comprehension check
    questions: tuple[QuestionConfig, ...] = ()  # [[crowd.questions]]: the comprehension check (none: no check)
    abandon_minutes: float = 60.0  # a batch with no activity for this long returns to the pool
    max_participants: int = 0  # enrolments accepted in all (0: twice the number of batches)
    enrolments_per_minute: int = 600  # new enrolments accepted per minute, from all clients together


RESEARCHER_TASKS = ("overlap", "checks", "all")


@dataclass(frozen=True)
class QualityConfig:
    """Labeler quality: what the monitoring page flags, whom every analysis leaves out, what the researcher labels."""

    min_gold_accuracy: float = 0.6  # excluded below this gold accuracy (once min_checks gold tasks are answered)
    min_checks: int = 3  # gold tasks answered before gold accuracy can exclude
    max_attention_failures: int = 2  # excluded at this many failed attention checks (0: never)
    min_median_seconds: float = 0.0  # flagged when the median seconds per task is below this (0: never)
    max_side_rate: float = 0.8  # flagged when one side (left or right) is chosen more often than this, over 20+ answers
    min_researcher_agreement: float = 0.0  # flagged below this agreement with the researcher (0: never)
    researcher_tasks: str = "overlap"  # comparisons the researcher link serves: overlap, checks (gold and attention) or all


@dataclass(frozen=True)
class ReportConfig:
    """What ``evalkit report`` analyses."""

    source: str = "study"  # study: <out_dir>/study tables; released: the [released] comparisons alone
    baselines: tuple[str, ...] = ("ref",)  # what preference rates are measured against
    split: str = "valid2"  # "" = every split
    n_boot: int = 1000  # bootstrap replicates for intervals
    reward_models: tuple[str, ...] = ()  # reward-model folders for an accuracy-vs-size table
    include_excluded: bool = False  # re-admit labelers the [quality] rules exclude (their judgments are always kept on disk)
    labels: str = ""  # whose labels: "" = people's if any, else the simulated panel's or the one judge's; people, simulated, a judge id, all (pooled)
    out_dir: str = ""  # default: reports/<id> (reports/<id>-quick under --quick)


@dataclass(frozen=True)
class StudyMeta:
    id: str = ""  # the study's name (default: its folder's); runs/<id>, reports/<id>
    title: str = ""  # shown at the top of the report
    seed: int = 0  # every random choice of the build and the simulated labels derives from it
    out_dir: str = ""  # default: runs/<id>
    simulate: bool = False  # evalkit run: answer the tasks with the simulated panel and write the report
    quick: tuple[str, ...] = ()  # overrides applied by `evalkit run --quick` (a small profile; its own out_dir)


@dataclass(frozen=True)
class RunLayout:
    """Every path of a study's run, named once: ``runs/<id>/`` (``[study] out_dir``) and ``reports/<id>/``."""

    root: Path
    report_dir: Path

    @property
    def run_json(self) -> Path:  # each stage's key, timing and outputs' hashes
        return self.root / "run.json"

    @property
    def data_dir(self) -> Path:  # the study's items and the released comparisons, as tables
        return self.root / "data"

    def ladder_dir(self, digest: str) -> Path:  # one [[train]] ladder, named by its lineages
        return self.root / f"ladder-{digest}"

    @property
    def generations_dir(self) -> Path:
        return self.root / "generations"

    @property
    def generations(self) -> Path:
        return self.generations_dir / "generations.parquet"

    @property
    def study_dir(self) -> Path:  # the built study: items, generations shown, tasks, judgments, labels.sqlite
        return self.root / "study"

    def study_table(self, name: str) -> Path:
        return self.study_dir / f"{name}.parquet"

    @property
    def judgments(self) -> Path:
        return self.study_table("judgments")


@dataclass(frozen=True)
class StudyConfig:
    study: StudyMeta = field(default_factory=StudyMeta)
    data: DataConfig = field(default_factory=DataConfig)
    released: ReleasedConfig = field(default_factory=ReleasedConfig)
    train: tuple[TrainConfig, ...] = ()  # [[train]]: one ladder each (e.g. from scratch and the real-weights base)
    policies: tuple[PolicyConfig, ...] = ()
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    design: DesignConfig = field(default_factory=DesignConfig)
    labelers: LabelersConfig = field(default_factory=LabelersConfig)
    crowd: CrowdConfig = field(default_factory=CrowdConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    path: str = field(default="", metadata=NOT_A_KEY)  # the study.toml it came from

    @property
    def id(self) -> str:
        return self.study.id

    @property
    def out_dir(self) -> Path:
        return Path(self.study.out_dir or f"runs/{self.study.id}")

    @property
    def report_dir(self) -> Path:
        return Path(self.report.out_dir or f"reports/{self.study.id}")

    @property
    def layout(self) -> "RunLayout":
        return RunLayout(self.out_dir, self.report_dir)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("path")
        return d


def validate_study(cfg: StudyConfig, where: Path) -> None:
    """Cheap checks of every value a later stage would trip on, so a bad spec fails before any work is done."""
    d, g, design, rep = cfg.data, cfg.generate, cfg.design, cfg.report
    for item in cfg.study.quick:
        if "=" not in item:
            raise EvalkitError(f"{where}: study.quick has {item!r}; expected section.key=value overrides")

    def bad(key: str, value, expected: str) -> None:
        raise EvalkitError(f"{where}: {key} is {value!r}; expected {expected}")

    if d.dataset not in ("tldr", "cnndm"):
        raise EvalkitError(f"{where}: unknown dataset {d.dataset!r}; known: tldr, cnndm")
    try:
        check_split(d.split or None)
        check_split(d.transfer_split or None)
    except EvalkitError as exc:
        raise EvalkitError(f"{where}: data: {exc}") from None
    if d.path is not None and not Path(d.path).is_file():
        raise EvalkitError(f"{where}: data.path {d.path!r} is not a file; expected your own TL;DR or CNN/DM data file")
    for key in ("items_per_policy", "batch_size", "overlap_labelers"):
        if getattr(design, key) < 1:
            bad(f"design.{key}", getattr(design, key), "a positive integer")
    if design.sentinels_per_batch < 0:
        bad("design.sentinels_per_batch", design.sentinels_per_batch, "0 or more")
    for key in ("overlap_fraction", "gold_fraction", "attention_fraction"):
        v = getattr(design, key)
        if not (math.isfinite(v) and 0 <= v <= 1):
            bad(f"design.{key}", v, "a fraction in [0, 1]")
    if design.kind not in ("", "pairwise", "likert"):
        raise EvalkitError(f"{where}: design.kind {design.kind!r}; expected pairwise or likert")
    if cfg.labelers.count < 1 and not cfg.labelers.ids:
        bad("labelers.count", cfg.labelers.count, "at least 1")
    if len(set(cfg.labelers.ids)) != len(cfg.labelers.ids) or any(not i.strip() for i in cfg.labelers.ids):
        raise EvalkitError(f"{where}: labelers.ids {list(cfg.labelers.ids)}: expected distinct, non-empty ids")
    check_crowd(cfg.crowd, where)
    q = cfg.quality
    for key in ("min_gold_accuracy", "max_side_rate", "min_researcher_agreement"):
        if not (math.isfinite(getattr(q, key)) and 0 <= getattr(q, key) <= 1):
            bad(f"quality.{key}", getattr(q, key), "a fraction in [0, 1]")
    if q.min_checks < 1:
        bad("quality.min_checks", q.min_checks, "a positive integer")
    if q.max_attention_failures < 0:
        bad("quality.max_attention_failures", q.max_attention_failures, "0 (never) or a count")
    if not (math.isfinite(q.min_median_seconds) and q.min_median_seconds >= 0):
        bad("quality.min_median_seconds", q.min_median_seconds, "0 (never) or seconds")
    if q.researcher_tasks not in RESEARCHER_TASKS:
        bad("quality.researcher_tasks", q.researcher_tasks, " or ".join(RESEARCHER_TASKS))
    if g.batch_size < 1:
        bad("generate.batch_size", g.batch_size, "a positive integer")
    if g.max_query_tokens < 0:
        bad("generate.max_query_tokens", g.max_query_tokens, "0 (each checkpoint's contract) or a token count")
    g.decoding().check()
    for name in g.baselines:
        if name not in BASELINES:
            raise EvalkitError(f"{where}: unknown baseline {name!r} in generate.baselines; known: {', '.join(BASELINES)}")
    ids = []
    for i, p in enumerate(cfg.policies):
        if not p.checkpoint.strip():
            raise EvalkitError(f"{where}: policies[{i}] has no checkpoint; expected a checkpoint folder (any HF causal LM)")
        if not Path(p.checkpoint).is_dir():
            raise EvalkitError(f"{where}: policies[{i}].checkpoint {p.checkpoint!r} is not a folder; expected a checkpoint folder")
        ids.append(p.id or Path(p.checkpoint).name)
    dup = next((i for i in ids if ids.count(i) > 1), None)
    if dup:
        raise EvalkitError(f"{where}: policy id {dup!r} is used twice")
    if rep.n_boot < 1:
        bad("report.n_boot", rep.n_boot, "a positive number of bootstrap replicates")
    if rep.source not in ("study", "released"):
        raise EvalkitError(f"{where}: report.source {rep.source!r}; expected study or released")
    for name in cfg.released.comparisons:
        comparison_batch(name)
    for t in cfg.train:
        if t.preset:
            ladder_config(t.preset, t.depths or None, t.bases or None, t.set)


def check_crowd(crowd: CrowdConfig, where) -> None:
    """The crowd section's values: links that are web addresses, questions whose answer is offered, positive limits."""
    for key in ("completion_url", "screened_out_url"):
        url = getattr(crowd, key)
        if url and not re.match(r"https?://[^\s<>\"']+$", url):
            raise EvalkitError(f"{where}: crowd.{key} is {url!r}; expected an http(s) address (with {{code}} where the code goes)")
    for key in ("completion_code", "screened_out_code"):
        if not re.fullmatch(r"[A-Za-z0-9_-]{0,64}", getattr(crowd, key)):
            raise EvalkitError(f"{where}: crowd.{key} is {getattr(crowd, key)!r}; expected letters, digits, - or _ (a platform's code)")
    if crowd.enrol and not (crowd.completion_code or crowd.completion_url):
        raise EvalkitError(f"{where}: crowd.enrol is on but there is no crowd.completion_code or completion_url; "
                           "expected the platform's completion code, so participants can be paid")
    for key in ("attempts", "enrolments_per_minute"):
        if getattr(crowd, key) < 1:
            raise EvalkitError(f"{where}: crowd.{key} is {getattr(crowd, key)!r}; expected a positive integer")
    if crowd.max_participants < 0:
        raise EvalkitError(f"{where}: crowd.max_participants is {crowd.max_participants!r}; expected 0 (twice the batches) or a count")
    if not (math.isfinite(crowd.abandon_minutes) and crowd.abandon_minutes > 0):
        raise EvalkitError(f"{where}: crowd.abandon_minutes is {crowd.abandon_minutes!r}; expected a positive number of minutes")
    for i, q in enumerate(crowd.questions):
        if not q.question.strip() or len(q.choices) < 2 or q.answer not in q.choices:
            raise EvalkitError(f"{where}: crowd.questions[{i}]: expected a question, two or more choices and an answer "
                               f"that is one of them (got answer {q.answer!r} of {list(q.choices)})")


def load_study(path: str | Path, overrides: list[str] | None = None, quick: bool = False) -> StudyConfig:
    """Load ``study.toml`` (or the folder holding it), apply overrides and check names and types.

    ``quick``: first apply the spec's own ``study.quick`` overrides (a small profile of the same study, written to
    ``<out_dir>-quick``), then ``overrides``."""
    path = Path(path)
    if path.is_dir():
        path = path / "study.toml"
    if not path.is_file():
        raise EvalkitError(f"no study spec at {path}; expected a folder with study.toml or the file itself")
    try:
        raw = tomllib.loads(path.read_text("utf-8"))
    except UnicodeDecodeError as exc:
        raise EvalkitError(f"{path}: not UTF-8 text (byte {exc.start}); save the spec as UTF-8") from None
    except tomllib.TOMLDecodeError as exc:
        raise EvalkitError(f"{path}: invalid TOML ({exc})") from None
    for item in (raw.get("study") or {}).get("quick") or []:
        if not isinstance(item, str) or "=" not in item:
            raise EvalkitError(f"{path}: study.quick has {item!r}; expected section.key=value overrides")
    if quick:
        spec = from_mapping(StudyConfig, raw, str(path))
        if not spec.study.quick:
            raise EvalkitError(f"{path}: --quick needs a study.quick list of overrides; this spec has none")
        raw = apply_overrides(raw, list(spec.study.quick), StudyConfig)
    raw = apply_overrides(raw, list(overrides or []), StudyConfig)
    cfg = from_mapping(StudyConfig, raw, str(path))
    if not cfg.study.id:
        cfg = dataclasses.replace(cfg, study=dataclasses.replace(cfg.study, id=path.parent.name))
    if quick:  # the quick profile's runs and report sit beside the full study's, never over them
        cfg = dataclasses.replace(cfg, study=dataclasses.replace(cfg.study, out_dir=str(cfg.out_dir) + "-quick"),
                                  report=dataclasses.replace(cfg.report, out_dir=str(cfg.report_dir) + "-quick"))
    if cfg.data.n_items < 0:
        raise EvalkitError(f"{path}: data.n_items is {cfg.data.n_items}; expected 0 (all) or a positive count")
    if cfg.data.transfer_items < 0:
        raise EvalkitError(f"{path}: data.transfer_items is {cfg.data.transfer_items}; expected 0 (all) or a positive count")
    if cfg.data.transfer not in ("", "tldr", "cnndm") or (cfg.data.transfer and cfg.data.transfer == cfg.data.dataset):
        raise EvalkitError(f"{path}: data.transfer is {cfg.data.transfer!r}; expected empty or the other dataset (tldr, cnndm)")
    validate_study(cfg, path)
    for i, t in enumerate(cfg.train):
        bad = [k for k in t.kinds if k not in TRAINED_KINDS]
        if bad:
            raise EvalkitError(f"{path}: train[{i}].kinds has {bad[0]!r}; expected some of {', '.join(TRAINED_KINDS)}")
        if not t.preset:
            raise EvalkitError(f"{path}: train[{i}] has no preset; expected one of tiny, default, smollm2-cpu, smollm2, ...")
    return dataclasses.replace(cfg, path=str(path))


# ------------------------------------------------------------------------------------------------ reference page

def _field_notes(cls: type) -> dict[str, str]:
    """Each field's trailing comment in the dataclass's own source: the one place a spec key is explained."""
    notes = {}
    for line in inspect.getsource(cls).splitlines():
        m = re.match(r"\s+(\w+): [^=]+=.*?(?:#\s*(.*))?$", line)
        if m and not line.lstrip().startswith(("def ", "return", "@")):
            notes[m.group(1)] = (m.group(2) or "").strip()
    return notes


def _shown_type(tp) -> str:
    if typing.get_origin(tp) is tuple:
        return f"list of {_shown_type(typing.get_args(tp)[0])}"
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if args and len(args) < len(typing.get_args(tp)):
        return f"{_shown_type(args[0])} (optional)"
    return _type_name(tp)


def spec_reference() -> str:
    """``docs/study-spec.md``: every section and key of ``study.toml`` with its type, default and meaning, made from
    the config dataclasses themselves (a test checks the committed page is this text)."""
    out = ["# study.toml reference", "",
           "Every section and key of a study spec, with its type, its default and what it does. This page is generated "
           "from the dataclasses in `evalkit/config.py` (`python -m evalkit.config > docs/study-spec.md`); a test "
           "checks it matches them. Any key can be overridden on the command line: `--set section.key=value` "
           "(`[[train]]` entries by index: `--set train.1.set=sft_steps=60`).", ""]
    hints = typing.get_type_hints(StudyConfig)
    for f in dataclasses.fields(StudyConfig):
        if not f.metadata.get("key", True):
            continue
        tp = hints[f.name]
        cls = typing.get_args(tp)[0] if typing.get_origin(tp) is tuple else tp
        header = f"## [[{f.name}]]" if typing.get_origin(tp) is tuple else f"## [{f.name}]"
        out += [header, ""]
        if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "("):
            out += [" ".join(cls.__doc__.split()), ""]
        out += ["| key | type | default | meaning |", "|---|---|---|---|"]
        notes, field_hints = _field_notes(cls), typing.get_type_hints(cls)
        for g in dataclasses.fields(cls):
            default = g.default if g.default is not dataclasses.MISSING else g.default_factory()
            shown = "(none)" if default in ("", (), None) else (str(default).lower() if isinstance(default, bool) else repr(default) if not isinstance(default, tuple) else str(list(default)))
            out.append(f"| `{g.name}` | {_shown_type(field_hints[g.name])} | `{shown}` | {notes.get(g.name, '').replace('|', '/')} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(spec_reference(), end="")
