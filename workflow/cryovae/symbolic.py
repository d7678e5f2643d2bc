"""Symbolic regression of a score from a few latent dimensions: short closed-form expressions.

The engine is Operon (``pyoperon``, a C++ genetic-programming library with Python wheels):
a multi-objective search (fit, expression length) whose result is a Pareto front of
expressions, each with its constants tuned by Levenberg–Marquardt.  On the same latents
it was ~50× faster than ``gplearn`` at equal or better accuracy (benchmarks/RESULTS.md);
PySR would need a Julia download at run time.  One thread and a seed make it reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

OPERATORS = "add,sub,mul,div,constant,variable,tanh"


@dataclass
class Expression:
    """One member of a Pareto front: ``text`` over ``names``, its node count, training MSE and MDL."""

    text: str
    length: int
    train_mse: float
    description_length: float
    tree: object  # the engine's tree, to evaluate on new data

    def evaluate(self, regressor, x: np.ndarray) -> np.ndarray:
        """Values (n,) of the expression on x (n, d) (the features it was fitted on, same order)."""
        return np.asarray(regressor.evaluate_model(self.tree, np.asarray(x, dtype=np.float64)), dtype=np.float64)


@dataclass
class SymbolicFit:
    """The fitted engine and its Pareto front (shortest first); ``chosen``: minimum description length."""

    regressor: object
    front: list[Expression]

    @property
    def chosen(self) -> Expression:
        return min(self.front, key=lambda e: (e.description_length, e.length))


def fit_symbolic(x: np.ndarray, y: np.ndarray, names: list[str], seed: int, generations: int,
                 population: int, max_length: int) -> SymbolicFit:
    """Pareto front of expressions y ≈ f(x) over x (n, d) with column names ``names`` (d,)."""
    from pyoperon.sklearn import SymbolicRegressor

    regressor = SymbolicRegressor(
        allowed_symbols=OPERATORS, objectives=["r2", "length"], generations=generations,
        population_size=population, max_length=max_length, max_evaluations=generations * population * 4,
        random_state=seed, n_threads=1,
    )
    regressor.fit(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64))
    front = [
        Expression(regressor.get_model_string(p["tree"], 3, names), int(p["length"]),
                   float(p["mean_squared_error"]), float(p["minimum_description_length"]), p["tree"])
        for p in regressor.pareto_front_
    ]
    front.sort(key=lambda e: (e.length, e.train_mse))
    return SymbolicFit(regressor, front)
