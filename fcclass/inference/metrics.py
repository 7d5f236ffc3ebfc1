"""The loss and accuracy of a model over a split, computed in one place: validation, `fcclass eval` (and the test
pass at the end of training), bench's time-to-accuracy and compress's table all call ``score``, so the same model on
the same images shows the same numbers wherever they appear. The calibration (``calibration_bins``,
``expected_calibration_error``) and precision-recall figures (``precision_recall_curve``, ``average_precision``) that
`fcclass eval --json` and `fcclass report` show are computed here too, once."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Score:
    """Sums over a split (or a part of it: scores of parts add up, e.g. the shards of DDP ranks)."""

    loss_sum: float = 0.0  # cross-entropy summed over the images
    correct: int = 0  # images whose prediction (``predicted``) is their label
    images: int = 0

    def __add__(self, other: Score) -> Score:
        return Score(self.loss_sum + other.loss_sum, self.correct + other.correct, self.images + other.images)

    @property
    def loss(self) -> float:
        """The mean loss per image (nan without images)."""
        return self.loss_sum / self.images if self.images else float("nan")

    @property
    def accuracy(self) -> float:
        """The fraction of images predicted right, 0..1 (nan without images)."""
        return self.correct / self.images if self.images else float("nan")

    def to_tensor(self, device: torch.device | str = "cpu") -> torch.Tensor:
        """[loss_sum, correct, images] as float32 (MPS has no float64; counts are exact to 16 million), for a sum over
        processes (distributed.all_sum)."""
        return torch.tensor([self.loss_sum, float(self.correct), float(self.images)], device=device)

    @classmethod
    def from_tensor(cls, sums: torch.Tensor) -> Score:
        loss_sum, correct, images = sums.tolist()
        return cls(loss_sum, round(correct), round(images))


def rounded(x: float | torch.Tensor) -> float:
    """A metric as a Python float without float32 noise (0.9239, not 0.9239000082015991), as reports give it."""
    return round(float(x), 6)


def predicted(logits: torch.Tensor) -> torch.Tensor:
    """The predicted label of each row: torch.argmax, so of tied highest logits the first (lowest label) wins."""
    return logits.argmax(1)


def ranked(logits: torch.Tensor, k: int) -> torch.Tensor:
    """The ``k`` highest labels of each row, best first, with ``predicted``'s rule for ties (the lower label first), so
    that the first of them is the prediction that eval, predict and compress count. torch.topk has no such rule."""
    return logits.argsort(dim=1, descending=True, stable=True)[:, :k]


def count_correct(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """How many rows are predicted right, as a 0-d tensor on the logits' device (no wait for a GPU)."""
    return (predicted(logits) == labels).sum()


def score(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float = 0.0) -> Score:
    """The loss sum, correct count and image count of ``logits`` (N x classes; log-probabilities work too) against
    ``labels``. The loss is cross-entropy, summed in float32 (Apple's MPS has no float64), with ``label_smoothing``
    and without class weights: Keras's val_loss uses the training loss function that way; `fcclass eval` reports
    plain cross-entropy (0.0)."""
    if not labels.numel():
        return Score()
    loss = torch.nn.functional.cross_entropy(logits.float(), labels, reduction="sum", label_smoothing=label_smoothing)
    return Score(float(loss), int(count_correct(logits, labels)), int(labels.numel()))


@dataclass(frozen=True)
class CalibrationBin:
    """One bin of a reliability diagram: the images whose confidence (highest probability) lies in (low, high]."""

    low: float
    high: float
    images: int
    confidence: float  # mean confidence of its images (0 when empty)
    accuracy: float  # fraction of its images predicted right (0 when empty)


def calibration_bins(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> list[CalibrationBin]:
    """The images grouped by confidence into ``bins`` equal-width bins over [0, 1] (the first also holds 0), each with
    its mean confidence and accuracy: the reliability diagram, and the expected calibration error's parts."""
    confidence, guess = probs.float().max(1)
    correct = (guess == labels).float()
    edges = torch.linspace(0, 1, bins + 1)
    which = torch.bucketize(confidence.cpu(), edges[1:-1])
    out = []
    for b in range(bins):
        mask = which == b
        n = int(mask.sum())
        out.append(CalibrationBin(float(edges[b]), float(edges[b + 1]), n, float(confidence.cpu()[mask].mean()) if n else 0.0,
                                  float(correct.cpu()[mask].mean()) if n else 0.0))
    return out


def expected_calibration_error(probs: torch.Tensor, labels: torch.Tensor, bins: int = 15) -> float:
    """ECE: the gap between confidence and accuracy averaged over ``calibration_bins``, weighted by their images
    (0: a model's confidence is its accuracy; 0.1: ten points off on average)."""
    parts = calibration_bins(probs, labels, bins)
    total = sum(b.images for b in parts)
    return sum(b.images * abs(b.accuracy - b.confidence) for b in parts) / total if total else float("nan")


def precision_recall_curve(scores: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One label's one-vs-rest precision and recall at each distinct score taken as the threshold, highest score
    first (``target``: 1 where the image has the label). Tied scores are one threshold, as in scikit-learn."""
    order = torch.argsort(scores.float(), descending=True, stable=True)
    s, t = scores.float()[order], target[order].double()
    tp, seen = t.cumsum(0), torch.arange(1, len(t) + 1, dtype=torch.float64)
    last = torch.ones(len(s), dtype=torch.bool)
    last[:-1] = s[1:] != s[:-1]  # the last image of each run of equal scores
    tp, seen = tp[last], seen[last]
    positives = t.sum().clamp_min(1)
    return tp / seen, tp / positives


def average_precision(scores: torch.Tensor, target: torch.Tensor) -> float:
    """The area under a label's precision-recall steps, sum over thresholds of (recall gained) x precision: scikit-learn's
    average_precision_score and torchmetrics' average precision without thresholds."""
    precision, recall = precision_recall_curve(scores, target)
    gained = torch.diff(recall, prepend=torch.zeros(1, dtype=recall.dtype))
    return float((gained * precision).sum())
