"""Untrusted files never run code; broken or foreign files give one-line errors, never a half-loaded model."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import vaekit
from tests.conftest import small_config
from vaekit.errors import BadInputError, LoadError, UnsafeFileError
from vaekit.interfaces.cli import main
from vaekit.models import build


class _Payload:
    """Unpickling this would create a file: the attack a malicious .ckpt carries."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


@pytest.mark.parametrize("zipped", [True, False])
def test_malicious_pickle_is_refused_and_never_runs(tmp_path: Path, zipped: bool) -> None:
    target = tmp_path / "pwned"
    evil = tmp_path / "evil.ckpt"
    payload = {"state_dict": {"encoder.conv_in.weight": torch.zeros(1)}, "x": _Payload(str(target))}
    if zipped:
        torch.save(payload, evil)
    else:
        evil.write_bytes(pickle.dumps(payload))
    # sanity: plain unpickling really would run the payload
    assert not target.exists()
    for call in (vaekit.inspect, vaekit.load_vae):
        with pytest.raises(UnsafeFileError, match="refused: this pickle needs code to load"):
            call(evil)
    assert main(["inspect", str(evil)]) == 2
    assert not target.exists()


def _small_sd() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return build(small_config("sd1")).state_dict()


def test_truncated_and_empty_files(tmp_path: Path) -> None:
    good = tmp_path / "good.safetensors"
    save_file(_small_sd(), good)
    data = good.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    (tmp_path / "empty.safetensors").write_bytes(b"")
    (tmp_path / "empty.ckpt").write_bytes(b"")
    torch.save(_small_sd(), tmp_path / "ok.pt")
    (tmp_path / "cut.pt").write_bytes((tmp_path / "ok.pt").read_bytes()[:5000])
    for name in ("cut.safetensors", "empty.safetensors", "empty.ckpt", "cut.pt"):
        with pytest.raises(LoadError) as info:
            vaekit.load_vae(tmp_path / name)
        message = str(info.value)
        assert name in message and "\n" not in message


def test_non_model_files(tmp_path: Path) -> None:
    (tmp_path / "notes.safetensors").write_text("hello, I am not a tensor file")
    (tmp_path / "notes.txt").write_text("hello")
    save_file({"some.weight": torch.zeros(3, 3)}, tmp_path / "other.safetensors")
    torch.save([1, 2, 3], tmp_path / "list.pt")
    expectations = {
        "notes.safetensors": "not a valid safetensors file",
        "notes.txt": "unknown weight format",
        "other.safetensors": "no VAE found",
        "list.pt": "not a dictionary of tensors",
    }
    for name, text in expectations.items():
        with pytest.raises(LoadError, match=text):
            vaekit.inspect(tmp_path / name)
        assert main(["inspect", str(tmp_path / name)]) == 2
    with pytest.raises(LoadError, match="no such file"):
        vaekit.load_vae(tmp_path / "missing.safetensors")
    with pytest.raises(LoadError, match="folder without config.json"):
        vaekit.load_vae(tmp_path)


def test_wrong_family_override_is_an_error(tmp_path: Path) -> None:
    save_file(_small_sd(), tmp_path / "vae.safetensors")
    with pytest.raises(LoadError, match="family sd3 has 16 raw latent channels; this VAE has 4"):
        vaekit.load_vae(tmp_path / "vae.safetensors", family="sd3")


def test_diffusers_folder_of_another_model_class(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}')
    save_file(_small_sd(), tmp_path / "diffusion_pytorch_model.safetensors")
    with pytest.raises(LoadError, match="UNet2DConditionModel, not a VAE"):
        vaekit.load_vae(tmp_path)


def test_bad_tensors_given_to_the_api(small_vae) -> None:
    with pytest.raises(BadInputError, match="channels"):
        small_vae.decode(torch.zeros(1, 16, 4, 4))
    with pytest.raises(BadInputError):
        small_vae.decode(torch.zeros(4, 4))
    with pytest.raises(BadInputError, match="NaN"):
        small_vae.decode(torch.full((1, 4, 4, 4), float("nan")))
    with pytest.raises(BadInputError):
        small_vae.encode(torch.zeros(1, 3, 0, 8))
