"""Which device limits a training takes, and how many slots: names, CUDA_VISIBLE_DEVICES, CPU
cores per thread and rank, the size of a limit created now; no torch at import."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from tests.helpers import REPO
from visionflow.config import load_config
from visionflow.cores import usable_cores
from visionflow.errors import ConfigError, DeviceError
from visionflow.train.device_limits import DeviceClaim, device_claim, gpu_limit_name


def training(**overrides: object):
    return load_config(None, {f"training.{key}": value for key, value in overrides.items()}).training


@pytest.fixture
def torch_threads():
    """Restores torch's thread count after a test that sets it."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize(
    ("index", "visible", "name"),
    [
        (0, None, "device:cuda:0"),
        (3, None, "device:cuda:3"),
        (0, "2,3", "device:cuda:2"),  # a worker given GPU 2 takes the limit of GPU 2, not cuda:0
        (1, "2, 3", "device:cuda:3"),
        (0, "GPU-8f3c1b2a-0000-1111-2222-333344445555", "device:cuda:GPU-8f3c1b2a-0000-1111-2222-333344445555"),
    ],
)
def test_gpu_limit_names_follow_cuda_visible_devices(index: int, visible: str | None, name: str) -> None:
    assert gpu_limit_name(index, visible) == name


def test_a_cpu_training_takes_the_cores_its_threads_use(torch_threads: None) -> None:
    claim = device_claim(training(device="cpu"))
    assert claim == DeviceClaim(("device:cpu",), torch.get_num_threads(), usable_cores())
    torch.set_num_threads(1)  # a sweep trial's share (sweep.trial_threads)
    assert device_claim(training(device="cpu")).occupy == 1
    assert device_claim(training(device="cpu", device_slots=1)).slots == 1


def test_ranks_take_the_cores_they_share(torch_threads: None) -> None:
    claim = device_claim(training(device="cpu", **{"distributed.nproc_per_node": 2}))
    assert claim.names == ("device:cpu",)
    assert claim.occupy == 2 * max(1, usable_cores() // 2)  # launch.run_ranks' threads per rank


def test_auto_resolves_to_the_device_it_trains_on() -> None:
    expected = "device:cuda:0" if torch.cuda.is_available() else "device:cpu"
    assert device_claim(training(device="auto")).names[0] == expected


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")
def test_a_missing_device_is_an_error_before_any_limit() -> None:
    with pytest.raises(DeviceError, match="CUDA is not available"):
        device_claim(training(device="cuda:1"))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_ranks_take_one_slot_of_each_gpu() -> None:
    count = torch.cuda.device_count()
    claim = device_claim(training(device="cuda", **{"distributed.nproc_per_node": "gpu"}))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    assert claim.names == tuple(gpu_limit_name(i, visible) for i in range(count))
    assert (claim.occupy, claim.slots) == (1, 1)


@pytest.mark.parametrize("values", [{"names": ()}, {"occupy": 0}, {"slots": 0}])
def test_a_claim_without_limits_or_slots_is_refused(values: dict) -> None:
    with pytest.raises(ValueError, match="Invalid device claim"):
        DeviceClaim(**{"names": ("device:cpu",), "occupy": 1, "slots": 1, **values})


def test_device_slots_is_validated() -> None:
    with pytest.raises(ConfigError, match="training.device_slots"):
        load_config(None, {"training.device_slots": 0})


def test_the_module_imports_no_torch() -> None:
    code = "import sys, visionflow.train.device_limits; assert 'torch' not in sys.modules, 'torch imported'"
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
