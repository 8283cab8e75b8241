"""The plain-PyTorch core against exact Hessians from torch.autograd.functional.hessian."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from lightning_nt.sharpness import (
    HessianOperator,
    adam_preconditioner,
    batch_sharpness,
    hutchinson_trace,
    lanczos,
    preconditioned,
    smoothness_along_gradient,
    stability_threshold,
    warm_start,
)
from lightning_nt.sharpness.hvp import flatten, unflatten


def _problem(seed=0, samples=40):
    """A ~300-parameter tanh MLP, its data, and the exact Hessian of its mean cross-entropy."""
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(6, 20), nn.Tanh(), nn.Linear(20, 20), nn.Tanh(), nn.Linear(20, 3)).double()
    inputs, labels = torch.randn(samples, 6, dtype=torch.float64), torch.randint(3, (samples,))
    names = [n for n, _ in net.named_parameters()]
    params = [p for _, p in net.named_parameters()]

    def loss_of(flat):
        return F.cross_entropy(functional_call(net, dict(zip(names, unflatten(flat, params))), (inputs,)), labels)

    hessian = torch.autograd.functional.hessian(loss_of, flatten([p.detach() for p in params]))
    return net, inputs, labels, params, hessian


def _operator(net, inputs, labels, params, chunk=None, reuse=True):
    def chunks():
        size = chunk or len(inputs)
        for start in range(0, len(inputs), size):
            x, y = inputs[start : start + size], labels[start : start + size]
            yield F.cross_entropy(net(x), y), len(x) / len(inputs)

    return HessianOperator(params, chunks, reuse_graph=reuse)


def test_hvp_equals_the_exact_hessian_times_v():
    net, inputs, labels, params, hessian = _problem()
    v = torch.randn(hessian.shape[0], dtype=torch.float64)
    torch.testing.assert_close(_operator(net, inputs, labels, params).matvec(v), hessian @ v)


@pytest.mark.parametrize(("chunk", "reuse"), [(7, False), (7, True), (None, False)])
def test_chunked_equals_full_batch(chunk, reuse):
    net, inputs, labels, params, hessian = _problem()
    v = torch.randn(hessian.shape[0], dtype=torch.float64)
    full = _operator(net, inputs, labels, params)
    chunked = _operator(net, inputs, labels, params, chunk=chunk, reuse=reuse)
    torch.testing.assert_close(chunked.matvec(v), full.matvec(v))
    torch.testing.assert_close(chunked.gradient(), full.gradient())


def test_top_k_and_lambda_min_equal_eigvalsh_of_the_exact_hessian():
    net, inputs, labels, params, hessian = _problem()
    assert 300 <= hessian.shape[0] <= 700
    exact = torch.linalg.eigvalsh(hessian)
    operator = _operator(net, inputs, labels, params)
    result = lanczos(operator.matvec, torch.randn(hessian.shape[0], dtype=torch.float64), k=3, tol=1e-6, max_iter=200)
    assert result.converged
    torch.testing.assert_close(result.eigenvalues, exact[-3:].flip(0), rtol=1e-5, atol=1e-7)
    assert result.lambda_min == pytest.approx(exact[0].item(), abs=1e-6 * exact[-1].item())
    assert result.num_matvecs == operator.num_matvecs < 200
    y = result.eigenvectors[0]
    assert torch.linalg.norm(hessian @ y - result.eigenvalues[0] * y) < 1e-4 * exact[-1]


def test_indefinite_operator_ends_are_right_and_sharpness_is_algebraic():
    generator = torch.Generator().manual_seed(1)
    basis, _ = torch.linalg.qr(torch.randn(80, 80, dtype=torch.float64, generator=generator))
    spectrum = torch.linspace(-1, 1, 80, dtype=torch.float64) * 0.5
    spectrum[0], spectrum[-1] = -9.0, 4.0  # largest magnitude is negative: power iteration would return -9
    matrix = basis @ torch.diag(spectrum) @ basis.T
    result = lanczos(lambda v: matrix @ v, torch.randn(80, dtype=torch.float64, generator=generator), tol=1e-8)
    assert result.eigenvalues[0].item() == pytest.approx(4.0, abs=1e-6)
    assert result.lambda_min == pytest.approx(-9.0, abs=1e-6)


def test_warm_start_needs_fewer_products():
    net, inputs, labels, params, hessian = _problem()
    operator = _operator(net, inputs, labels, params)
    cold = lanczos(operator.matvec, torch.randn(hessian.shape[0], dtype=torch.float64), tol=1e-4, max_iter=200)
    with torch.no_grad():
        for p in params:
            p.add_(1e-3 * torch.randn_like(p))
    moved = _operator(net, inputs, labels, params)
    warm = lanczos(moved.matvec, warm_start([cold.eigenvectors[0], cold.vector_min]), tol=1e-4, max_iter=200)
    again_cold = lanczos(moved.matvec, torch.randn(hessian.shape[0], dtype=torch.float64), tol=1e-4, max_iter=200)
    assert warm.eigenvalues[0].item() == pytest.approx(again_cold.eigenvalues[0].item(), rel=1e-3)
    assert warm.num_matvecs < again_cold.num_matvecs


def test_preconditioned_sharpness_equals_eigenvalues_of_p_inverse_h_from_a_real_adam_state():
    net, inputs, labels, params, _ = _problem()
    net.float()
    inputs = inputs.float()
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-2, betas=(0.9, 0.99), eps=1e-6)
    for _ in range(5):
        optimizer.zero_grad()
        F.cross_entropy(net(inputs), labels).backward()
        optimizer.step()
    params = list(net.parameters())
    operator = _operator(net, inputs, labels, params)
    hessian = torch.stack([operator.matvec(e) for e in torch.eye(operator.numel)]).double()
    hessian = (hessian + hessian.T) / 2
    # P built independently from the optimizer state, per Cohen et al. (2022)
    pieces = []
    for p in params:
        state = optimizer.state[p]
        t = state["step"].item()
        pieces.append((1 - 0.9**t) * ((state["exp_avg_sq"] / (1 - 0.99**t)).sqrt() + 1e-6))
    diagonal = flatten(pieces).double()
    exact = torch.linalg.eigvals(torch.diag(1 / diagonal) @ hessian).real.max().item()
    from_state = adam_preconditioner(optimizer, params)
    torch.testing.assert_close(from_state.double(), diagonal, rtol=1e-6, atol=0)
    matvec = preconditioned(operator.matvec, from_state)
    result = lanczos(matvec, torch.randn(operator.numel), tol=1e-6, max_iter=300)
    assert result.eigenvalues[0].item() == pytest.approx(exact, rel=1e-3)


def _diverges(optimizer_factory, curvature, steps=3000):
    w = torch.ones(1, dtype=torch.float64, requires_grad=True)
    optimizer = optimizer_factory([w])
    for _ in range(steps):
        optimizer.zero_grad()
        (0.5 * curvature * w**2).sum().backward()
        optimizer.step()
    return not bool(w.abs() < 1e3)


@pytest.mark.parametrize(
    ("factory", "expected"),
    [
        (lambda p: torch.optim.SGD(p, lr=0.1), 20.0),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9), 38.0),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, dampening=0.5), 76.0),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True), 2 * 1.9 / (2.8 * 0.1)),
        (lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.5, nesterov=True), 2 * 1.5 / (2.0 * 0.1)),
    ],
)
def test_sgd_thresholds_are_where_a_quadratic_starts_to_diverge(factory, expected):
    threshold = stability_threshold(factory([torch.zeros(1, requires_grad=True)]))
    assert threshold.value == pytest.approx(expected) and not threshold.preconditioned
    assert not _diverges(factory, 0.99 * threshold.value)
    assert _diverges(factory, 1.01 * threshold.value)


def test_adam_threshold_and_weight_decay():
    w = [torch.zeros(1, requires_grad=True)]
    adam = stability_threshold(torch.optim.AdamW(w, lr=1e-3))
    assert adam.value == pytest.approx(38_000.0) and adam.preconditioned
    assert stability_threshold(torch.optim.Adam(w, lr=0.01, betas=(0.5, 0.999))).value == pytest.approx(600.0)
    assert stability_threshold(torch.optim.SGD(w, lr=0.1, weight_decay=0.5)).value == pytest.approx(19.5)
    assert stability_threshold(torch.optim.RMSprop(w)) is None
    assert adam_preconditioner(torch.optim.Adam(w), w) is None  # no state before the first step


def test_trace_estimators():
    _, _, _, _, hessian = _problem()
    exact = torch.trace(hessian).item()
    matvec = lambda v: (hessian @ v.double()).float()  # noqa: E731
    generator = torch.Generator().manual_seed(0)
    plain = hutchinson_trace(matvec, hessian.shape[0], samples=300, generator=generator)
    plus = hutchinson_trace(matvec, hessian.shape[0], samples=300, generator=generator, method="hutch++")
    assert abs(plain.value - exact) < 4 * plain.standard_error
    assert abs(plus.value - exact) < max(4 * plus.standard_error, 1e-4 * abs(exact))
    assert plus.standard_error < plain.standard_error


def test_batch_sharpness_is_the_mean_rayleigh_quotient_of_each_batch():
    net, inputs, labels, params, _ = _problem()
    expected = []
    for start in (0, 20):
        operator = _operator(net, inputs[start : start + 20], labels[start : start + 20], params)
        g = operator.gradient()
        h = torch.stack([operator.matvec(e) for e in torch.eye(operator.numel, dtype=torch.float64)])
        expected.append((g @ h @ g / (g @ g)).item())
    operators = [_operator(net, inputs[s : s + 20], labels[s : s + 20], params) for s in (0, 20)]
    assert batch_sharpness(operators) == pytest.approx(sum(expected) / 2, rel=1e-6)


def test_smoothness_along_the_gradient_and_exact_restore():
    net, inputs, labels, params, _ = _problem()
    operator = _operator(net, inputs, labels, params, reuse=False)
    before = [p.detach().clone() for p in params]
    result = smoothness_along_gradient(params, lambda: (operator.loss(), operator.gradient()), [0.1, 0.5])
    assert all(torch.equal(a, b) for a, b in zip(before, params))
    g = operator.gradient()
    losses, changes, betas = [operator.loss()], [], []
    for eta in (0.1, 0.5):
        with torch.no_grad():
            for p, start, piece in zip(params, before, unflatten(g, params)):
                p.copy_(start - eta * piece)
        losses.append(operator.loss())
        changes.append((operator.gradient() - g).norm().item())
        betas.append(changes[-1] / (eta * g.norm().item()))
    with torch.no_grad():
        for p, start in zip(params, before):
            p.copy_(start)
    assert result.loss_range == pytest.approx(max(losses) - min(losses))
    assert result.grad_predictiveness == pytest.approx(max(changes))
    assert result.beta == pytest.approx(max(betas))


def test_lanczos_bad_input():
    with pytest.raises(ValueError, match="k"):
        lanczos(lambda v: v, torch.ones(3), k=0)
    with pytest.raises(ValueError, match="method"):
        hutchinson_trace(lambda v: v, 3, samples=3, method="exact")
