"""The encoder's ONNX Runtime copy: a cold `search` or `ask` encodes its question without importing torch.

Importing torch and transformers' model classes took 3.6-4.9 s of every cold `search` on 2 cores before any weight
was read. `build-index` therefore exports the encoder it used — the same weights — to ONNX once
(`models/cache/onnx-encoder-<fingerprint>/`), and `search`, `ask`, `chat` and the server run their questions through
onnxruntime when that copy is there. The word-embedding table (250k x 384 for multilingual e5: 384 MB of the 470)
is kept outside the graph as a memory-mapped `.npy`, so a question reads only its own rows and the runtime loads an
86 MB graph (0.3 s) instead of 470 MB (1.1 s); the graph takes the looked-up rows (`inputs_embeds`), and adds the
position and type embeddings itself, as the model does. That equivalence holds for BERT-architecture models (every
e5-small / e5-base, MiniLM, bge), whose position ids do not depend on the token ids; other architectures keep the
torch path. A missing, partial or unreadable copy only costs the torch load, never an error.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .artifacts import complete_copy, prune_copies, staged_folder, utc_timestamp, write_json
from .errors import OhloraError

EXPORT_FORMAT = 1
PREFIX = "onnx-encoder-"
MODEL_FILE = "model.onnx"
EMBEDDINGS_FILE = "word_embeddings.npy"
MANIFEST_FILE = "export.json"
#: Exports kept in the cache (most recently written first): one per encoder in use, two indexes' worth.
KEEP = 2
#: ONNX opset of the export (onnxruntime 1.17+ runs it).
OPSET = 17


def export_folder(cache: Path, fingerprint: str, prefix: str = PREFIX) -> Path:
    """Where the export of the encoder with this fingerprint lives (`prefix`: another kind of model's copies, such as
    the pair models' in crossencoder.py, kept and pruned apart from the encoders')."""
    return cache / f"{prefix}{fingerprint[:16]}"


def exportable(model_config: dict[str, Any]) -> bool:
    """Whether a model of this config.json runs the same from looked-up embeddings (see the module's docstring)."""
    return model_config.get("model_type") == "bert"


def ready(folder: Path, fingerprint: str) -> bool:
    """A complete export of this encoder: its manifest names the fingerprint and the files have their sizes."""
    expected = {"format": EXPORT_FORMAT, "fingerprint": fingerprint}
    return complete_copy(folder, MANIFEST_FILE, expected, {MODEL_FILE, EMBEDDINGS_FILE}) is not None


def export(transformer: Any, fingerprint: str, cache: Path, prefix: str = PREFIX) -> Path | None:
    """Write the ONNX copy of a loaded BERT-architecture transformer (best effort).

    Args:
        transformer: the torch `BertModel` the encoder runs.
        fingerprint: the encoder folder's fingerprint (the copy's key).
        cache: the cache folder (models/cache).
        prefix: the copies' folder prefix (`export_folder`).

    Returns:
        The export's folder, or None when the model is not exportable or the copy could not be written (an
        unwritable or full cache, an exporter that fails): the torch path then serves, nothing else changes.
    """
    if not exportable(transformer.config.to_dict()):
        return None
    folder = export_folder(cache, fingerprint, prefix)
    if ready(folder, fingerprint):
        return folder
    try:
        with staged_folder(folder, keep_existing=lambda out: ready(out, fingerprint)) as staging:
            _write(transformer, fingerprint, staging)
    except (OSError, OhloraError):  # unwritable, full, or its lock held by another writer too long
        return None
    except Exception:  # noqa: BLE001 - the exporter (torch.onnx, onnx) failing on this model: keep torch
        return None
    prune_copies(folder, f"{prefix}*", KEEP)
    return folder


def _write(transformer: Any, fingerprint: str, out: Path) -> None:
    import warnings

    import torch

    class Body(torch.nn.Module):
        """The transformer from looked-up word embeddings on."""

        def __init__(self, model: Any) -> None:
            super().__init__()
            self.model = model

        def forward(self, inputs_embeds: Any, attention_mask: Any) -> Any:
            return self.model(inputs_embeds=inputs_embeds, attention_mask=attention_mask).last_hidden_state

    out.mkdir(parents=True, exist_ok=True)
    import copy

    # A copy: tracing leaves the traced model changed (its outputs moved by up to 0.06 afterwards), and the
    # encoder in use may be on a GPU or in half precision.
    model = copy.deepcopy(transformer).float().cpu().eval()
    dims = {0: "batch", 1: "tokens"}
    # A padded row in the example: the tracer records the code path taken, and with a mask of ones only, the
    # model may skip the mask altogether.
    example = (torch.zeros(2, 4, model.config.hidden_size), torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]]))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer notes about Python control flow the export does not depend on
        torch.onnx.export(
            Body(model),
            example,
            str(out / MODEL_FILE),
            dynamo=False,
            input_names=["inputs_embeds", "attention_mask"],
            output_names=["last_hidden_state"],
            dynamic_axes={"inputs_embeds": dims, "attention_mask": dims, "last_hidden_state": dims},
            opset_version=OPSET,
        )
    table = model.get_input_embeddings().weight.detach().float().numpy()  # (vocab, hidden)
    np.save(out / EMBEDDINGS_FILE, table)
    manifest = {
        "format": EXPORT_FORMAT,
        "fingerprint": fingerprint,
        "made_by": f"torch {torch.__version__} torch.onnx (opset {OPSET})",
        "created": utc_timestamp(),
        "sizes": {name: (out / name).stat().st_size for name in (MODEL_FILE, EMBEDDINGS_FILE)},
    }
    write_json(out / MANIFEST_FILE, manifest)


class OnnxBody:
    """The exported transformer: token ids and mask in, last hidden states out (numpy)."""

    def __init__(self, folder: Path) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.log_severity_level = 3
        # Pool threads that sleep when a run ends: a question is one short run, and spinning threads would take the
        # cores the LLM generates on next (the thread-pool fight device.configure_threads describes).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(folder / MODEL_FILE), options, providers=["CPUExecutionProvider"])
        self.embeddings = np.load(folder / EMBEDDINGS_FILE, mmap_mode="r")  # (vocab, hidden), read row by row
        self.folder = folder

    def __call__(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Args: ids, mask: int (batch, tokens). Returns: float32 (batch, tokens, hidden)."""
        rows = np.ascontiguousarray(self.embeddings[ids], dtype=np.float32)
        feeds = {"inputs_embeds": rows, "attention_mask": mask.astype(np.int64)}
        return self.session.run(None, feeds)[0]


def load(cache: Path, fingerprint: str, prefix: str = PREFIX) -> OnnxBody | None:
    """The export of this encoder, ready to run; None when there is none, it is incomplete, or onnxruntime is
    missing or cannot read it."""
    folder = export_folder(cache, fingerprint, prefix)
    if not ready(folder, fingerprint):
        return None
    try:
        return OnnxBody(folder)
    except Exception:  # noqa: BLE001 - no onnxruntime, or a damaged graph: the torch path serves
        return None
