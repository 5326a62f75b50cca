"""Study configuration: frozen dataclasses loaded from ``studies/<id>/study.toml``, with type-checked dotted overrides
(``--set data.split=valid1``). An unknown key or a value of the wrong type is an error naming the file and the key.
"""

from __future__ import annotations

import dataclasses
import tomllib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from evalkit.errors import EvalkitError


@dataclass(frozen=True)
class DataConfig:
    """Which items the study is about."""

    dataset: str = "tldr"
    split: str = "valid2"
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
    kinds: tuple[str, ...] = ("pretrained", "sft", "ppo", "best_of_n")  # which of the ladder's policies enter the study
    set: tuple[str, ...] = ()  # ladder field overrides, e.g. ["sft_steps=20", "eval_posts=50"]
    out_dir: str = ""  # default: <study out_dir>/ladder-<hash of the ladder config>


@dataclass(frozen=True)
class ReleasedConfig:
    """OpenAI's released human comparisons to bring in (bundled short names or file paths)."""

    comparisons: tuple[str, ...] = ("batch18", "batch13", "batch0_cnndm")
    external_summaries: bool = True  # OpenAI's 1.3B RLHF summaries of the bundled TL;DR posts


@dataclass(frozen=True)
class PolicyConfig:
    """A checkpoint that enters the study (``[[policies]]`` in study.toml)."""

    id: str = ""
    checkpoint: str = ""
    kind: str = ""  # read from the checkpoint's evalkit.json when empty
    n_params: int = 0  # read or counted when 0


@dataclass(frozen=True)
class GenerateConfig:
    """Decoding for ``evalkit generate`` (the paper's evaluation default: greedy, 48 tokens)."""

    temperature: float = 0.0
    top_p: float = 1.0
    n_samples: int = 1
    seed: int = 0
    batch_size: int = 64
    dtype: str = "auto"  # decoding precision: auto (bfloat16 where the device has bf16 matrix units) | float32 | bfloat16
    max_query_tokens: int = 0  # 0: each checkpoint's recorded contract (a longer query than it was trained on is an error)
    baselines: tuple[str, ...] = ("ref",)


@dataclass(frozen=True)
class DesignConfig:
    """How ``evalkit study build`` turns generations into labeling tasks."""

    kind: str = ""  # pairwise | likert; default: pairwise for TL;DR, likert for CNN/DM
    baseline: str = "ref"  # pairwise: every policy is compared with this one
    policies: tuple[str, ...] = ()  # policy ids to evaluate; default: every policy but the baseline
    generations: str = ""  # a generations.parquet; default: <out_dir>/generations/generations.parquet
    items_per_policy: int = 100
    overlap_fraction: float = 0.15  # of main tasks, each given to overlap_labelers labelers
    overlap_labelers: int = 3
    gold_fraction: float = 0.05  # a summary of another post vs the right one: the answer is known
    attention_fraction: float = 0.05  # the reference with its words shuffled vs the reference
    sentinel_policy: str = ""  # e.g. an SFT policy: its pairs with the baseline recur in every batch
    sentinels_per_batch: int = 2
    batch_size: int = 40  # tasks per labeler batch


@dataclass(frozen=True)
class LabelersConfig:
    count: int = 6
    ids: tuple[str, ...] = ()  # default: labeler-01 ... labeler-NN


@dataclass(frozen=True)
class ReportConfig:
    """What ``evalkit report`` analyses."""

    source: str = "study"  # study: <out_dir>/study tables; released: the [released] comparisons alone
    baselines: tuple[str, ...] = ("ref",)
    split: str = "valid2"  # "" = every split
    n_boot: int = 1000
    reward_models: tuple[str, ...] = ()  # reward-model folders for an accuracy-vs-size table
    out_dir: str = ""  # default: reports/<id> (reports/<id>-quick under --quick)


