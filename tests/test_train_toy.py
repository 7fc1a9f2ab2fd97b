import json

import torch

from helpers import toyworld as tw
from helpers.attention import LayerInfo
from helpers.train_toy import PARSER, attention_losses, train


def test_tiny_run_exports_a_loadable_pipeline_and_resumes(tmp_path):
    from diffusers import StableDiffusionPipeline
    work, out = tmp_path / "work", tmp_path / "out"
    args = ["--work", str(work), "--out", str(out), "--vae-steps", "2", "--vae-batch", "4", "--scenes", "16",
            "--batch", "4", "--ckpt-every", "1", "--export-every", "100"]
    train(PARSER.parse_args(args + ["--steps", "2"]))
    meta = json.loads((out / "training.json").read_text())
    assert meta["step"] == 2 and meta["world_version"] == tw.WORLD_VERSION
    train(PARSER.parse_args(args + ["--steps", "3"]))  # resumes from the step-2 checkpoint
    assert json.loads((out / "training.json").read_text())["step"] == 3
    assert torch.load(work / "unet.pt", weights_only=False)["step"] == 3
    p = StableDiffusionPipeline.from_pretrained(str(out))
    p.set_progress_bar_config(disable=True)
    assert p(tw.scene(0).caption, num_inference_steps=2).images[0].size == (64, 64)
    # a finished run exports again to another --out without training (the way to replace the bundled model)
    other = tmp_path / "other"
    train(PARSER.parse_args(args[:2] + ["--out", str(other)] + args[4:] + ["--steps", "3"]))
    assert json.loads((other / "training.json").read_text())["step"] == 3
    assert (other / "unet" / "diffusion_pytorch_model.safetensors").read_bytes() == \
        (out / "unet" / "diffusion_pytorch_model.safetensors").read_bytes()


def test_default_output_is_not_the_bundled_model(tmp_path):
    """`python -m helpers.train_toy` must not overwrite data/toy-sd: that needs --replace-bundled."""
    import pytest

    from helpers.loading import BUNDLED
    from helpers.train_toy import DEFAULT_OUT
    assert DEFAULT_OUT.resolve() != BUNDLED.resolve()
    assert PARSER.parse_args([]).out == str(DEFAULT_OUT) and not PARSER.parse_args([]).replace_bundled
    work = tmp_path / "work"
    with pytest.raises(SystemExit, match="--replace-bundled"):
        train(PARSER.parse_args(["--work", str(work), "--out", str(BUNDLED)]))
    assert not work.exists()  # refused before any work
    with pytest.raises(SystemExit, match="--replace-bundled"):
        train(PARSER.parse_args(["--work", str(work), "--out", str(BUNDLED / ".." / "toy-sd")]))


class _Store:
    def __init__(self, maps):
        self.maps = maps


def test_grounding_loss_prefers_attention_inside_the_mask():
    B, res = 1, 8
    masks = torch.zeros(B, tw.MAX_OBJECTS, 64, 64)
    masks[0, 0, :32, :32] = 1
    slots = torch.tensor([[2, 3, 0, 0, 0, 0]])
    nobj, keep = torch.tensor([1]), torch.tensor([True])
    inside = torch.zeros(B, 1, res * res, 77)
    grid = torch.zeros(res, res); grid[:4, :4] = 1
    inside[..., 2] = grid.flatten(); inside[..., 3] = grid.flatten()
    inside[..., 0] = 1 - grid.flatten()
    uniform = torch.full((B, 1, res * res, 77), 1 / 77)
    cross = LayerInfo("x.attn2.processor", True, "down")
    good, _ = attention_losses(_Store([(cross, (res, res), inside)]), masks, nobj, slots, keep, 1.0)
    bad, _ = attention_losses(_Store([(cross, (res, res), uniform)]), masks, nobj, slots, keep, 1.0)
    assert good.item() < 0.2 < bad.item()
    # self-attention: pixels of the object attending to their own object score better than uniform attention
    selfl = LayerInfo("x.attn1.processor", False, "down")
    own = grid.flatten()[None, :].repeat(res * res, 1); own = own / own.sum(1, keepdim=True)
    _, o_good = attention_losses(_Store([(selfl, (res, res), own[None, None])]), masks, nobj, slots, keep, 1.0)
    _, o_bad = attention_losses(_Store([(selfl, (res, res), torch.full((1, 1, 64, 64), 1 / 64))]), masks, nobj,
                                slots, keep, 1.0)
    assert o_good.item() < 1e-6 < o_bad.item()


def test_refuses_to_resume_checkpoints_of_another_world_version(tmp_path):
    import pytest
    work = tmp_path / "work"
    work.mkdir()
    torch.save({"step": 600}, work / "vae.pt")  # a checkpoint left by a run before world-version markers existed
    args = PARSER.parse_args(["--work", str(work), "--out", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match="toy-world version 1.*Delete that folder or pass another --work"):
        train(args)
    (work / "world-version.txt").write_text(str(tw.WORLD_VERSION + 1))
    with pytest.raises(SystemExit, match=f"version {tw.WORLD_VERSION + 1}"):
        train(args)


def test_same_seed_same_model(tmp_path):
    """The training command is deterministic: two tiny runs from scratch with one seed export identical weights."""
    from safetensors.torch import load_file
    runs = []
    for name in ("a", "b"):
        args = ["--work", str(tmp_path / name / "work"), "--out", str(tmp_path / name / "out"), "--vae-steps", "2",
                "--vae-batch", "4", "--scenes", "16", "--batch", "4", "--steps", "3", "--export-every", "100"]
        train(PARSER.parse_args(args))
        runs.append({part: load_file(next((tmp_path / name / "out" / part).glob("*.safetensors")))
                     for part in ("unet", "vae", "text_encoder")})
    for part, weights in runs[0].items():
        assert weights.keys() == runs[1][part].keys()
        assert all(torch.equal(w, runs[1][part][k]) for k, w in weights.items()), part


def test_bundled_model_was_trained_on_this_world():
    """A change to the toy world must come with a retrained model: every measured number depends on both."""
    from helpers.loading import BUNDLED
    meta = json.loads((BUNDLED / "training.json").read_text())
    assert meta.get("world_version") == tw.WORLD_VERSION, (
        f"data/toy-sd was trained on toy-world version {meta.get('world_version')}, the code draws version "
        f"{tw.WORLD_VERSION}: retrain with `python -m helpers.train_toy` and re-run the model card benchmark")
