import subprocess
import sys

import pytest
import torch
from sae_factory import make_sae, saved_sae

from captum_faithful import load_sae
from captum_faithful.sae import sae_d_in, sae_hook_name


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu", "gated"])
def test_folder_round_trip(tmp_path, arch):
    folder, sae = saved_sae(tmp_path, arch, hook_name="blocks.2.hook_resid_post")
    loaded = load_sae(folder)
    assert type(loaded) is type(sae)
    for name, value in sae.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], value), name
    x = torch.randn(5, 32)
    assert torch.equal(loaded.encode(x), sae.encode(x))
    assert (
        sae_d_in(loaded) == 32 and sae_hook_name(loaded) == "blocks.2.hook_resid_post"
    )
    assert load_sae(str(folder), device="cpu").W_dec.device.type == "cpu"


def test_instance_is_returned_as_is():
    sae = make_sae("topk")
    assert load_sae(sae) is sae


def test_pretrained_goes_through_from_pretrained(monkeypatch):
    import sae_lens

    calls = []
    sae = make_sae()

    def fake(release, sae_id, device="cpu", **kwargs):
        calls.append((release, sae_id, device))
        return sae

    monkeypatch.setattr(sae_lens.SAE, "from_pretrained", fake)
    assert load_sae(("my-release", "blocks.1.hook_resid_post")) is sae
    assert load_sae("other-release", "layer_3", device="cpu") is sae
    assert calls == [
        ("my-release", "blocks.1.hook_resid_post", "cpu"),
        ("other-release", "layer_3", "cpu"),
    ]


def test_bad_sources(tmp_path):
    with pytest.raises(ValueError, match="not a folder"):
        load_sae(tmp_path / "missing")
    with pytest.raises(TypeError, match="source"):
        load_sae(42)
    with pytest.raises(ValueError, match="release, sae_id"):
        load_sae(("only-release",))
    with pytest.raises(ValueError, match="not both"):
        load_sae(("release", "id"), sae_id="id")
    with pytest.raises(TypeError, match="sae_id"):
        load_sae("release", sae_id=3)


def test_a_local_folder_with_an_sae_id_loads_its_subfolder_never_the_hub(
    tmp_path, monkeypatch
):
    """``load_sae(folder, sae_id)`` with a local folder loads ``folder/sae_id`` (a
    folder of saved SAEs, one per id; ids may be nested, as gemma-scope's are); it
    used to take the folder for a release name and go to the hub."""
    import sae_lens

    calls = []
    monkeypatch.setattr(
        sae_lens.SAE, "from_pretrained", lambda *a, **k: calls.append(a)
    )
    root = tmp_path / "saes"
    saes = {}
    for seed, sae_id in enumerate(["blocks.1.hook_resid_post", "layer_6/width_64"]):
        saes[sae_id] = make_sae(seed=seed)
        saes[sae_id].save_model(root / sae_id)
    for source in (root, str(root)):
        for sae_id, sae in saes.items():
            loaded = load_sae(source, sae_id)
            for name, value in sae.state_dict().items():
                assert torch.equal(loaded.state_dict()[name], value), name
    with pytest.raises(
        ValueError,
        match=r"`sae_id` 'blocks.2.hook_resid_post'.*\['blocks.1.hook_resid_post', "
        r"'layer_6/width_64'\]",
    ):
        load_sae(root, "blocks.2.hook_resid_post")
    for escaping in ("../saes/layer_6/width_64", str(root / "layer_6" / "width_64")):
        with pytest.raises(ValueError, match="`sae_id`.*inside"):
            load_sae(root, escaping)
    # a Path is never a release name, even when it does not exist
    with pytest.raises(ValueError, match="not a folder"):
        load_sae(tmp_path / "missing", "blocks.1.hook_resid_post")
    assert calls == []


def test_broken_folders_raise_errors_that_name_the_path(tmp_path):
    """An empty folder, a corrupt cfg.json and a truncated weights file each give a
    ValueError naming the folder or file (sae-lens raised FileNotFoundError,
    JSONDecodeError and SafetensorError that did not all name it)."""
    folder, _ = saved_sae(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=f"{empty}.*no cfg.json.*empty folder"):
        load_sae(empty)
    config = folder / "cfg.json"
    good_config = config.read_text()
    config.write_text("{not json")
    with pytest.raises(ValueError, match=f"{config} is not valid JSON"):
        load_sae(folder)
    config.write_text(good_config)
    weights = folder / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(
        ValueError, match=f"cannot load the SAE in {folder}.*Safetensor"
    ):
        load_sae(folder)


def test_import_does_not_load_heavy_dependencies():
    code = (
        "import sys, captum_faithful; "
        "print(sorted(m for m in ('sae_lens', 'transformers', 'timm') if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        check=True,
        cwd=str(__import__("pathlib").Path(__file__).parents[1]),
    )
    assert out.stdout.strip() == "[]"


@pytest.mark.parametrize("activation", ["relu", "topk"])
def test_prisma_conversion_recipe(tmp_path, activation):
    """The recipe in the captum_faithful.sae docstring yields an equivalent SAE."""
    import json

    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(0)
    d_in, d_sae, k = 32, 96, 5
    prisma = {
        "W_enc": torch.randn(d_in, d_sae, generator=generator),
        "b_enc": torch.randn(d_sae, generator=generator),
        "W_dec": torch.randn(d_sae, d_in, generator=generator),
        "b_dec": torch.randn(d_in, generator=generator),
    }
    torch.save({"state_dict": prisma}, tmp_path / "prisma_sae.pt")

    state = torch.load(
        tmp_path / "prisma_sae.pt", map_location="cpu", weights_only=True
    )
    state = state.get("state_dict", state)
    folder = tmp_path / "my_sae"
    folder.mkdir(exist_ok=True)
    names = ("W_enc", "b_enc", "W_dec", "b_dec")
    save_file(
        {k: state[k].float().contiguous() for k in names},
        folder / "sae_weights.safetensors",
    )
    cfg = {
        "d_in": state["W_dec"].shape[1],
        "d_sae": state["W_dec"].shape[0],
        "hook_point": "blocks.6.hook_resid_post",
        "activation_fn_str": activation,
        "activation_fn_kwargs": {"k": k} if activation == "topk" else {},
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "dtype": "float32",
    }
    (folder / "cfg.json").write_text(json.dumps(cfg))
    sae = load_sae(folder)

    x = torch.randn(7, d_in, generator=generator)
    pre = (x - prisma["b_dec"]) @ prisma["W_enc"] + prisma["b_enc"]
    expected = torch.relu(pre)
    if activation == "topk":
        kth = pre.topk(k, dim=-1).values[:, -1:]
        expected = torch.where(pre >= kth, expected, torch.zeros_like(pre))
    torch.testing.assert_close(sae.encode(x), expected)
    assert torch.equal(sae.W_dec, prisma["W_dec"])
    assert sae_hook_name(sae) == "blocks.6.hook_resid_post"
