"""Linear probes on frozen image features, labelled by the `shapes` metadata (UPGen §4.2).

A model's frozen features of an image (for UPGen: the mean over image positions of an
image-only pass, `UPGenTask.image_features`) are the input of one linear softmax
classifier per attribute. The labels come from the scene, so no annotation is needed:

* `shape`, `color`, `cell` (position, one of 9): of the scene's *main object* -- the
  largest one (large before small), ties broken by reading order (lowest cell), which
  is well defined for every scene and visible in the image;
* `count`: how many objects (1-3).

Probes train on images of the `image_only` split and are scored on the `eval` split
(disjoint scenes). Features are standardised with the training set's statistics, and
the L2 strength is chosen on a held-out fifth of the training set before refitting on
all of it. `chance` is the accuracy of always predicting the training set's most
frequent class. Multinomial logistic regression by L-BFGS (scipy): deterministic.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
from scipy import optimize

from mmt.data import shapes

ATTRIBUTES = ("shape", "color", "cell", "count")
NUM_CLASSES = {"shape": len(shapes.SHAPES), "color": len(shapes.COLORS), "cell": len(shapes.POSITIONS),
               "count": shapes.MAX_OBJECTS}
L2_GRID = (1e-4, 1e-3, 1e-2, 1e-1)


def main_object(objects: Sequence[shapes.ShapeObject]) -> shapes.ShapeObject:
    """The scene's largest object; among equals, the first in reading order."""
    return min(objects, key=lambda o: (o.size != "large", o.cell))


def labels(scenes: Sequence[Sequence[shapes.ShapeObject]]) -> dict[str, np.ndarray]:
    """attribute -> int64 [N] class ids (see the module docstring)."""
    colours = list(shapes.COLORS)
    mains = [main_object(objects) for objects in scenes]
    return {
        "shape": np.array([shapes.SHAPES.index(o.shape) for o in mains]),
        "color": np.array([colours.index(o.color) for o in mains]),
        "cell": np.array([o.cell for o in mains]),
        "count": np.array([len(objects) - 1 for objects in scenes]),
    }


def fit_softmax(x: np.ndarray, y: np.ndarray, num_classes: int, l2: float, max_iter: int = 500):
    """Multinomial logistic regression: float [N, D], int [N] -> (W [D, C], b [C]).

    Minimises mean cross-entropy + `l2` * |W|^2 / 2 with L-BFGS from zeros.
    """
    n, d = x.shape
    onehot = np.eye(num_classes)[y]

    def loss_and_grad(params):
        w, b = params[:d * num_classes].reshape(d, num_classes), params[d * num_classes:]
        logits = x @ w + b
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        p /= p.sum(axis=1, keepdims=True)
        loss = -np.mean(np.log(p[np.arange(n), y] + 1e-12)) + 0.5 * l2 * np.sum(w * w)
        g = (p - onehot) / n
        return loss, np.concatenate([(x.T @ g + l2 * w).ravel(), g.sum(axis=0)])

    result = optimize.minimize(loss_and_grad, np.zeros(d * num_classes + num_classes), jac=True,
                               method="L-BFGS-B", options={"maxiter": max_iter})
    params = result.x
    return params[:d * num_classes].reshape(d, num_classes), params[d * num_classes:]


def _accuracy(w, b, x, y) -> float:
    return float(np.mean(np.argmax(x @ w + b, axis=1) == y))


def probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, num_classes: int,
          l2_grid: Sequence[float] = L2_GRID) -> dict[str, float]:
    """One attribute's probe: standardise, choose L2 on a held-out fifth, refit, score.

    Returns:
      {"accuracy", "train_accuracy", "chance", "l2"}.
    """
    mean, std = train_x.mean(axis=0), train_x.std(axis=0) + 1e-6
    train_x, test_x = (train_x - mean) / std, (test_x - mean) / std
    split = max(1, len(train_x) // 5)
    best = None
    for l2 in l2_grid:
        w, b = fit_softmax(train_x[split:], train_y[split:], num_classes, l2)
        score = _accuracy(w, b, train_x[:split], train_y[:split])
        if best is None or score > best[0]:
            best = (score, l2)
    w, b = fit_softmax(train_x, train_y, num_classes, best[1])
    majority = np.bincount(train_y, minlength=num_classes).argmax()
    return {"accuracy": _accuracy(w, b, test_x, test_y), "train_accuracy": _accuracy(w, b, train_x, train_y),
            "chance": float(np.mean(test_y == majority)), "l2": float(best[1])}


def linear_probe(features: Callable[[np.ndarray], np.ndarray], resolution: int, *, train_examples: int = 1000,
                 test_examples: int = 500, seed: int = 0) -> dict[str, dict[str, float]]:
    """Probes `features(uint8 [N, R, R, 3]) -> float [N, D]` on shapes at `resolution`.

    Args:
      features: the frozen feature extractor (e.g. `UPGenTask.image_features`).
      resolution: the image side the model's tokenizer takes (32, 64 or 128).
      train_examples, test_examples: images from the image_only / eval splits.
      seed: of the shapes data (scenes of a split do not depend on it, images do).

    Returns:
      attribute -> `probe`'s dict, plus "mean" (the mean accuracy over attributes) and
      "num_train" / "num_test".
    """
    config = shapes.ShapesConfig(resolution=resolution, seed=seed)
    train = list(shapes.generate(config, "image_only", train_examples))
    test = list(shapes.generate(config, "eval", test_examples))
    train_x = np.asarray(features(np.stack([e.image for e in train])), np.float64)
    test_x = np.asarray(features(np.stack([e.image for e in test])), np.float64)
    train_y, test_y = labels([e.objects for e in train]), labels([e.objects for e in test])
    results = {a: probe(train_x, train_y[a], test_x, test_y[a], NUM_CLASSES[a]) for a in ATTRIBUTES}
    results["mean"] = {"accuracy": float(np.mean([results[a]["accuracy"] for a in ATTRIBUTES])),
                       "chance": float(np.mean([results[a]["chance"] for a in ATTRIBUTES]))}
    results["num_train"], results["num_test"] = len(train), len(test)
    return results


__all__ = ["ATTRIBUTES", "NUM_CLASSES", "fit_softmax", "labels", "linear_probe", "main_object", "probe"]
