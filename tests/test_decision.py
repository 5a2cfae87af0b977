"""The entry decision: BM25 with Hangul, score statistics, candidate features, fitting, and the CLI around them."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ohlora_rag.cli import app
from ohlora_rag.data import load_labelled_questions
from ohlora_rag.decision import FEATURES, DecisionModel, Signals, fit_decision, outcomes
from ohlora_rag.errors import DataFormatError
from ohlora_rag.evaluate import TRUST_VARIANTS
from ohlora_rag.lexical import LexicalIndex, entry_names, tokenize
from ohlora_rag.store import ScoreStats, load_index

runner = CliRunner()


def test_tokenize_words_and_hangul_bigrams() -> None:
    assert tokenize("What is the F1-score of the classes?") == ["f1", "score", "classe"]
    assert tokenize("코사인 유사도가") == ["코사인", "코사", "사인", "유사도가", "유사", "사도", "도가"]
    assert tokenize("🤖🤖 ?!") == []


def test_entry_names_split_aliases() -> None:
    assert entry_names("F1 score (F1, F-measure) : the harmonic mean") == [["f1", "score"], ["f1"], ["f", "measure"]]
    assert entry_names("no name separator here") == []


def test_bm25_ranks_shared_words_and_matches_korean_stems(tmp_path: Path) -> None:
    texts = [
        "precision : true positives over predicted positives",
        "코사인 유사도 : 두 벡터 사이의 각도",
        "dropout : zeroes units",
    ]
    index = LexicalIndex.build(texts)
    assert int(np.argmax(index.scores("how do predicted positives work"))) == 0
    assert int(np.argmax(index.scores("코사인 유사도가 뭐야?"))) == 1  # "유사도가" meets "유사도" through its bigrams
    assert index.scores("zzz qqq").tolist() == [0.0, 0.0, 0.0]
    index.save(tmp_path)
    again = LexicalIndex.load(tmp_path)
    np.testing.assert_array_equal(again.scores("dropout units"), index.scores("dropout units"))


def test_score_stats_equal_the_full_distribution() -> None:
    rng = np.random.default_rng(0)
    v = rng.standard_normal((50, 8)).astype(np.float32)
    q = rng.standard_normal((3, 8)).astype(np.float32)
    mu, sigma = ScoreStats.of(v).mu_sigma(q)
    full = q.astype(np.float64) @ v.astype(np.float64).T  # (3, 50)
    np.testing.assert_allclose(mu, full.mean(axis=1), rtol=1e-9)
    np.testing.assert_allclose(sigma, full.std(axis=1), rtol=1e-9)


def test_features_of_a_candidate_list() -> None:
    s = Signals(
        positions=np.array([4, 7, 9]),
        cosine=np.array([0.9, 0.8, 0.5]),
        bm25=np.array([0.0, 3.0, 1.5]),
        name=np.array([1.0, 0.0, 0.5]),
        mu=0.5,
        sigma=0.1,
        bm25_max=3.0,
    )
    f = s.features()
    col = {name: f[:, i] for i, name in enumerate(FEATURES)}
    np.testing.assert_allclose(col["top_gap"], [0.0, -0.1, -0.4])
    np.testing.assert_allclose(col["margin"], [0.1, -0.1, -0.4])
    np.testing.assert_allclose(col["z"], [4.0, 3.0, 0.0])
    np.testing.assert_allclose(col["z_max"], [4.0, 4.0, 4.0])
    np.testing.assert_allclose(col["bm25_share"], [0.0, 1.0, 0.5])
    np.testing.assert_array_equal(col["bm25_top"], [0.0, 1.0, 0.0])
    np.testing.assert_allclose(col["bm25"], np.log1p([0.0, 3.0, 1.5]))


def test_outcomes_count_each_kind() -> None:
    o = outcomes(
        [1, 2, None, None, 5, None], [1, 3, 4, None, None, None], ["in_kb"] * 3 + ["near_miss"] * 2 + ["unrelated"]
    )
    assert (o.right, o.wrong, o.declined) == pytest.approx((1 / 3, 1 / 3, 1 / 3))
    assert (o.near_miss_declined, o.unrelated_declined) == (0.5, 1.0)
    assert (o.in_kb, o.near_miss, o.unrelated) == (3, 2, 1)


def _synthetic(n: int, seed: int) -> tuple[list[Signals], list[int | None], list[str]]:
    """In-KB questions whose right entry stands out; off-topic ones where nothing does."""
    rng = np.random.default_rng(seed)
    signals, gold, kinds = [], [], []
    for i in range(n):
        cos = rng.uniform(0.70, 0.78, 5)
        if i % 2 == 0:
            cos[0] = rng.uniform(0.86, 0.92)
            gold.append(100 + i)
            kinds.append("in_kb")
        else:
            gold.append(None)
            kinds.append("near_miss" if i % 4 == 1 else "unrelated")
        order = np.argsort(-cos)
        positions = np.array([100 + i, 1, 2, 3, 4])[order]
        signals.append(Signals(positions, cos[order], np.zeros(5), np.zeros(5), 0.7, 0.03, 0.0))
    return signals, gold, kinds


def test_fit_decision_separates_and_round_trips() -> None:
    signals, gold, kinds = _synthetic(80, 0)
    model = fit_decision(signals, gold, kinds, "synthetic.csv")
    assert model.metrics["right"] == 1.0 and model.metrics["near_miss_declined"] == 1.0
    assert 0.0 < model.cutoff < 1.0
    test_signals, test_gold, test_kinds = _synthetic(40, 1)
    from ohlora_rag.decision import decide

    o = decide(model, test_signals, test_gold, test_kinds)
    assert o.right == 1.0 and o.wrong == 0.0 and o.unrelated_declined == 1.0
    again = DecisionModel.from_dict(json.loads(json.dumps(model.to_dict())), "x")
    f = test_signals[0].features()
    np.testing.assert_allclose(again.probability(f), model.probability(f))


def test_fit_decision_with_a_subset_gives_other_features_no_weight() -> None:
    signals, gold, kinds = _synthetic(40, 2)
    model = fit_decision(signals, gold, kinds, "s.csv", use=("cosine",))
    assert [c != 0 for c in model.coef] == [name == "cosine" for name in FEATURES]


def test_fit_decision_refuses_labels_without_positives() -> None:
    signals, _, kinds = _synthetic(10, 3)
    with pytest.raises(DataFormatError, match=re.escape("s.csv: calibration needs questions whose right entry")):
        fit_decision(signals, [None] * 10, kinds, "s.csv")


def test_decision_model_of_another_version_is_refused() -> None:
    signals, gold, kinds = _synthetic(20, 4)
    data = fit_decision(signals, gold, kinds, "s.csv").to_dict()
    data["version"] = 99
    with pytest.raises(DataFormatError, match=re.escape("m.json: decision model of another version (99)")):
        DecisionModel.from_dict(data, "m.json")


def _write(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def test_labelled_questions_from_trust_and_pairs_files(tmp_path: Path) -> None:
    trust = _write(
        tmp_path / "t.csv", ["question", "kind", "concept_id"], [["q1", "in_kb", "precision"], ["q2", "unrelated", ""]]
    )
    got = load_labelled_questions(trust)
    assert (got.questions, got.kinds, got.gold, got.gold_by) == (
        ["q1", "q2"],
        ["in_kb", "unrelated"],
        ["precision", None],
        "id",
    )
    pairs = _write(
        tmp_path / "p.csv",
        ["user_question", "rag_retrieved_data", "similarity_score"],
        [["a", "entry one", "1.0"], ["a", "entry two", "0.0"], ["b", "entry two", "0.1"]],
    )
    got = load_labelled_questions(pairs)
    assert (got.questions, got.kinds, got.gold, got.gold_by) == (
        ["a", "b"],
        ["in_kb", "near_miss"],
        ["entry one", None],
        "text",
    )


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([["q", "maybe", ""]], "row 1, column 'kind' is 'maybe' — use one of in_kb, near_miss, unrelated"),
        ([["q", "in_kb", ""]], "row 1, column 'concept_id' is empty — an in_kb row names its entry's id"),
        ([["q", "unrelated", "precision"]], "row 1, column 'concept_id' is 'precision' on a unrelated row"),
        ([["", "unrelated", ""]], "row 1, column 'question' is empty"),
    ],
)
def test_bad_labelled_rows(tmp_path: Path, rows: list[list[str]], message: str) -> None:
    path = _write(tmp_path / "bad.csv", ["question", "kind", "concept_id"], rows)
    with pytest.raises(DataFormatError, match=re.escape(message)):
        load_labelled_questions(path)


CALIB = [
    ["what is precision", "in_kb", "precision"],
    ["true positives over predicted positives", "in_kb", "precision"],
    ["what is recall", "in_kb", "recall"],
    ["few misses over actual positives", "in_kb", "recall"],
    ["explain dropout", "in_kb", "dropout"],
    ["randomly zeroes units", "in_kb", "dropout"],
    ["what is lora", "in_kb", "lora"],
    ["what is adam", "in_kb", "adam"],
    ["cosine similarity angle", "in_kb", "cosine-similarity"],
    ["who won the cup", "unrelated", ""],
    ["bake bread", "unrelated", ""],
    ["what is a gan", "near_miss", ""],
]


def test_build_index_fits_the_decision_and_search_uses_it(home: Path) -> None:
    _write(home / "data" / "trust_calib.csv", ["question", "kind", "concept_id"], CALIB)
    built = runner.invoke(app, ["build-index", "-q"])
    assert built.exit_code == 0, built.output
    assert "entry decision fitted on" in built.stdout
    manifest = json.loads(
        (home / "index" / (home / "index" / "CURRENT").read_text().strip() / "manifest.json").read_text()
    )
    assert manifest["lexical"] is True and manifest["decision"]["features"] == list(FEATURES)
    found = runner.invoke(app, ["search", "precision : true positives over predicted positives", "--json"])
    assert found.exit_code == 0, found.output
    payload = json.loads(found.stdout)
    assert payload["decision"] == "model" and payload["threshold"] is None
    assert payload["cutoff"] == manifest["decision"]["cutoff"]
    probs = [h["confidence"] for h in payload["hits"]]
    assert probs == sorted(probs, reverse=True) and all(0.0 <= p <= 1.0 for p in probs)
    # --threshold keeps its meaning: the best cosine against that number, no model
    plain = json.loads(runner.invoke(app, ["search", "what is dropout", "--threshold", "0.5", "--json"]).stdout)
    assert plain["decision"] == "threshold" and plain["threshold"] == 0.5 and "confidence" not in plain["hits"][0]


def test_no_calibrate_keeps_the_threshold(home: Path) -> None:
    _write(home / "data" / "trust_calib.csv", ["question", "kind", "concept_id"], CALIB)
    assert runner.invoke(app, ["build-index", "-q", "--no-calibrate"]).exit_code == 0
    payload = json.loads(runner.invoke(app, ["search", "what is dropout", "--json"]).stdout)
    assert payload["decision"] == "threshold" and payload["threshold"] == 0.5


def test_calibration_naming_an_unknown_entry_fails_before_encoding(home: Path, tmp_path: Path) -> None:
    assert runner.invoke(app, ["build-index", "-q", "--no-calibrate"]).exit_code == 0
    before = (home / "index" / "CURRENT").read_text()
    bad = _write(tmp_path / "calib.csv", ["question", "kind", "concept_id"], [["what is xgboost", "in_kb", "xgboost"]])
    result = runner.invoke(app, ["build-index", "-q", "--calibrate", str(bad)])
    assert result.exit_code == 1
    assert result.stderr.strip() == (
        f"error: {bad}: row 1, column 'concept_id' names 'xgboost', which is not in the concept DB "
        f"{home / 'data' / 'concepts.csv'} — label questions against the DB being indexed"
    )
    assert (home / "index" / "CURRENT").read_text() == before


def test_calibrate_and_no_calibrate_conflict(home: Path) -> None:
    result = runner.invoke(app, ["build-index", "--calibrate", "x.csv", "--no-calibrate"])
    assert result.exit_code == 2 and "--calibrate and --no-calibrate: give one of them" in result.stderr


KNOWN = [
    ["how do i stop my net memorising the training set", "in_kb", "dropout"],
    ["the optimizer with per-parameter step sizes", "in_kb", "adam"],
    ["what is a gan", "near_miss", ""],
]


def _known_search(question: str) -> tuple[Signals, list[str]]:
    from ohlora_rag.retriever import Retriever

    retriever = Retriever.load()
    ids = [retriever.stored.entry(i)["id"] for i in range(retriever.stored.vectors.ntotal)]
    return retriever.signals([question])[0], ids


def test_known_questions_are_stored_and_match_their_entries(home: Path) -> None:
    _write(home / "data" / "trust_calib.csv", ["question", "kind", "concept_id"], CALIB)
    known = _write(home / "known.csv", ["question", "kind", "concept_id"], KNOWN)
    built = runner.invoke(app, ["build-index", "-q", "--known-questions", str(known)])
    assert built.exit_code == 0, built.output
    stored = load_index(home / "index")
    assert stored.manifest.known_questions == 3 and "known_questions.npz" in (stored.manifest.files or {})
    assert stored.known is not None and stored.known.positions.tolist()[2] == -1
    # asked again word for word, a known question is its entry's best match at cosine 1
    sig, ids = _known_search(KNOWN[0][0])
    feats = sig.features()
    at = int(np.flatnonzero(sig.positions == ids.index("dropout"))[0])
    assert feats[at, FEATURES.index("known")] == pytest.approx(1.0, abs=1e-5)
    assert feats[at, FEATURES.index("known_gap")] == pytest.approx(0.0, abs=1e-6)
    # asked word for word, the near-miss question is as close as can be to "no entry answers this"
    sig, _ = _known_search(KNOWN[2][0])
    assert sig.unanswerable == pytest.approx(1.0, abs=1e-5)
    # fitting on questions the index holds, each is scored as new: its own key is skipped
    from ohlora_rag.retriever import Retriever

    skipped = Retriever.load().signals([KNOWN[0][0]], skip_own=True)[0]
    assert skipped.known is not None and float(skipped.known.max()) < 0.999


def test_known_questions_without_the_file_and_with_the_off_switch(home: Path) -> None:
    _write(home / "data" / "trust_calib.csv", ["question", "kind", "concept_id"], CALIB)
    assert runner.invoke(app, ["build-index", "-q"]).exit_code == 0  # no data/sbert_train.csv: no known questions
    assert load_index(home / "index").known is None
    _write(home / "data" / "sbert_train.csv", ["question", "kind", "concept_id"], KNOWN)  # the default file
    assert runner.invoke(app, ["build-index", "-q"]).exit_code == 0
    assert load_index(home / "index").manifest.known_questions == 3
    assert runner.invoke(app, ["build-index", "-q", "--no-known-questions"]).exit_code == 0
    assert load_index(home / "index").known is None
    result = runner.invoke(app, ["build-index", "--known-questions", "x.csv", "--no-known-questions"])
    assert result.exit_code == 2 and "--known-questions and --no-known-questions: give one of them" in result.stderr


def test_a_damaged_known_questions_file_is_refused(home: Path) -> None:
    from ohlora_rag.errors import IndexNotFoundError

    known = _write(home / "known.csv", ["question", "kind", "concept_id"], KNOWN)
    assert runner.invoke(app, ["build-index", "-q", "--known-questions", str(known)]).exit_code == 0
    stored = load_index(home / "index")
    path = stored.folder / "known_questions.npz"
    data = bytearray(path.read_bytes())
    data[-40] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(IndexNotFoundError, match="known_questions.npz does not match the sha256"):
        load_index(home / "index")


def test_evaluate_trust_reports_each_decision(home: Path) -> None:
    _write(home / "data" / "trust_calib.csv", ["question", "kind", "concept_id"], CALIB)
    _write(home / "data" / "trust_test.csv", ["question", "kind", "concept_id"], CALIB[::-1])
    tiny = home / "models" / "sbert"
    (tiny / "ohlora_model.json").write_text(json.dumps({"kind": "encoder", "base": str(tiny)}))
    result = runner.invoke(app, ["evaluate-trust", "--model", str(tiny), "--json", "--variants"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)["rows"]
    # the tiny encoder is its own base here: one encoder, every variant but the verified one (no verifier for this DB)
    assert [r["decision"] for r in rows][0] == "cosine >= 0.5 (seed rule)" and len(rows) == len(TRUST_VARIANTS) - 1
    for r in rows:
        assert r["right"] + r["wrong"] + r["declined"] == pytest.approx(1.0)
        assert (r["in_kb"], r["near_miss"], r["unrelated"]) == (9, 1, 2)


def test_evaluate_trust_refuses_testing_on_the_calibration_file(home: Path) -> None:
    _write(home / "data" / "trust_calib.csv", ["question", "kind", "concept_id"], CALIB)
    calib = str(home / "data" / "trust_calib.csv")
    result = runner.invoke(app, ["evaluate-trust", "--questions", calib, "--calibrate", calib])
    assert result.exit_code == 2
    assert "--questions and --calibrate name the same file" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["build-index", "-q", "--calibrate", "missing.csv"], "labelled questions file missing.csv not found"),
        (["build-index", "-q", "--calibrate", "{pairs_like}"], "missing column 'kind', 'concept_id'"),
        (["evaluate-trust", "--questions", "missing.csv"], "labelled questions file missing.csv not found"),
        (["build-index", "-q", "--known-questions", "missing.csv"], "labelled questions file missing.csv not found"),
        (["build-index", "-q", "--known-questions", "{unknown}"], "names 'xgboost', which is not in the concept DB"),
        (
            ["evaluate-trust", "--questions", "{test}", "--known-questions", "missing.csv"],
            "labelled questions file missing.csv not found",
        ),
        (["train-llm", "--data", "{sft}", "--data", "missing.csv"], "SFT file missing.csv not found"),
        (["evaluate-answers", "--data", "missing.csv"], "missing.csv not found — check the path"),
    ],
)
def test_bad_files_for_the_new_options(home: Path, args: list[str], message: str) -> None:
    _write(home / "data" / "trust_calib.csv", ["question", "kind", "concept_id"], CALIB)
    assert runner.invoke(app, ["build-index", "-q"]).exit_code == 0
    current = (home / "index" / "CURRENT").read_text()
    files = {
        "pairs_like": str(_write(home / "q.csv", ["question", "answer"], [["a", "b"]])),
        "test": str(_write(home / "t.csv", ["question", "kind", "concept_id"], CALIB[::-1])),
        "unknown": str(
            _write(home / "k.csv", ["question", "kind", "concept_id"], [["what is xgboost", "in_kb", "xgboost"]])
        ),
        "sft": str(
            _write(home / "s.csv", ["user_question", "rag_retrieved_data", "output_message"], [["q", "", "no"]])
        ),
    }
    result = runner.invoke(app, [a.format(**files) for a in args])
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0]
    assert (home / "index" / "CURRENT").read_text() == current


def test_coverage_counts_the_question_words_an_entry_or_its_known_questions_have(home: Path) -> None:
    from ohlora_rag.retriever import Retriever

    _write(home / "data" / "trust_calib.csv", ["question", "kind", "concept_id"], CALIB)
    known = _write(home / "known.csv", ["question", "kind", "concept_id"], KNOWN)
    assert runner.invoke(app, ["build-index", "-q", "--known-questions", str(known)]).exit_code == 0
    retriever = Retriever.load()
    ids = [retriever.stored.entry(i)["id"] for i in range(retriever.stored.vectors.ntotal)]

    def coverage(question: str, entry: str, skip_own: bool = False) -> float:
        sig = retriever.signals([question], skip_own=skip_own)[0]
        at = np.flatnonzero(sig.positions == ids.index(entry))
        assert len(at) == 1, "the entry is a candidate"
        return float(sig.features()[at[0], FEATURES.index("coverage")])

    # "stop", "net", "memorising" are words of dropout's known question; "training" is in its text
    assert coverage("stop my net memorising", "dropout") == 1.0
    assert coverage("stop my net memorising", "adam") == 0.0
    assert coverage("randomly zeroes units, what else?", "dropout") == pytest.approx(3 / 4)  # "else": nowhere
    # scored as new (skip_own), the known question's own words no longer count: only "training" is left
    assert coverage(KNOWN[0][0], "dropout") == 1.0
    assert coverage(KNOWN[0][0], "dropout", skip_own=True) == pytest.approx(1 / 5)
