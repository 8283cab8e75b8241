import warnings

import pytest
import torch

from lightning_nt import DPStrategy
from lightning_nt.privacy.agreement import LaterRefusals
from tests.privacy.canary import Audited, assert_only_the_noisy_update_differs, first_batch_indices, releases_of
from tests.privacy.test_canary import C, Poisoned, _strategy
from tests.privacy.test_strategy import RecordUpdate, _clipped_sum, _fit


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_noiseless_update_on_the_gpu(precision):
    record = RecordUpdate()
    strategy = DPStrategy(noise_multiplier=0.0, max_grad_norm=0.5)
    module, _ = _fit(strategy, callbacks=[record], max_steps=1, accelerator="gpu", precision=precision)
    assert strategy.root_device.type == "cuda"
    before = {n: t.cpu() for n, t in record.before.items()}
    expected = _clipped_sum(module.cpu(), before, [t.cpu() for t in record.batch], 0.5)
    tolerance = {"rtol": 1e-4, "atol": 1e-5} if precision == "32-true" else {"rtol": 0.1, "atol": 2e-3}
    for name, update in record.update.items():
        torch.testing.assert_close(update.cpu(), -expected[name] / 16.0, **tolerance)


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("poisoned", [False, True], ids=["canary", "nan-record"])
def test_only_the_noisy_update_depends_on_a_canary_on_the_gpu(tmp_path, precision, poisoned):
    """The canary harness on CUDA: nothing un-noised left on the module or strategy, NaN records zeroed on device."""
    make = _strategy()
    module = Poisoned if poisoned else Audited
    batch = first_batch_indices(make)
    gpu = {"accelerator": "gpu", "precision": precision, "max_steps": 1}
    without = releases_of(make, None, tmp_path, module=module, **gpu)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the end-of-run count of non-finite gradients, for the NaN record
        canary = releases_of(make, batch[0], tmp_path, module=module, **gpu)
    assert all(torch.isfinite(w).all() for w in canary.weights.values())
    assert_only_the_noisy_update_differs(without, canary, C, expected_batch=16.0)


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_unused_parameters_and_the_sensitivity_probe_on_the_gpu(precision, mode):
    from tests.privacy.test_fail_closed import WithUnused
    from tests.privacy.test_strategy import PerExample

    class GhostWithUnused(PerExample):
        def __init__(self):
            super().__init__(num_samples=64, batch_size=16)
            self.unused = torch.nn.Linear(8, 3)

    if mode == "ghost" and precision != "32-true":
        pytest.skip("ghost clipping is refused under bf16 (tested on the CPU)")
    record = RecordUpdate()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        strategy = DPStrategy(noise_multiplier=0.0, grad_sample_mode=mode, sensitivity_probe=mode == "hooks")
    _fit(
        strategy,
        module=WithUnused if mode == "hooks" else GhostWithUnused,
        callbacks=[record],
        max_steps=2,
        accelerator="gpu",
        precision=precision,
    )
    assert record.update["unused.weight"].abs().max() == 0 and record.update["net.0.weight"].abs().max() > 0


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize(("mode", "tokens"), [("hooks", 5), ("hooks", 8), ("ghost", 8), ("bk", 8)])
def test_the_example_independence_check_on_the_gpu(precision, mode, tokens):
    """As users run (no deterministic algorithms): the batch-first model trains, the sequence-first one is refused
    before its first step; the run-to-run differences of the GPU's kernels are not taken for mixing."""
    import pytorch_lightning as pl

    from tests.privacy.test_audit import SequenceFirstAttention
    from tests.privacy.test_independence import MIXES, BatchFirstAttention

    if mode == "ghost" and precision != "32-true":
        pytest.skip("ghost clipping is refused under bf16 (tested on the CPU)")
    for module in (BatchFirstAttention(mode == "ghost", tokens), SequenceFirstAttention(mode == "ghost", tokens)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            strategy = DPStrategy(noise_multiplier=1.0, poisson_sampling=False, grad_sample_mode=mode)
        quiet = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False}
        trainer = pl.Trainer(
            accelerator="gpu", precision=precision, strategy=strategy, max_steps=2, limit_val_batches=0, **quiet
        )
        if isinstance(module, BatchFirstAttention):
            trainer.fit(module)
            assert trainer.global_step == 2
        else:
            before = [p.detach().clone() for p in module.parameters()]
            with pytest.raises(RuntimeError, match=MIXES):
                trainer.fit(module)
            assert all(torch.equal(b, p.detach().cpu()) for b, p in zip(before, module.parameters()))


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_refusal_flag_carried_by_a_cuda_all_reduce_reaches_the_host_one_step_late(monkeypatch, dtype):
    """Under DDP on CUDA the flags' sum is copied to pinned host memory without waiting and read at the next check:
    the flag element is made on the gradient's device and dtype, and a rank's NaN gradients stay on the device."""
    from tests.privacy.test_agreement import Ranks, Reducing, _a_refusal, _peer_sends

    _peer_sends(monkeypatch, flag=1.0)
    params = [torch.zeros(3, 2, device="cuda", dtype=dtype), torch.zeros(2, device="cuda", dtype=dtype)]
    for p in params:
        p.grad = torch.ones_like(p)
    optimizer = Reducing(params, _a_refusal())
    refusals = LaterRefusals()
    optimizer.agree_on_refusals(refusals)
    assert optimizer.pre_step() is True
    optimizer.reduce_gradients()
    assert all(p.grad.device.type == "cuda" and p.grad.isnan().all() for p in params)
    assert refusals._total is not None and refusals._total.device.type == "cpu" and refusals._total.is_pinned()
    with pytest.raises(RuntimeError, match=r"\(Found on rank 0 of 2 in a step after the first ones"):
        refusals.check(Ranks(0, [(True, False), (True, False)], [None, "rank 1's"]))
