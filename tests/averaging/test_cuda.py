"""IterateAverage and IterateAveraging on a GPU: fp32 and bf16-mixed, averages beside the weights or on the CPU."""

import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from torch import nn

from lightning_nt import IterateAveraging
from lightning_nt.averaging import IterateAverage
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
