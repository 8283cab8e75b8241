"""SharpnessMonitor and its core on a GPU (issue 10 item 1): no tensor may be left on the CPU."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from lightning_nt import SharpnessMonitor
from lightning_nt.sharpness import HessianOperator, adam_preconditioner, hutchinson_trace, lanczos, warm_start
from lightning_nt.sharpness.hvp import flatten, unflatten
from tests.helpers import TinyClassifier, tiny_trainer
from tests.sharpness.models import exact_hessian, probe_examples


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_core_on_a_cuda_operator_matches_eigvalsh_of_the_exact_hessian(dtype):
    torch.manual_seed(0)
    device = torch.device("cuda")
    net = nn.Sequential(nn.Linear(6, 20), nn.Tanh(), nn.Linear(20, 3)).to(device, dtype)
    inputs, labels = torch.randn(40, 6, device=device, dtype=dtype), torch.randint(3, (40,), device=device)
    names, params = zip(*net.named_parameters())

    def loss_of(flat):
        return F.cross_entropy(functional_call(net, dict(zip(names, unflatten(flat, params))), (inputs,)), labels)

    hessian = torch.autograd.functional.hessian(loss_of, flatten([p.detach() for p in params])).double()
    exact = torch.linalg.eigvalsh(hessian)
    operator = HessianOperator(list(params), lambda: [(F.cross_entropy(net(inputs), labels), 1.0)])
    start = torch.randn(operator.numel, device=device, dtype=dtype)
    result = lanczos(operator.matvec, start, k=2, tol=1e-6, max_iter=operator.numel)
    rel = 1e-4 if dtype == torch.float32 else 1e-9
    assert result.eigenvectors.device.type == "cuda" and result.vector_min.device.type == "cuda"
    assert result.eigenvalues.tolist() == pytest.approx(exact[-2:].flip(0).tolist(), rel=rel)
    assert result.lambda_min == pytest.approx(exact[0].item(), abs=rel * exact[-1].item())
    again = lanczos(operator.matvec, warm_start([*result.eigenvectors, result.vector_min]), tol=1e-6, max_iter=200)
    assert again.eigenvalues[0].item() == pytest.approx(exact[-1].item(), rel=rel)
    trace = hutchinson_trace(operator.matvec, operator.numel, 30, device, method="hutch++", dtype=dtype)
    assert abs(trace.value - exact.sum().item()) <= 5 * trace.standard_error + 1e-4 * abs(exact.sum().item())
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    F.cross_entropy(net(inputs), labels).backward()
    optimizer.step()
    diagonal = adam_preconditioner(optimizer, list(net.parameters()))
    assert diagonal.device.type == "cuda" and diagonal.dtype == dtype


class WithAdam(TinyClassifier):
    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("module", [TinyClassifier, WithAdam])
def test_the_monitor_in_a_gpu_fit(precision, module):
    model = module(num_samples=96, shuffle=False)
    monitor = SharpnessMonitor(
        every_n_steps=2, num_examples=40, num_eigenvalues=2, tol=1e-5, max_iter=100, trace=True,
        batch_sharpness=True, smoothness=True, spherical=True,
    )  # fmt: skip
    tiny_trainer(None, accelerator="gpu", precision=precision, max_epochs=2, callbacks=[monitor]).fit(model)
    assert [entry["step"] for entry in monitor.history] == list(range(0, 13, 2))
    for entry in monitor.history:
        assert all(math.isfinite(value) for value in entry.values())
    assert all("sharpness/ratio" in entry for entry in monitor.history[1:])
    assert all(tensor.device.type == "cuda" for tensor in monitor._warm.values())
    model.cpu()  # the last measurement (step 12) saw the final weights; measured in fp32 under both precisions
    names = [name for name, _ in model.named_parameters()]
    exact = torch.linalg.eigvalsh(exact_hessian(model, names, *probe_examples(model, 40)))
    assert monitor.history[-1]["sharpness/lambda_max"] == pytest.approx(exact[-1].item(), rel=1e-3)


@pytest.mark.cuda
def test_a_25m_parameter_solve_at_the_default_max_iter_holds_about_max_iter_vectors():
    dim, max_iter = 25_000_000, SharpnessMonitor().max_iter
    generator = torch.Generator(device="cuda").manual_seed(0)
    diagonal = torch.rand(dim, device="cuda", generator=generator)  # a cluster at the bottom: lambda_min is slow
    start = torch.randn(dim, device="cuda", generator=generator)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = lanczos(lambda v: diagonal * v, start, k=1, tol=1e-9, max_iter=max_iter)
    torch.cuda.synchronize()
    vectors = (torch.cuda.max_memory_allocated() - before) / (4 * dim)
    assert result.num_matvecs == max_iter  # ran to the end: the largest basis the default allows
    assert vectors <= max_iter + 10, f"peak {vectors:.1f} vectors of the operator's size"
