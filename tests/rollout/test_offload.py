"""Offload round trips are bit-exact and really free the tensors (disk mode)."""

import pytest
import torch

from rollout.offload import Offloader, resolve_mode
from tests.helpers.tiny import tiny_llama


def trained_state():
    model = tiny_llama(0).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    ids = torch.randint(3, 40, (2, 6))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    model(input_ids=ids, labels=ids).loss.backward()  # leave gradients in place too
    return model, opt


def snapshot(model, opt):
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    bufs = {n: b.clone() for n, b in model.named_buffers()}
    state = {id(p): {k: v.clone() for k, v in s.items() if torch.is_tensor(v)} for p, s in opt.state.items()}
    return params, grads, bufs, state


def assert_same(model, opt, snap):
    params, grads, bufs, state = snap
    for n, p in model.named_parameters():
        assert torch.equal(p.detach(), params[n]) and p.dtype == params[n].dtype, n
        assert torch.equal(p.grad, grads[n]), n
    for n, b in model.named_buffers():
        assert torch.equal(b, bufs[n]), n
    for p, s in opt.state.items():
        for k, v in state[id(p)].items():
            assert torch.equal(s[k], v)


@pytest.mark.parametrize("mode", ["cpu", "disk"])
def test_round_trip_is_bit_exact(tmp_path, mode):
    model, opt = trained_state()
    snap = snapshot(model, opt)
    off = Offloader(model, opt, folder=tmp_path / "off")
    moved = off.offload(mode)
    assert moved > 0 and off.offloaded
    if mode == "disk":
        assert all(p.numel() == 0 for p in model.parameters())
        assert all(v.numel() == 0 for s in opt.state.values() for v in s.values() if torch.is_tensor(v) and v.dim())
        assert (tmp_path / "off" / "tensors.safetensors").exists()
    off.onload()
    assert not off.offloaded
    assert_same(model, opt, snap)
    # the optimizer still works on the restored tensors
    ids = torch.randint(3, 40, (2, 6))
    model(input_ids=ids, labels=ids).loss.backward()
    opt.step()
    if mode == "disk":
        assert not (tmp_path / "off").exists()


def test_errors_and_auto_mode(tmp_path):
    model, opt = trained_state()
    assert resolve_mode("auto", torch.device("cpu")) == "disk"
    assert resolve_mode("auto", torch.device("cuda", 0)) == "cpu"
    with pytest.raises(ValueError, match="offload mode"):
        resolve_mode("gpu", torch.device("cpu"))
    off = Offloader(model, opt)
    with pytest.raises(ValueError, match="needs a folder"):
        off.offload("disk")
    off = Offloader(model, opt, folder=tmp_path)
    off.offload("cpu")
    with pytest.raises(RuntimeError, match="already offloaded"):
        off.offload("cpu")
    off.onload()
