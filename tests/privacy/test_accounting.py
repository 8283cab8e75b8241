import warnings

import numpy
import pytest
import torch
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from lightning_nt.privacy import accounting
from lightning_nt.privacy.accounting import calibrate_noise, epsilon_of, make_accountant


def test_calibration_and_prv_epsilon_do_not_repeat_opacus_alpha_warning():
    """The bisection's trial noise levels make Opacus warn "largest alpha"; it does not touch the reported epsilon."""
    with warnings.catch_warnings(record=True) as raw:
        warnings.simplefilter("always")
        expected = get_noise_multiplier(target_epsilon=8.0, target_delta=1e-5, sample_rate=0.01, steps=1000)
    assert any("largest alpha" in str(w.message) for w in raw)  # what a user saw on every DP run
    with warnings.catch_warnings(record=True) as ours:
        warnings.simplefilter("always")
        sigma = calibrate_noise(8.0, 1e-5, sample_rate=0.01, steps=1000, accountant="rdp")
        accountant = make_accountant("prv")
        accountant.step(noise_multiplier=sigma, sample_rate=0.01)
        epsilon_of(accountant, 1e-5)
    assert sigma == expected and not any("alpha" in str(w.message) for w in ours)


@pytest.mark.parametrize("name", ["prv", "rdp", "gdp"])
def test_epsilon_of_a_ledger_is_the_accountants_own_and_is_computed_once(name, monkeypatch):
    """Asked again of an unchanged ledger, epsilon is not recomputed (the PRV accountant takes 0.1 to 0.6 s a query
    on a 2-core CPU); a ledger that took a step, changed its rate or is asked at another delta gets its own, exact
    figure."""
    monkeypatch.setattr(accounting, "_EPSILONS", {}, raising=False)
    ledgers = [[(1.1, 0.01, 5)], [(1.1, 0.01, 6)], [(1.1, 0.02, 6)], [(1.1, 0.01, 5), (0.9, 0.01, 1)]]
    expected = [[_own_epsilon(name, history, delta) for delta in (1e-5, 1e-6)] for history in ledgers]
    kind = type(make_accountant(name))
    original, queries = kind.get_epsilon, []
    monkeypatch.setattr(kind, "get_epsilon", lambda self, *a, **k: queries.append(1) or original(self, *a, **k))
    for _ in range(2):
        for history, figures in zip(ledgers, expected):
            accountant = make_accountant(name)
            for step in history:
                accountant.history.append(step)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                assert [epsilon_of(accountant, delta) for delta in (1e-5, 1e-6)] == figures
    assert len(queries) == 2 * len(ledgers)  # each (ledger, delta) once: the second pass asked the accountant nothing


@pytest.mark.filterwarnings("ignore")
def test_epsilon_is_never_a_stale_figure_of_a_ledger_that_changed_in_place(monkeypatch):
    """Found by review: a tensor in the ledger (a tensor ``noise_multiplier``) changed in place keeps its hash, and
    RDP's orders are a class attribute a user may change; the figure follows both, and arrays are accepted."""
    monkeypatch.setattr(accounting, "_EPSILONS", {}, raising=False)
    noise = torch.tensor(4.0)
    accountant = make_accountant("rdp")
    accountant.history = [(noise, 0.01, 100)]
    first = epsilon_of(accountant, 1e-5)
    noise.fill_(0.75)
    assert epsilon_of(accountant, 1e-5) == _own_epsilon("rdp", [(noise, 0.01, 100)], 1e-5) > first
    accountant.history = [(1.1, 0.01, 100)]
    assert epsilon_of(accountant, numpy.array(1e-5)) == _own_epsilon("rdp", [(1.1, 0.01, 100)], 1e-5)
    before = epsilon_of(accountant, 1e-5)
    monkeypatch.setattr(RDPAccountant, "DEFAULT_ALPHAS", [2, 4, 8])
    coarse = epsilon_of(accountant, 1e-5)
    assert coarse == _own_epsilon("rdp", [(1.1, 0.01, 100)], 1e-5) and coarse != before
    own_orders = make_accountant("rdp")
    own_orders.history, own_orders.DEFAULT_ALPHAS = [(1.1, 0.01, 100)], [3, 5]
    assert epsilon_of(own_orders, 1e-5) == float(own_orders.get_epsilon(delta=1e-5))


def _own_epsilon(name: str, history: list, delta: float) -> float:
    reference = make_accountant(name)
    reference.history = [*history]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(reference.get_epsilon(delta=delta))
