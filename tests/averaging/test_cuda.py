"""IterateAverage and IterateAveraging on a GPU: fp32 and bf16-mixed, averages beside the weights or on the CPU."""

import copy

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn

from lightning_nt import IterateAveraging
from lightning_nt.averaging import IterateAverage, RunningWeightAverage
from tests.averaging.test_faults import PoisonOneStep
from tests.helpers import TinyClassifier, tiny_trainer


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("device", [None, "cpu"])
def test_core_on_the_gpu(dtype, device):
    net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 2)).to("cuda", dtype)
    average = IterateAverage(net, buffers=True, device=device)
    iterates = []
    for step in range(4):
        with torch.no_grad():
            for p in net.parameters():
                p.normal_()
            if step == 2:
                net[0].weight[0, 0] = float("nan")
        iterates.append(net[0].weight.detach().float().clone())
        average.update(net)
    assert (average.n_averaged, average.n_skipped) == (3, 1)
    expected = torch.stack([iterates[i] for i in (0, 1, 3)]).mean(0)
    weight = average.state["0.weight"]
    assert weight.device.type == (device or "cuda") and weight.dtype == torch.float32
    torch.testing.assert_close(weight.cuda(), expected, rtol=0, atol=1e-6)
    raw = {k: v.clone() for k, v in net.state_dict().items()}
    with average.swapped_in(net):
        assert torch.equal(net[0].weight, weight.to("cuda", dtype))
        net(torch.randn(5, 4, device="cuda", dtype=dtype))
    assert all(torch.equal(v, raw[k]) for k, v in net.state_dict().items())
    average.release()


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("device", [None, "cpu"])
def test_callback_on_the_gpu(tmp_path, precision, device):
    pl.seed_everything(0)
    averaging = IterateAveraging(compare_raw=True, apply_on_end=False, device=device)
    checkpoint = ModelCheckpoint(dirpath=tmp_path, monitor="val_loss", save_top_k=1)
    trainer = tiny_trainer(
        None,
        accelerator="gpu",
        precision=precision,
        max_epochs=3,
        callbacks=[averaging, checkpoint],
        enable_checkpointing=True,
    )
    trainer.fit(TinyClassifier(num_samples=96, norm="batch"))
    average = averaging.averaged_state_dict()
    assert averaging.n_averaged == 18
    assert all(t.device.type == (device or "cuda") for t in average.values())
    assert torch.isfinite(trainer.callback_metrics["raw/val_loss"])
    best = trainer.test(ckpt_path="best", verbose=False)[0]["test_loss"]  # the test set is the validation set
    assert best == pytest.approx(checkpoint.best_model_score.item(), abs=1e-4)
    saved = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=False)
    assert "raw_state_dict" in saved["callbacks"][averaging.state_key]


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("mode", "decay", "warmup"), [("uniform", None, None), ("ema", 0.9, 0.75)])
def test_the_update_on_the_gpu_issues_no_host_sync_and_matches_the_cpu(mode, decay, warmup, dtype):
    """On CUDA the flag, the weight and the counts stay on the device: `set_sync_debug_mode("error")` raises at any
    synchronising call inside `update`. The averages equal the CPU's (same iterates, same host path arithmetic) to
    float rounding: the GPU's lerp and its float64 `pow` (warm-up) may differ from the CPU's in the last bit."""
    torch.manual_seed(0)
    cpu_net = nn.Sequential(nn.Linear(64, 33), nn.BatchNorm1d(33), nn.Linear(33, 5)).to(dtype)
    gpu_net = copy.deepcopy(cpu_net).cuda()
    cpu = IterateAverage(cpu_net, mode=mode, decay=decay, warmup=warmup, buffers=True)
    gpu = IterateAverage(gpu_net, mode=mode, decay=decay, warmup=warmup, buffers=True)
    flags = []
    for step in range(12):
        generator = torch.Generator().manual_seed(step)
        with torch.no_grad():
            for tensor in [*cpu_net.parameters(), cpu_net[1].running_mean]:
                tensor.copy_(torch.randn(tensor.shape, generator=generator))
            if step in (0, 5):
                cpu_net[0].weight[3, 7] = float("nan")
            if step == 9:
                cpu_net[2].bias[1] = float("inf")
            cpu_net[1].num_batches_tracked.fill_(step)
            gpu_net.load_state_dict(cpu_net.state_dict())
        torch.cuda.synchronize()
        cpu.update(cpu_net)
        torch.cuda.set_sync_debug_mode("error")
        try:
            flags.append(gpu.update(gpu_net))
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert [bool(flag) for flag in flags] == [step not in (0, 5, 9) for step in range(12)]
    assert (gpu.n_averaged, gpu.n_skipped) == (cpu.n_averaged, cpu.n_skipped) == (9, 3)
    for name, value in cpu.state.items():
        torch.testing.assert_close(gpu.state[name].cpu(), value, rtol=1e-6, atol=1e-6, msg=name)
    assert gpu.state["1.num_batches_tracked"].item() == 11


class _NoSyncUpdates:
    """Runs every `RunningWeightAverage.update` of the fit under `set_sync_debug_mode("error")`."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        original = RunningWeightAverage.update
        self.updates = 0

        def update(average, module):
            torch.cuda.set_sync_debug_mode("error")
            try:
                return original(average, module)
            finally:
                torch.cuda.set_sync_debug_mode("default")
                self.updates += 1

        monkeypatch.setattr(RunningWeightAverage, "update", update)


@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_the_callback_on_the_gpu_updates_without_a_host_sync_and_warns_later(tmp_path, monkeypatch, precision):
    pl.seed_everything(0)
    poison, averaging, no_sync = PoisonOneStep(step=4), IterateAveraging(), _NoSyncUpdates(monkeypatch)
    callbacks = [poison, averaging]
    trainer = tiny_trainer(tmp_path, accelerator="gpu", precision=precision, max_epochs=2, callbacks=callbacks)
    with pytest.warns(UserWarning, match=r"1 iterate\(s\) since step 0 were not finite") as caught:
        trainer.fit(TinyClassifier(num_samples=96))
    assert sum("not finite" in str(w.message) for w in caught) == 1
    assert no_sync.updates == 12 and (averaging.n_averaged, averaging.n_skipped) == (11, 1)
    expected = torch.stack([poison.iterates[s].float() for s in range(1, 13) if s != 4]).mean(0)
    torch.testing.assert_close(averaging.averaged_state_dict()["net.0.weight"], expected, rtol=0, atol=1e-6)
