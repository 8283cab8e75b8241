import warnings

import pytest
from opacus.accountants.utils import get_noise_multiplier

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
    """Asked again of an unchanged ledger, epsilon is not recomputed (the PRV accountant takes about half a second a
    query); a ledger that took a step, changed its rate or is asked at another delta gets its own, exact figure."""
    ledgers = [[(1.1, 0.01, 5)], [(1.1, 0.01, 6)], [(1.1, 0.02, 6)], [(1.1, 0.01, 5), (0.9, 0.01, 1)]]
    expected = []
    for history in ledgers:
        reference = make_accountant(name)
        reference.history = [*history]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected.append([reference.get_epsilon(delta=delta) for delta in (1e-5, 1e-6)])
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
    assert len(queries) <= 2 * len(ledgers)  # the second pass asked the accountant nothing
