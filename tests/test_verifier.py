"""The entry verifier: `train-verifier` on a tiny encoder, build-index fitting how it joins the entry decision, search
re-scoring the decision's best candidates with it, a given entry checked by it, and what happens when it is missing
or damaged."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ohlora_rag.cli import app
from ohlora_rag.config import Paths
from ohlora_rag.crossencoder import HEAD_FILE
from ohlora_rag.retriever import Retriever
from ohlora_rag.verifier import SHIPPED_VERIFIER, Verification, training_pairs, verifier_folder, verifier_pair
from tests.conftest import write_sft

from .test_conversation import _manifest, _write_calib

runner = CliRunner()

KNOWN = [
    ("how many predicted positives are right", "in_kb", "precision"),
    ("share of flagged items truly positive", "in_kb", "precision"),
    ("how many actual positives are found", "in_kb", "recall"),
    ("share of real positives the model catches", "in_kb", "recall"),
    ("why zero random units while training", "in_kb", "dropout"),
    ("randomly drop neurons to regularise", "in_kb", "dropout"),
    ("cheap fine tuning with low rank matrices", "in_kb", "lora"),
    ("adapter matrices on frozen weights", "in_kb", "lora"),
    ("optimiser with per parameter learning rates", "in_kb", "adam"),
    ("adaptive moments in an optimiser", "in_kb", "adam"),
    ("angle between two vectors", "in_kb", "cosine-similarity"),
    ("direction of vectors not their length", "in_kb", "cosine-similarity"),
    ("who painted the mona lisa", "unrelated", ""),
    ("what is a random forest", "near_miss", ""),
]
RELATED = {"precision": "recall", "recall": "precision", "dropout": "adam", "adam": "dropout", "lora": "adam"}


def _with_related(home: Path) -> None:
    """A `related` column in the tiny DB (the verifier's look-alike negatives)."""
    path = home / "data" / "concepts.csv"
    rows = list(csv.DictReader(path.open(encoding="utf-8")))
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, ["id", "title", "text", "related"])
        writer.writeheader()
        writer.writerows({**row, "related": RELATED.get(row["id"], "")} for row in rows)


def _build(home: Path, *extra: str) -> str:
    result = runner.invoke(app, ["build-index", "-q", "--known-questions", str(home / "known.csv"), *extra])
    assert result.exit_code == 0, result.output
    return result.stdout


def _train(home: Path, *extra: str) -> None:
    args = ["train-verifier", "--encoder", str(home / "models" / "sbert"), "--epochs", "1", "-q", *extra]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "trained on" in result.stdout and "build-index" in result.stdout


@pytest.fixture
def verified_home(home: Path) -> Path:
    """A home whose index has known questions, an entry decision, and a verifier trained on the tiny encoder."""
    _with_related(home)
    _write_calib(home)
    with (home / "known.csv").open("w", encoding="utf-8", newline="") as fh:
        csv.writer(fh).writerows([("question", "kind", "concept_id"), *KNOWN])
    assert "entry verifier" not in _build(home)  # none trained yet, and the shipped one is for another DB
    _train(home)
    assert "entry verifier: the decision's best" in _build(home)
    return home


def test_training_pairs_are_own_entries_and_look_alikes(verified_home: Path) -> None:
    retriever = Retriever.load(paths=Paths.resolve())
    pairs, labels = training_pairs(retriever, seed=42)
    texts = {str(retriever.stored.entry(p)["id"]): retriever.stored.entry(p)["text"] for p in range(6)}
    answered = [q for q, kind, _ in KNOWN if kind == "in_kb"]
    assert sum(labels) == len(answered)  # each answered known question once with its own entry
    assert (KNOWN[0][0], texts["precision"]) in pairs and labels[pairs.index((KNOWN[0][0], texts["precision"]))]
    # its look-alike negative: the related entry (recall), never its own
    assert any(p == (KNOWN[0][0], texts["recall"]) and not y for p, y in zip(pairs, labels))
    assert all(not y for (q, _), y in zip(pairs, labels) if q in {"who painted the mona lisa"})
    assert training_pairs(retriever, seed=42) == (pairs, labels)


