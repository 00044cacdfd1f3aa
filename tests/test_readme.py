"""The README's quickstart runs as printed."""

import re
from pathlib import Path

import torch

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_quickstart_runs(capsys):
    text = README.read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python quickstart"
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    attributions, images = namespace["attributions"], namespace["images"]
    assert attributions.shape == images.shape
    assert namespace["baselines"].shape == images.shape
    # the convergence delta is the completeness gap of IG on the learned baseline
    model = namespace["model"]
    with torch.no_grad():
        out = model(images)
        target = out.argmax(1, keepdim=True)
        rise = out.gather(1, target) - model(namespace["baselines"]).gather(1, target)
    gap = attributions.flatten(1).sum(1) - rise.squeeze(1)
    assert torch.allclose(namespace["delta"], gap, atol=1e-4)
    printed = capsys.readouterr().out
    assert "insertion" in printed and "SaCo" in printed
    # "epsilon: the paper's 0.25 at 3x224x224, scaled to 3x32x32: 0.25 / 7"
    assert f"epsilon {0.25 / 7}" in printed
    distance = (namespace["baselines"] - images).flatten(1).norm(dim=1)
    torch.testing.assert_close(
        distance, torch.full_like(distance, 0.25 / 7), atol=1e-6, rtol=0
    )


def test_readme_shows_the_two_setup_commands_first():
    text = README.read_text()
    first_block = re.search(r"```bash\n(.*?)```", text, flags=re.S).group(1)
    assert first_block.splitlines()[0].startswith("make demo")
    assert first_block.splitlines()[1].startswith("make test")


def test_readme_links_stay_inside_the_repository():
    """Every relative link names a file of the repository; nothing points outside it."""
    text = README.read_text()
    targets = re.findall(r"\]\(([^)#]+)(?:#[^)]*)?\)", text)
    relative = [t for t in targets if not t.startswith(("http://", "https://"))]
    assert "docs/hyperparameters.md" in relative and "docs/methods.md" in relative
    root = README.parent.resolve()
    for target in relative:
        path = (root / target).resolve()
        assert path.is_relative_to(root), target
        assert path.exists(), target
    assert "SPEC.md" not in text and "shared/" not in text
