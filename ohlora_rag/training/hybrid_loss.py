"""Question-grouped training for the default `hybrid` loss: batches of whole questions, each distinct text encoded once.

Pairs files list every question with many entries (the original: 20 of an 88-entry DB), and the same entries recur
under every question. Trained pair by pair (the seed's recipe), a batch of 16 pairs runs 32 encoder passes. Here a
batch holds whole questions, the loss encodes each distinct question and entry of the batch once, scores all of the
batch's labelled pairs from those embeddings, and adds a ranking term over every entry in the batch, so each
question's right entry is pushed above its look-alikes and above the other questions' entries too.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from sentence_transformers.base.sampler import DefaultBatchSampler
from torch import Tensor, nn

#: Column the sampler groups by (the question column of the graded dataset).
QUESTION_COLUMN = "sentence1"


class QuestionBatchSampler(DefaultBatchSampler):  # type: ignore[misc]
    """Batches of whole questions: questions are shuffled (seed + epoch) and packed until the next one would take
    the batch past `batch_size` pairs; a question with more pairs than that gets a batch of its own."""

    def __init__(
        self,
        dataset: Any,
        batch_size: int,
        drop_last: bool,
        valid_label_columns: list[str] | None = None,
        generator: torch.Generator | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(
            dataset,
            batch_size=batch_size,
            drop_last=drop_last,
            valid_label_columns=valid_label_columns,
            generator=generator,
            seed=seed,
        )
        groups: dict[str, list[int]] = {}
        for i, question in enumerate(dataset[QUESTION_COLUMN]):
            groups.setdefault(question, []).append(i)
        self.groups = list(groups.values())

    def _batches(self) -> list[list[int]]:
        order = list(range(len(self.groups)))
        random.Random(self.seed + self.epoch).shuffle(order)
        batches: list[list[int]] = []
        batch: list[int] = []
        for rows in (self.groups[g] for g in order):
            if batch and len(batch) + len(rows) > self.batch_size:
                batches.append(batch)
                batch = []
            batch = batch + rows
        if batch:
            batches.append(batch)
        return batches

    def __iter__(self) -> Iterator[list[int]]:
        yield from self._batches()

    def __len__(self) -> int:
        return len(self._batches())


class GroupedHybridLoss(nn.Module):
    """CosineSimilarityLoss on every labelled pair of the batch + a softmax ranking term.

    Distinct texts in a column are found by their token ids and encoded once. Ranking: for each pair labelled
    >= `positive` (the question's right entry), a cross-entropy over the question's cosines (times `scale`) to all
    distinct entries of the batch, the question's other right entries left out.
    """

    def __init__(self, model: Any, ranking_weight: float = 0.2, scale: float = 20.0, positive: float = 1.0) -> None:
        super().__init__()
        self.model = model
        self.ranking_weight = ranking_weight
        self.scale = scale
        self.positive = positive

    def _embed_unique(self, features: dict[str, Any]) -> tuple[Tensor, Tensor]:
        ids = features["input_ids"]
        unique, inverse = torch.unique(ids, dim=0, return_inverse=True)
        first = torch.full((unique.shape[0],), ids.shape[0], dtype=torch.long, device=ids.device)
        first = first.scatter_reduce(0, inverse, torch.arange(ids.shape[0], device=ids.device), reduce="amin")
        subset = {
            k: v[first] if isinstance(v, Tensor) and v.dim() > 0 and v.shape[0] == ids.shape[0] else v
            for k, v in features.items()
        }
        return F.normalize(self.model(subset)["sentence_embedding"], dim=-1), inverse

    def forward(self, sentence_features: Iterable[dict[str, Tensor]], labels: Tensor) -> Tensor:
        question_features, entry_features = list(sentence_features)
        questions, q_of = self._embed_unique(question_features)
        entries, e_of = self._embed_unique(entry_features)
        sims = questions @ entries.T
        labels = labels.float().view(-1)
        loss = F.mse_loss(sims[q_of, e_of], labels)
        if not self.ranking_weight:
            return loss
        positive = labels >= self.positive
        if not positive.any():
            return loss
        # right[q, e]: entry e is a right entry of question q (never counted as a negative of q)
        right = torch.zeros_like(sims, dtype=torch.bool)
        right[q_of[positive], e_of[positive]] = True
        rows = q_of[positive]
        logits = (sims[rows] * self.scale).masked_fill(right[rows], float("-inf"))
        targets = e_of[positive]
        logits[torch.arange(len(rows), device=logits.device), targets] = sims[rows, targets] * self.scale
        return loss + self.ranking_weight * F.cross_entropy(logits, targets)
