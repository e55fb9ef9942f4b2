"""Diffusion-DPO: the loss against a hand computation, the preference-pair sources, pairs through the stream,
and training from a checkpoint with its reference recorded, resumed bitwise and checked on resume."""

import io
import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import train_here
from PIL import Image
from test_train import assert_bitwise_equal, metrics

from ldm_ddp.checkpoint import load_checkpoint
from ldm_ddp.config import ConfigError, load_config
from ldm_ddp.data.pairs import PairFolderSource, PickAPicSource, ShapesPairsSource
from ldm_ddp.data.shapes import ShapesSource
from ldm_ddp.data.stream import ShardedStream
from ldm_ddp.objectives import DiffusionDPOLoss
from ldm_ddp.schedule import NoiseSchedule


class Scaled(torch.nn.Module):
    """A stand-in UNet: v = w * x_t + the mean of the context (so the prediction depends on the caption)."""

    def __init__(self, w: float):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(w))

    def forward(self, x_t, t, encoder_hidden_states):
        class Out:
            sample = self.w * x_t + encoder_hidden_states.mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return Out()


def test_the_dpo_loss_is_the_papers_formula_computed_by_hand():
    schedule = NoiseSchedule(1000, "scaled_linear", 0.00085, 0.012, True)
    beta, b = 300.0, 3
    latents = torch.randn(2 * b, 4, 2, 2, generator=torch.Generator().manual_seed(1))
    context = torch.randn(b, 5, 6, generator=torch.Generator().manual_seed(2))
    objective = DiffusionDPOLoss(schedule, Scaled(0.3), beta, autocast=False, reference={"sha256": "x"})
    model = Scaled(0.5)
    loss = objective(model, latents, {"encoder_hidden_states": context}, torch.Generator().manual_seed(9),
                     autocast=False)

    gen = torch.Generator().manual_seed(9)  # the same draws, in the objective's order: t, then the noise
    t = torch.randint(0, 1000, (b,), generator=gen)
    noise = torch.randn(b, 4, 2, 2, generator=gen)
    a = schedule.alphas_cumprod
    for i in range(b):
        errors = {}
        for name, w in (("model", 0.5), ("ref", 0.3)):
            for side, x0 in (("w", latents[i]), ("l", latents[b + i])):
                ab = a[t[i]]
                x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * noise[i]
                v = ab.sqrt() * noise[i] - (1 - ab).sqrt() * x0
                pred = w * x_t + context[i].mean()
                errors[name, side] = ((pred - v) ** 2).mean().item()
        inside = -beta / 2 * ((errors["model", "w"] - errors["model", "l"])
                              - (errors["ref", "w"] - errors["ref", "l"]))
        assert math.isclose(loss.weighted[i].item(), -math.log(1 / (1 + math.exp(-inside))), rel_tol=1e-4)
        assert math.isclose(loss.plain[i].item(), errors["model", "w"], rel_tol=1e-5)
        assert loss.figures["dpo_reward_accuracy"][i].item() == float(inside > 0)
        assert math.isclose(loss.figures["dpo_reward_margin"][i].item(), inside, rel_tol=1e-4, abs_tol=1e-6)
        diff = (errors["model", "w"] - errors["ref", "w"] + errors["model", "l"] - errors["ref", "l"]) / 2
        assert math.isclose(loss.figures["dpo_model_minus_reference"][i].item(), diff, rel_tol=1e-4)
    assert torch.equal(loss.t, t)
    loss.weighted.mean().backward()
    assert model.w.grad is not None and objective.reference.w.grad is None  # the reference stays frozen