def test_search_rescores_the_decisions_best_candidates_with_the_verifier(verified_home: Path) -> None:
    verify = _manifest(verified_home)["verify"]
    assert isinstance(verify, dict)
    verification = Verification.from_dict(verify, "manifest")
    record = json.loads((verified_home / "models" / "verifier" / "verifier.json").read_text())
    assert record["answers"] == 12 and record["config"]["seed"] == 42 and len(record["metrics"]["loss"]) == 1

    retriever = Retriever.load(paths=Paths.resolve())
    assert retriever.verification is not None
    retriever.verification.sure_below, retriever.verification.sure_above = 0.0, 1.0  # verify every question
    retriever.preload()
    verifier = retriever.entry_verifier()
    assert verifier is not None and retriever.entry_verifier() is verifier
    question = "what is precision"
    result = retriever.search(question, top_k=6)
    assert result.cutoff == verification.cutoff
    # the decision alone, then the verifier's logit over its best few, combined as the manifest says
    sig = retriever.signals([question])[0]
    assert retriever.decision is not None
    prob = retriever.decision.probability(sig.features())
    top = np.argsort(-prob, kind="stable")[: verification.candidates]
    texts = [retriever.stored.entry(int(sig.positions[i]))["text"] for i in top]
    logits = verifier.logits([verifier_pair(question, t) for t in texts])
    combined = verification.scores(logits, prob[top])
    best = int(sig.positions[top[int(np.argmax(combined))]])
    assert result.hits[0].position == best
    assert result.hits[0].confidence == pytest.approx(float(combined.max()))
    assert result.hits[0].matched == (combined.max() >= verification.cutoff)
    assert not any(h.matched for h in result.hits[verification.candidates :])
    # a given entry of the index: scored as that candidate is (its decision probability joined with the verifier's
    # logit, against the verified cutoff); a text that is no entry: the verifier alone against its own cutoff
    assert retriever.entry_fits(question, texts[0]) == bool(combined[0] >= verification.cutoff)
    other = "precision : a made-up text that is no entry of this DB"
    outside = float(verifier.logits([verifier_pair(question, other)])[0])
    assert retriever.entry_fits(question, other) == verification.entry_passes(outside)