@dataclass(frozen=True)
class StudyMeta:
    id: str = ""
    title: str = ""
    seed: int = 0
    out_dir: str = ""  # default: runs/<id>
    simulate: bool = False  # evalkit run: answer the tasks with the simulated panel and write the report
    quick: tuple[str, ...] = ()  # overrides applied by `evalkit run --quick` (a small profile; its own out_dir)


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
    report: ReportConfig = field(default_factory=ReportConfig)
    path: str = ""  # the study.toml it came from

    @property
    def id(self) -> str:
        return self.study.id

    @property
    def out_dir(self) -> Path:
        return Path(self.study.out_dir or f"runs/{self.study.id}")

    @property
    def report_dir(self) -> Path:
        return Path(self.report.out_dir or f"reports/{self.study.id}")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d.pop("path")
        return d


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, Mapping):
            raise EvalkitError(f"{where}: expected a table, got {value!r}")
        return from_mapping(tp, value, where)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise EvalkitError(f"{where}: expected a list, got {value!r}")
        inner = typing.get_args(tp)[0]
        return tuple(_coerce(v, inner, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is int and isinstance(value, bool) or not isinstance(value, tp):
        raise EvalkitError(f"{where}: expected {_type_name(tp)}, got {value!r}")
    return value


def from_mapping(cls: type, mapping: Mapping[str, Any], where: str) -> Any:
    """Build dataclass ``cls`` from a mapping, rejecting unknown keys and mistyped values."""
    hints = typing.get_type_hints(cls)
    # StudyConfig.path records where the spec came from and is not a key of the file; every other "path" is a key
    names = [f.name for f in dataclasses.fields(cls) if not (cls is StudyConfig and f.name == "path")]
    unknown = [k for k in mapping if k not in names]
    if unknown:
        raise EvalkitError(f"{where}: unknown key '{unknown[0]}'; known: {', '.join(names)}")
    return cls(**{k: _coerce(v, hints[k], f"{where}.{k}" if where else k) for k, v in mapping.items()})


def _parse_override(text: str, tp: Any, key: str) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        if text.lower() in ("none", ""):
            return None
        tp = [a for a in typing.get_args(tp) if a is not type(None)][0]
        origin = typing.get_origin(tp)
    try:
        if tp is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return text.lower() in ("true", "1", "yes")
        if tp in (int, float):
            return tp(text)
        if origin is tuple:
            return tuple(s.strip() for s in text.split(",") if s.strip())
        return text
    except ValueError:
        raise EvalkitError(f"--set {key}={text}: expected {_type_name(tp)}") from None


def apply_overrides(raw: dict[str, Any], overrides: list[str], cls: type) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides to a raw TOML dict, parsing each value as its field's type."""
    raw = {k: dict(v) if isinstance(v, Mapping) else v for k, v in raw.items()}
    for item in overrides:
        if "=" not in item:
            raise EvalkitError(f"--set {item!r}: expected section.key=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        hints = typing.get_type_hints(cls)
        node = raw
        i = 0
        while i < len(parts) - 1:
            part = parts[i]
            tp = hints.get(part)
            inner = typing.get_args(tp)[0] if typing.get_origin(tp) is tuple and typing.get_args(tp) else None
            if inner is not None and dataclasses.is_dataclass(inner):  # [[array]] of tables: section.INDEX.key
                entries = node.get(part, [])
                index = parts[i + 1] if i + 1 < len(parts) - 1 else ""
                if not index.isdigit() or int(index) >= len(entries):
                    raise EvalkitError(f"--set {key}: expected {part}.N.key with N below {len(entries)} (the [[{part}]] entries)")
                node[part] = entries = [dict(e) for e in entries]
                node = entries[int(index)]
                hints = typing.get_type_hints(inner)
                i += 2
                continue
            if tp is None or not dataclasses.is_dataclass(tp):
                raise EvalkitError(f"--set {key}: unknown section '{part}'; known: {', '.join(n for n, t in hints.items() if dataclasses.is_dataclass(t))}")
            hints = typing.get_type_hints(tp)
            node = node.setdefault(part, {})
            i += 1
        leaf = parts[-1]
        if leaf not in hints:
            raise EvalkitError(f"--set {key}: unknown key '{leaf}'; known: {', '.join(hints)}")
        node[leaf] = _parse_override(value.strip(), hints[leaf], key)
    return raw


POSITIVE = {"steps", "iterations", "epochs", "batch_size", "rollouts", "minibatch_size", "ppo_epochs", "n", "depth",
            "seq_len", "pretrain_steps", "pretrain_seq_len", "pretrain_batch", "sft_steps", "sft_batch", "rm_epochs",
            "ppo_iterations", "ppo_rollouts", "ppo_minibatch", "best_of_n", "max_query_tokens", "max_summary_tokens"}


def check_values(cfg, where: str) -> None:
    """Trainer and ladder configs: counts that must be positive are, rates are finite and positive, nothing is
    negative or NaN (a negative step count would otherwise train nothing and say it succeeded)."""
    import math

    from evalkit.precision import check as check_precision

    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if f.name == "precision":
            check_precision(v, f"{where}: precision")
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            continue
        if isinstance(v, float) and not math.isfinite(v):
            raise EvalkitError(f"{where}: {f.name} is {v}; expected a finite number")
        if f.name in POSITIVE and v < 1:
            raise EvalkitError(f"{where}: {f.name} is {v}; expected a positive integer")
        if (f.name == "lr" or f.name.endswith("_lr")) and v <= 0:
            raise EvalkitError(f"{where}: {f.name} is {v}; expected a learning rate above 0")
        if f.name == "vocab_size" and v < 300:
            raise EvalkitError(f"{where}: vocab_size is {v}; expected at least 300 (256 bytes plus merges and specials)")
        if v < 0 and f.name not in ("seed",):
            raise EvalkitError(f"{where}: {f.name} is {v}; expected 0 or more")


def validate_study(cfg: StudyConfig, where: Path) -> None:
    """Cheap checks of every value a later stage would trip on, so a bad spec fails before any work is done."""
    import math

    from evalkit.data.splits import check_split

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
    if g.batch_size < 1:
        bad("generate.batch_size", g.batch_size, "a positive integer")
    if g.max_query_tokens < 0:
        bad("generate.max_query_tokens", g.max_query_tokens, "0 (each checkpoint's contract) or a token count")
    from evalkit.generate import BASELINES, Decoding

    Decoding(temperature=g.temperature, top_p=g.top_p, n_samples=g.n_samples, seed=g.seed,
             max_query_tokens=g.max_query_tokens or None, dtype=g.dtype).check()
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
    from evalkit.data import comparison_batch

    for name in cfg.released.comparisons:
        comparison_batch(name)
    for i, t in enumerate(cfg.train):
        if t.preset:
            from evalkit.train.ladder import ladder_config

            ladder_config(t.preset, t.depths or None, t.bases or None, t.set)


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
        bad = [k for k in t.kinds if k not in ("pretrained", "sft", "ppo", "best_of_n")]
        if bad:
            raise EvalkitError(f"{path}: train[{i}].kinds has {bad[0]!r}; expected some of pretrained, sft, ppo, best_of_n")
        if not t.preset:
            raise EvalkitError(f"{path}: train[{i}] has no preset; expected one of tiny, default, smollm2-cpu, smollm2, ...")
    return dataclasses.replace(cfg, path=str(path))