def png(size, colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG")
    return buf.getvalue()


def test_a_pairs_folder_serves_its_good_lines_and_names_the_rest(tmp_path, capsys):
    (tmp_path / "img").mkdir()
    for name, size, colour in (("a", (96, 64), "red"), ("b", (64, 64), "blue"), ("c", (64, 96), "green")):
        (tmp_path / "img" / f"{name}.png").write_bytes(png(size, colour))
    lines = [{"caption": "one", "preferred": "img/a.png", "rejected": "img/b.png"},
             "not json", {"caption": "two", "preferred": "img/c.png"},
             {"caption": "three", "preferred": "img/a.png", "rejected": "img/gone.png"},
             {"caption": "four", "preferred": "img/c.png", "rejected": "img/a.png"}]
    text = "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines)
    (tmp_path / "pairs.jsonl").write_text(text)
    source = PairFolderSource(str(tmp_path))
    assert len(source) == 2 and [source.key(i) for i in range(2)] == ["pairs.jsonl:1", "pairs.jsonl:5"]
    assert source.start_line() == (f"data: pairs {tmp_path}: 2 samples (left out: 2 unreadable lines, "
                                   "1 line naming a missing image)")
    warned = capsys.readouterr().out
    assert "line 2: JSONDecodeError" in warned and "line 3: KeyError" in warned and "gone.png" in warned
    sample = source[1]
    assert sample["caption"] == "four"
    assert sample["image"].size == (64, 96) and sample["rejected"].size == (96, 64)
    assert source.image_sizes().tolist() == [[96, 64], [64, 96]]  # the preferred images' sizes
    assert source.raw(0)["rejected"] == (tmp_path / "img" / "b.png").read_bytes()
    (tmp_path / "pairs.jsonl").write_text("not json\n")
    with pytest.raises(ConfigError, match="no usable pair"):
        PairFolderSource(str(tmp_path))


def test_pickapic_parquet_leaves_ties_out_and_orders_each_pair(tmp_path):
    jpg0 = [png((64, 64), c) for c in ("red", "green", "blue", "black", "white")]
    jpg1 = [png((64, 64), c) for c in ("yellow", "purple", "gray", "orange", "pink")]
    table = pa.table({"caption": ["a", "b", "c", "d", "e"], "jpg_0": jpg0, "jpg_1": jpg1,
                      "label_0": [1.0, 0.5, 0.0, None, 1.0]})
    pq.write_table(table, tmp_path / "part.parquet", row_group_size=2)
    source = PickAPicSource(str(tmp_path))
    assert len(source) == 3 and source.shard_sizes() == [1, 1, 1]  # rows a, c and e (row groups of 2)
    assert "1 tie" in source.start_line() and "1 row without a 0/1 label" in source.start_line()
    assert [source.key(i) for i in range(3)] == ["part/0", "part/2", "part/4"]
    assert source.raw(0)["image"] == jpg0[0] and source.raw(0)["rejected"] == jpg1[0]
    assert source.raw(1)["image"] == jpg1[2] and source.raw(1)["rejected"] == jpg0[2]  # label_0 = 0
    assert source[2]["caption"] == "e"
    pq.write_table(pa.table({"caption": ["a"], "jpg_0": [jpg0[0]]}), tmp_path / "part.parquet")
    with pytest.raises(ConfigError, match="not in the Pick-a-Pic layout: no column 'jpg_1'"):
        PickAPicSource(str(tmp_path))


def test_the_built_in_pairs_differ_from_their_caption_in_one_attribute():
    from ldm_ddp.shapes_check import check_image
    source = ShapesPairsSource(seed=7, num_samples=40, resolution=64)
    changed = []
    for i in range(40):
        sample = source[i]
        want = {k: sample["attrs"][k] for k in ("colour", "shape", "size", "position")}
        assert check_image(np.asarray(sample["image"])) == want
        seen = check_image(np.asarray(sample["rejected"]))
        assert [k for k in want if seen[k] != want[k]] == [sample["changed"]]
        changed.append(sample["changed"])
    assert set(changed) == {"shape", "colour", "size", "position"}
    assert source.fingerprint() != ShapesSource(seed=7, num_samples=40).fingerprint()  # caches tell apart


def test_a_pair_is_one_sample_of_the_stream_and_is_replaced_whole(tmp_path):
    (tmp_path / "img").mkdir()
    for i in range(6):
        (tmp_path / "img" / f"{i}.png").write_bytes(png((80, 64), (40 * i, 0, 0)))
    (tmp_path / "img" / "bad.png").write_bytes(b"not an image")
    rows = [{"caption": f"pair {i}", "preferred": f"img/{i}.png", "rejected": f"img/{5 - i}.png"}
            for i in range(6)]
    rows[2]["rejected"] = "img/bad.png"
    (tmp_path / "pairs.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    source = PairFolderSource(str(tmp_path))
    from ldm_ddp.data.transforms import ImageTransform
    stream = ShardedStream(source, lambda caps: torch.zeros(len(caps), 4, dtype=torch.long), 64, 3, 1, 0, 1,
                           seed=0, transform=ImageTransform(64, crop="random"))
    seen = []
    for k in range(2):  # one epoch: 6 positions
        batch = stream.micro_batch(k)
        assert batch["images"].shape == (6, 3, 64, 64) and len(batch["captions"]) == 3
        for j, caption in enumerate(batch["captions"]):
            i = int(caption.split()[1])
            seen.append(i)
            # the same crop for both images: a 64 px window of 80 px wide images, same offset
            preferred, rejected = batch["images"][j], batch["images"][3 + j]
            assert (preferred[0] == 40 * i).all() and (rejected[0] == 40 * (5 - i)).all()
        if batch["bad"]:
            assert [key for key, _ in batch["bad"]] == ["pairs.jsonl:3"]
    assert 2 not in seen and len(seen) == 6  # pair 2 (a bad rejected image) replaced, whole, by a substitute


@pytest.fixture(scope="module")
def start_checkpoint(tmp_path_factory, tiny_args):
    out = tmp_path_factory.mktemp("start") / "run"
    train_here(*tiny_args(out, train__max_steps=2))
    return out / "checkpoints" / "step_0000002.safetensors"


def dpo_args(tiny_args, out, start, **changes):
    return tiny_args(out, **{"data__source": "shapes_pairs", "train__objective": "dpo",
                             "model__unet_init": str(start), "train__dpo_beta": 500.0,
                             "train__caption_dropout": 0.0, **changes})


def test_config_pairs_go_with_dpo_and_dpo_with_a_start(tmp_path, tiny_args, start_checkpoint):
    with pytest.raises(ConfigError, match="data.source: expected a source of preference pairs"):
        load_config(overrides=tiny_args(tmp_path, train__objective="dpo",
                                        model__unet_init=str(start_checkpoint)))
    with pytest.raises(ConfigError, match="data.source: expected a source of preference pairs"):
        load_config(overrides=tiny_args(tmp_path, data__source="shapes_pairs"))
    with pytest.raises(ConfigError, match="model.unet_init: expected the model to tune"):
        load_config(overrides=tiny_args(tmp_path, data__source="shapes_pairs", train__objective="dpo"))
    with pytest.raises(ConfigError, match="model.unet_init: expected a UNet folder"):
        load_config(overrides=dpo_args(tiny_args, tmp_path, tmp_path / "missing.safetensors"))


@pytest.mark.slow
def test_dpo_trains_from_a_checkpoint_resumes_bitwise_and_refuses_another_reference(tmp_path, tiny_args,
                                                                                    start_checkpoint):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    common = {"ckpt__every": 2, "train__seed": 5}
    stdout = train_here(*dpo_args(tiny_args, straight, start_checkpoint, train__max_steps=4,
                                  sample__every=4, **common))
    assert "reward acc" in stdout
    train_here(*dpo_args(tiny_args, resumed, start_checkpoint, train__max_steps=2, **common))
    train_here(*dpo_args(tiny_args, resumed, start_checkpoint, train__max_steps=4, **common))
    final = "checkpoints/step_0000004.safetensors"
    assert_bitwise_equal(straight / final, resumed / final)
    records = metrics(straight)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(0 <= r["dpo_reward_accuracy"] <= 1 and math.isfinite(r["dpo_reward_margin"]) for r in records)
    assert records[0]["dpo_model_minus_reference"] == 0  # the first step: the model is the reference
    tensors, meta = load_checkpoint(straight / final)
    start_tensors, _ = load_checkpoint(start_checkpoint)
    reference = meta["dpo_reference"]
    assert reference["path"] == str(start_checkpoint) and reference["weights"] == "ema"
    assert len(reference["sha256"]) == 64
    assert {k.split(".", 1)[0] for k in tensors} == {"unet", "ema", "optim"}  # the reference is not stored
    assert any(not torch.equal(tensors[k], start_tensors[k.replace("unet.", "ema.", 1)])
               for k in tensors if k.startswith("unet."))  # tuned away from the start
    with pytest.raises(ConfigError, match="dpo_reference .* in the checkpoint, .* now"):
        train_here(*dpo_args(tiny_args, resumed, start_checkpoint, train__max_steps=6,
                             model__init_weights="raw", **common))
    from PIL import Image as PILImage
    grid = PILImage.open(straight / "samples" / "step_0000004.png")
    assert grid.size[0] >= 2 * 2 * 64  # reference and tuned EMA side by side, two prompts per row


@pytest.mark.slow
def test_a_latent_cache_of_pairs_serves_both_images_moments_and_trains(tmp_path, tiny_args, start_checkpoint):
    """precompute_latents on a pair source: each sample keeps the preferred and the rejected image's moments
    (flipped too), served [2B] as the online stream's images are, and DPO trains from the cache."""
    from ldm_ddp.data.latents import LatentSource
    from ldm_ddp.data.transforms import ImageTransform
    from ldm_ddp.models import load_frozen
    from ldm_ddp.precompute import precompute_latents

    cfg = load_config(overrides=dpo_args(tiny_args, tmp_path / "unused", start_checkpoint,
                                         data__shapes_num_samples=6, data__random_flip=True,
                                         model__frozen_dtype="fp32", train__device="cpu"))
    manifest = precompute_latents(cfg, str(tmp_path / "cache"), batch=4, shard_size=4)
    assert manifest["made_with"]["pairs"] is True and manifest["num_samples"] == 6
    cached = LatentSource(str(tmp_path / "cache"))
    assert cached.pairs
    frozen = load_frozen(cfg.model.pretrained, "fp32", torch.device("cpu"))
    transform = ImageTransform(64, "center", True)
    online = ShardedStream(ShapesPairsSource(seed=0, num_samples=6), frozen.tokenize, 64, 3, 1, 0, 1, seed=0,
                           transform=transform)
    from_cache = ShardedStream(cached, frozen.tokenize, 64, 3, 1, 0, 1, seed=0, transform=transform)
    for k in range(2):  # the cache's shards order it otherwise than the source: compare key by key
        batch = from_cache.micro_batch(k)
        assert batch["moments"].shape == (6, 8, 8, 8)  # 3 pairs: 3 preferred, then their 3 rejected
        for j, (position, key) in enumerate(zip(from_cache.positions(k), batch["keys"])):
            sample, _ = online.load(int(key.split("/")[1]), position)  # the online pixels at this position
            expected = frozen.encode_moments(torch.stack([sample["image"], sample["rejected"]]))
            torch.testing.assert_close(batch["moments"][[j, 3 + j]].float(), expected.float(), atol=2e-3,
                                       rtol=2e-3)
    out = tmp_path / "run"
    train_here(*dpo_args(tiny_args, out, start_checkpoint, data__source="latents",
                         data__path=str(tmp_path / "cache"), model__frozen_dtype="fp32",
                         data__random_flip=True, train__max_steps=2))
    assert [r["step"] for r in metrics(out)] == [1, 2] and "dpo_reward_accuracy" in metrics(out)[0]
    with pytest.raises(ConfigError, match="holds preference pairs, and train.objective is diffusion"):
        train_here(*tiny_args(tmp_path / "plain", data__source="latents", data__path=str(tmp_path / "cache"),
                              model__frozen_dtype="fp32", data__random_flip=True, train__max_steps=1))


@pytest.mark.slow
def test_the_demo_preference_set_pairs_each_wrong_sample_with_a_right_one(tmp_path, start_checkpoint):
    """make_demo_pairs on a barely trained checkpoint: every rejected image is wrong for its caption by the
    checker, every preferred one right (a sample, or the caption's rendering), and the folder is a source."""
    from ldm_ddp.data.shapes import all_prompts
    from ldm_ddp.preference import make_demo_pairs
    from ldm_ddp.shapes_check import ATTRIBUTES, check_image

    counts = make_demo_pairs(str(start_checkpoint), str(tmp_path / "pairs"), per_prompt=1)
    assert counts["images"] == 180 and counts["pairs"] == 180 - counts["right"] > 0
    targets = {t["caption"]: t for t in all_prompts()}
    rows = [json.loads(line) for line in (tmp_path / "pairs" / "pairs.jsonl").read_text().splitlines()]
    assert len(rows) == counts["pairs"]
    for row in rows[:40]:
        want = targets[row["caption"]]
        for side, right in (("preferred", True), ("rejected", False)):
            seen = check_image(Image.open(tmp_path / "pairs" / row[side]))
            assert all(seen[a] == want[a] for a in ATTRIBUTES) == right, (row, side)
    assert sum("rendered" in row["preferred"] for row in rows) == counts["rendered"] > 0
    assert len(PairFolderSource(str(tmp_path / "pairs"))) == counts["pairs"]


@pytest.mark.slow
def test_a_compiled_dpo_step_compiles_the_reference_probes_pairs_and_gives_the_eager_loss(tiny_unet_json,
                                                                                        monkeypatch):
    """train.compile=full with Diffusion-DPO (speed.prepare_unet as the trainer calls it): the probe runs a
    micro-batch of pairs (both images), the frozen reference's forward goes through a compiled graph of its
    own, and the loss is the eager one (aot_eager backend: real capture, eager kernels; see test_speed)."""
    from ldm_ddp import speed
    from ldm_ddp.config import load_config
    from ldm_ddp.models import build_unet

    monkeypatch.setattr(speed, "COMPILE_BACKEND", "aot_eager")
    cfg = load_config(overrides=[f"--model.unet={tiny_unet_json}", "--train.compile=full",
                                 "--data.batch_per_gpu=2", "--train.precision=fp32"])
    torch.manual_seed(0)
    unet = build_unet(cfg.model, 8, 64)
    schedule = NoiseSchedule(1000, "scaled_linear", 0.00085, 0.012, True)
    objective = DiffusionDPOLoss(schedule, unet, 500.0, False, {"path": "start"})
    pairs = {"encoder_hidden_states": torch.randn(4, 16, 64)}  # 2 pairs: both images' captions
    model = speed.prepare_unet(unet, cfg, torch.device("cpu"), 1, pairs, False, objective)
    assert type(model).__name__ == type(objective.run_reference).__name__ == "OptimizedModule"
    assert objective.run_reference._orig_mod is objective.reference  # the live samples keep the eager one
    latents, cond = torch.randn(4, 4, 8, 8), {"encoder_hidden_states": torch.randn(2, 16, 64)}
    losses = []
    for step_model in (model, unet):
        if step_model is unet:
            objective.run_reference = objective.reference
        loss = objective(step_model, latents, cond, torch.Generator().manual_seed(3), False)
        losses.append(torch.stack([loss.weighted, loss.plain, *loss.figures.values()]))
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)


def test_the_reference_hash_reads_channels_last_weights_in_logical_order():
    """The trainer makes the UNet channels-last on a GPU before the reference is hashed: a 1x1 convolution's
    weight is then "contiguous" with a last stride above 1, which a byte view refuses. The hash is that of the
    same weights in the default layout, so a checkpoint's reference matches across devices."""
    from ldm_ddp.objectives import tensors_sha256
    torch.manual_seed(0)
    plain = torch.nn.Sequential(torch.nn.Conv2d(8, 4, 1), torch.nn.Conv2d(4, 4, 3))
    forced = torch.nn.Sequential(torch.nn.Conv2d(8, 4, 1), torch.nn.Conv2d(4, 4, 3))
    forced.load_state_dict(plain.state_dict())
    forced.to(memory_format=torch.channels_last)
    assert forced[0].weight.stride(-1) != 1 and forced[0].weight.is_contiguous()
    assert tensors_sha256(forced) == tensors_sha256(plain)
    with torch.no_grad():
        forced[1].weight[0, 0, 0, 1] += 1
    assert tensors_sha256(forced) != tensors_sha256(plain)