def test_a_question_the_decision_settles_is_not_verified(verified_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    verify = Verification.from_dict(_manifest(verified_home)["verify"], "manifest")
    assert 0.0 <= verify.sure_below <= verify.cutoff <= verify.sure_above <= 1.0
    retriever = Retriever.load(paths=Paths.resolve())
    verification, decision = retriever.verification, retriever.decision
    assert verification is not None and decision is not None
    question = "what is precision"
    prob = decision.probability(retriever.signals([question])[0].features())
    best = float(prob.max())
    verifier = retriever.entry_verifier()
    assert verifier is not None

    def refuse(_pairs: object) -> np.ndarray:
        raise AssertionError("the verifier ran on a settled question")

    monkeypatch.setattr(verifier, "logits", refuse)
    # a band the best candidate lies above: taken on the decision's word, its probability as the score
    low = min(best, verification.cutoff)
    verification.sure_below, verification.cutoff, verification.sure_above = 0.0, low * 0.5, low * 0.75
    taken = retriever.search(question, top_k=3)
    assert taken.hits[0].matched and taken.hits[0].confidence == pytest.approx(best)
    assert not any(h.matched for h in taken.hits[1:])
    # below the band: declined without the verifier
    verification.sure_below, verification.sure_above, verification.cutoff = best * 2, 1.0, best * 2
    assert not retriever.search(question).hits[0].matched


def test_the_settled_band_keeps_every_question_the_verifier_changed() -> None:
    from ohlora_rag.verifier import SETTLED_MARGIN, _settled_band

    best = np.array([0.01, 0.05, 0.2, 0.4, 0.6, 0.95, 0.99])
    did = np.array([-1, -1, 1, -1, 0, 1, 1])  # the verifier took 0.2, declined 0.4, took another for 0.6
    below, above = _settled_band(best, did, cutoff=0.3)
    odds = lambda p: np.log(p / (1 - p))  # noqa: E731
    assert odds(below) == pytest.approx(odds(0.2) - SETTLED_MARGIN, abs=1e-4)
    assert odds(above) == pytest.approx(odds(0.6) + SETTLED_MARGIN, abs=1e-4)
    assert below <= 0.2 and above >= 0.6  # the verifier still runs on each question it changed
    # never across the cutoff; nothing to go by: never settled
    assert _settled_band(np.array([0.9]), np.array([1]), cutoff=0.5) == (0.5, 1.0)
    assert _settled_band(np.array([0.1]), np.array([-1]), cutoff=0.5) == (0.0, 0.5)


def test_the_same_seed_trains_the_same_verifier(verified_home: Path) -> None:
    from safetensors.torch import load_file

    _train(verified_home, "--out", str(verified_home / "again"))
    first = load_file(str(verified_home / "models" / "verifier" / HEAD_FILE))
    again = load_file(str(verified_home / "again" / HEAD_FILE))
    assert all((first[k] == again[k]).all() for k in first)


def test_a_damaged_verifier_leaves_the_decision_alone(verified_home: Path, capsys: pytest.CaptureFixture[str]) -> None:
    (verified_home / "models" / "verifier" / HEAD_FILE).unlink()
    retriever = Retriever.load(paths=Paths.resolve())
    assert retriever.entry_verifier() is None
    assert "entry verifier" in capsys.readouterr().err
    result = retriever.search("what is precision")  # the decision alone, no error
    assert retriever.decision is not None and result.cutoff == retriever.decision.cutoff
    assert retriever.entry_fits("what is precision", "precision : anything") is None


def test_no_verifier_flag_and_which_verifier_serves_which_db(verified_home: Path) -> None:
    assert "entry verifier" not in _build(verified_home, "--no-verifier")
    assert _manifest(verified_home)["verify"] is None
    # asking for the check on such an index fails on the index, before any LLM is loaded (this one does not exist)
    sft = str(write_sft(verified_home / "sft.csv"))
    args = ["evaluate-answers", "--data", sft, "--verify-entries", "--base-llm", str(verified_home / "no-llm")]
    result = runner.invoke(app, args)
    assert result.exit_code != 0 and "--verify-entries: the index uses no entry verifier" in result.output
    user = verified_home / "models" / "verifier"
    own = str(_manifest(verified_home)["corpus_hash"])
    assert verifier_folder(user, own) == user
    assert verifier_folder(user, "another-db") is None
    shipped = json.loads((SHIPPED_VERIFIER / "verifier.json").read_text()) if SHIPPED_VERIFIER.is_dir() else None
    if shipped is not None:
        assert verifier_folder(verified_home / "nothing", shipped["corpus_hash"]) == SHIPPED_VERIFIER


def test_damaged_verification_in_the_manifest_is_one_line() -> None:
    good = Verification(0.5, 0.4, 3, 0.5).to_dict()
    assert Verification.from_dict(good, "m").candidates == 3
    before = {k: v for k, v in good.items() if not k.startswith("sure_")}  # an index built before the band
    old = Verification.from_dict(before, "m")
    assert (old.sure_below, old.sure_above) == (0.0, 1.0) and not old.settled(0.0) and not old.settled(1.0)
    crossed = {**good, "sure_below": 0.5}  # above the cutoff
    for bad in ({**good, "weight": 2.0}, {**good, "candidates": 0}, {**good, "version": 99}, "x", crossed):
        with pytest.raises(Exception, match="build-index"):
            Verification.from_dict(bad, "m")


def test_train_verifier_bad_input_is_one_line(home: Path) -> None:
    assert runner.invoke(app, ["build-index", "-q", "--no-calibrate"]).exit_code == 0
    undecided = runner.invoke(app, ["train-verifier", "--encoder", str(home / "models" / "sbert")])
    assert undecided.exit_code != 0 and "known questions" in undecided.output
    assert "Traceback" not in undecided.output and len(undecided.output.strip().splitlines()) == 1
    zero = runner.invoke(app, ["train-verifier", "--epochs", "0"])
    assert zero.exit_code != 0 and "--epochs 0" in zero.output
    assert not (home / "models" / "verifier").exists()


def test_the_onnx_copy_scores_as_the_torch_model(verified_home: Path) -> None:
    """build-index loaded the verifier on torch and wrote its ONNX copy; the next load runs that, with the same
    logits (tokenizers' pair truncation = transformers', the head in NumPy)."""
    from ohlora_rag.crossencoder import OnnxPairModel, PairModel, read_pair_model
    from ohlora_rag.models import resolve
    from ohlora_rag.verifier import VERIFIER, load_verifier

    paths = Paths.resolve()
    assert list((paths.cache_dir).glob("onnx-pair-*/model.onnx"))
    copy = load_verifier(paths, str(_manifest(verified_home)["corpus_hash"]))
    assert isinstance(copy, OnnxPairModel)
    folder = paths.verifier_dir
    torch_model = PairModel.load(
        folder,
        resolve(str(verified_home / "models" / "sbert"), "encoder", paths).path,
        read_pair_model(folder, VERIFIER),
        VERIFIER,
    )
    long = "why " * 300  # cut to --max-length from the entry's end, the same way on both
    pairs = [("what is precision", "precision : true positives"), ("x", long), (long, "recall : misses")]
    assert np.allclose(copy.logits(pairs), torch_model.logits(pairs), atol=1e-4)


def test_evaluate_trust_reports_the_verified_decision(verified_home: Path) -> None:
    from ohlora_rag.evaluate import VERIFIED_VARIANT

    (verified_home / "data" / "trust_test.csv").write_text(
        (verified_home / "data" / "trust_calib.csv").read_text(encoding="utf-8"), encoding="utf-8"
    )
    calib = verified_home / "calib_copy.csv"
    calib.write_text((verified_home / "data" / "trust_calib.csv").read_text(encoding="utf-8"), encoding="utf-8")
    tiny = verified_home / "models" / "sbert"
    (tiny / "ohlora_model.json").write_text(json.dumps({"kind": "encoder", "base": str(tiny)}))  # its own base
    args = ["evaluate-trust", "--calibrate", str(calib), "--known-questions", str(verified_home / "known.csv")]
    result = runner.invoke(app, [*args, "--model", str(tiny), "--json"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["rows"]
    assert rows[-1]["decision"] == VERIFIED_VARIANT and 0.0 <= rows[-1]["cutoff"] <= 1.0
    assert rows[-1]["right"] + rows[-1]["wrong"] + rows[-1]["declined"] == pytest.approx(1.0)


def test_a_given_entry_the_verified_decision_turns_down_is_declined(
    verified_home: Path, tiny_lm: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`evaluate-answers --verify-entries`: a turned-down entry is answered as no information and the answer declines
    (the tiny random model never declines by itself: the guard's decline replaces its text); a passed one is answered
    from the entry as given."""
    from ohlora_rag.answers import is_abstention
    from ohlora_rag.config import AskConfig
    from ohlora_rag.engine import QueryEngine

    config = AskConfig(base_llm=str(tiny_lm), use_adapter=False, max_new_tokens=4, runtime="torch", guard=False)
    engine = QueryEngine.load(config, Paths.resolve())
    assert engine.retriever is not None and engine.retriever.entry_verifier() is not None
    entry = "recall : true positives over actual positives | key idea: few misses"
    seen: list[tuple[str, str]] = []

    def fits(verdict: bool):  # noqa: ANN202
        return lambda question, text: seen.append((question, text)) or verdict

    monkeypatch.setattr(engine.retriever, "entry_fits", fits(False))
    turned_down = engine.stream_with("what is precision", entry, verify=True).answer()
    assert seen == [("what is precision", entry)]
    assert turned_down.used is None and turned_down.guarded and is_abstention(turned_down.answer)
    monkeypatch.setattr(engine.retriever, "entry_fits", fits(True))
    passed = engine.stream_with("what is precision", entry, verify=True).answer()
    assert not passed.guarded and not is_abstention(passed.answer)
    unchecked = engine.stream_with("what is precision", entry).answer()  # verify off: not asked
    assert len(seen) == 2 and unchecked.answer == passed.answer
