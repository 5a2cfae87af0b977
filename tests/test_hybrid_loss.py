"""The question-grouped loss and sampler: same pair loss as CosineSimilarityLoss, each distinct text encoded once,
ranking term as computed by hand, batches made of whole questions."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import CONCEPTS

QUESTIONS = ["what is precision ?", "what is recall ?", "what is dropout ?"]


@pytest.fixture
def model(tiny_sbert: Path):  # noqa: ANN201
    from sentence_transformers import SentenceTransformer

    torch.manual_seed(0)
    return SentenceTransformer(str(tiny_sbert), device="cpu")


def _batch(model, questions: list[str], entries: list[str]):  # noqa: ANN001, ANN202
    return [model.preprocess(questions), model.preprocess(entries)]


def _pairs() -> tuple[list[str], list[str], torch.Tensor]:
    questions, entries, labels = [], [], []
    for qi, q in enumerate(QUESTIONS):
        for ei, (_, _, text) in enumerate(CONCEPTS[:4]):
            questions.append(q)
            entries.append(text)
            labels.append(1.0 if ei == qi + 1 else 0.25 if ei == qi else 0.0)
    return questions, entries, torch.tensor(labels)


def test_pair_term_equals_cosine_similarity_loss_with_fewer_encodes(model) -> None:  # noqa: ANN001
    from sentence_transformers.sentence_transformer.losses import CosineSimilarityLoss

    from ohlora_rag.training.hybrid_loss import GroupedHybridLoss

    questions, entries, labels = _pairs()
    model.eval()  # no dropout: both losses must see the same embeddings
    reference = CosineSimilarityLoss(model)(_batch(model, questions, entries), labels)
    params = [p for p in model.parameters() if p.requires_grad]
    ref_grads = torch.autograd.grad(reference, params, allow_unused=True)

    seen: list[int] = []
    hook = model[0].register_forward_hook(lambda _m, args, _o: seen.append(args[0]["input_ids"].shape[0]))
    ours = GroupedHybridLoss(model, ranking_weight=0.0)(_batch(model, questions, entries), labels)
    hook.remove()
    our_grads = torch.autograd.grad(ours, params, allow_unused=True)

    assert ours.item() == pytest.approx(reference.item(), rel=1e-5)
    assert [g is None for g in our_grads] == [g is None for g in ref_grads]
    for a, b in zip(our_grads, ref_grads):
        assert a is None or torch.allclose(a, b, atol=1e-6)
    assert seen == [len(QUESTIONS), 4]  # 3 distinct questions + 4 distinct entries instead of 12 + 12


def test_ranking_term_matches_hand_computed_cross_entropy(model) -> None:  # noqa: ANN001
    from ohlora_rag.training.hybrid_loss import GroupedHybridLoss

    questions, entries, labels = _pairs()
    model.eval()
    loss = GroupedHybridLoss(model, ranking_weight=1.0, scale=20.0)
    with torch.no_grad():
        total = loss(_batch(model, questions, entries), labels).item()
        pair_only = GroupedHybridLoss(model, ranking_weight=0.0)(_batch(model, questions, entries), labels).item()
        q = F.normalize(model.encode(QUESTIONS, convert_to_tensor=True), dim=-1)
        e = F.normalize(model.encode([t for _, _, t in CONCEPTS[:4]], convert_to_tensor=True), dim=-1)
        sims = q @ e.T * 20.0
    # each question's one right entry (index qi + 1) against all 4 distinct entries of the batch
    expected = sum(-F.log_softmax(sims[qi], dim=0)[qi + 1].item() for qi in range(3)) / 3
    assert total - pair_only == pytest.approx(expected, rel=1e-4)


def test_other_right_entries_of_a_question_are_not_its_negatives(model) -> None:  # noqa: ANN001
    from ohlora_rag.training.hybrid_loss import GroupedHybridLoss

    model.eval()
    texts = [t for _, _, t in CONCEPTS[:3]]
    batch = _batch(model, ["q"] * 3, texts)
    loss = GroupedHybridLoss(model, ranking_weight=1.0)
    with torch.no_grad():
        two_right = loss(batch, torch.tensor([1.0, 1.0, 0.0])).item()
        pair_only = GroupedHybridLoss(model, ranking_weight=0.0)(batch, torch.tensor([1.0, 1.0, 0.0])).item()
        q = F.normalize(model.encode(["q"], convert_to_tensor=True), dim=-1)
        e = F.normalize(model.encode(texts, convert_to_tensor=True), dim=-1)
        s = (q @ e.T)[0] * 20.0
    # right entry 0 competes with entry 2 only, right entry 1 likewise
    expected = (-F.log_softmax(s[[0, 2]], 0)[0] - F.log_softmax(s[[1, 2]], 0)[0]).item() / 2
    assert two_right - pair_only == pytest.approx(expected, rel=1e-4)


def test_sampler_batches_whole_questions_reshuffled_per_epoch() -> None:
    from datasets import Dataset

    from ohlora_rag.training.hybrid_loss import QuestionBatchSampler

    questions = [f"q{i}" for i in range(10) for _ in range(4)]
    data = Dataset.from_dict({"sentence1": questions, "sentence2": ["e"] * 40, "score": [0.0] * 40})
    sampler = QuestionBatchSampler(data, batch_size=9, drop_last=False, seed=3)
    first = list(sampler)
    assert len(first) == len(sampler) == math.ceil(10 / 2)  # 2 questions (8 pairs) fit under 9
    assert sorted(i for b in first for i in b) == list(range(40))
    for batch in first:
        assert len({questions[i] for i in batch}) * 4 == len(batch)
    assert list(QuestionBatchSampler(data, batch_size=9, drop_last=False, seed=3)) == first  # seeded
    sampler.set_epoch(1)
    assert list(sampler) != first
    big = QuestionBatchSampler(data, batch_size=2, drop_last=False, seed=3)  # a question never splits
    assert all(len(b) == 4 for b in big)
