"""The dataset evaluation harness: file layout, label mapping, counting, and sharding across processes.

A tiny COCO-Stuff-27 dataset is written in the real layout (val2017/*.jpg, annotation_val2017/*.png with fine ids and
255 = unlabelled) from toy scenes; the harness must give the same counts on one process and on two processes
started by `accelerate launch`, each image seen once.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers import diffseg_eval as de
from helpers import toyworld as tw
from helpers.metrics import SegmentationScore

ROOT = Path(__file__).resolve().parent.parent
# toy semantic class (background, circle, square, triangle, star) -> a COCO-Stuff fine id of a distinct coarse class
FINE = np.array([0, 9, 15, 25, 33])


def write_cocostuff(root: Path, n: int = 5, start: int = 300):
    (root / "val2017").mkdir(parents=True)
    (root / "annotation_val2017").mkdir()
    for i in range(n):
        s = tw.heldout_scene(start + i)
        img = np.pad(s.image, ((4, 4), (0, 0), (0, 0)), constant_values=128)      # 64 wide × 72 high
        lab = np.pad(FINE[s.semantic].astype(np.uint8), ((4, 4), (0, 0)), constant_values=255)
        lab[:8, :8] = 255                                                          # some unlabelled pixels inside
        Image.fromarray(img).save(root / "val2017" / f"{i:012d}.jpg", quality=95)
        Image.fromarray(lab).save(root / "annotation_val2017" / f"{i:012d}.png")
    return root


def test_layout_crop_and_label_mapping(tmp_path):
    root = write_cocostuff(tmp_path / "coco", n=2)
    pairs = de.list_files(root, "cocostuff27")
    assert [p.name for p, _ in pairs] == ["000000000000.jpg", "000000000001.jpg"]
    x, y = de.load_pair(*pairs[0], 64, de.lookup_table(de.COCO_FINE_TO_COARSE))
    s = tw.heldout_scene(300)
    expect = np.array([9, 8, 7, 6, 10])[s.semantic]   # the coarse classes of FINE
    expect[:4, :8] = de.IGNORE
    assert x.shape == (3, 64, 64) and y.shape == (64, 64)
    assert (y == expect).all()                        # centre crop removed the padding rows exactly
    assert abs(((x.permute(1, 2, 0) + 1) * 127.5).numpy() - s.image).mean() < 4   # JPEG, nearly the scene


def test_layout_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="val2017 is missing"):
        (tmp_path / "empty").mkdir()
        de.list_files(tmp_path / "empty", "cocostuff27")
    root = write_cocostuff(tmp_path / "coco", n=2)
    (root / "val2017" / "000000000001.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="1 file"):
        de.list_files(root, "cocostuff27")
    with pytest.raises(ValueError, match="unknown dataset"):
        de.list_files(root, "pascal")


def test_counts_are_the_segmentation_scores_of_both_protocols():
    rng = np.random.default_rng(0)
    counts = de.Counts(4)
    ref, present = SegmentationScore(4), SegmentationScore(4, present_only=True)
    for _ in range(6):
        gt = rng.integers(0, 4, (16, 16))
        gt[rng.random((16, 16)) < 0.1] = de.IGNORE
        gt[gt == rng.integers(0, 4)] = 7             # an id outside the classes: unlabelled, as the reference reads it
        pred = np.where(rng.random((16, 16)) < 0.7, gt.clip(0, 3), rng.integers(0, 6, (16, 16)))
        counts.add(pred, gt)
        gt = np.where(gt == 7, de.IGNORE, gt)
        ref.add(pred, gt)
        present.add(pred, gt)
    out = counts.summary()
    assert out["images"] == 6
    assert out["reference"]["miou"] == pytest.approx(ref.miou)
    assert out["reference"]["accuracy"] == pytest.approx(ref.accuracy)
    assert out["present_classes_only"]["miou"] == pytest.approx(present.miou)
    assert out["reference"]["miou"] < out["present_classes_only"]["miou"]   # surplus segments cost under the reference


def _run(cmd, tmp):
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    return r


def test_two_processes_give_the_one_process_result(tmp_path):
    root = write_cocostuff(tmp_path / "coco", n=5)
    args = ["--data", str(root), "--dataset", "cocostuff27", "--model", "toy", "--threshold", "0.3", "--threads", "1"]
    _run([sys.executable, "-m", "helpers.diffseg_eval", *args, "--json", str(tmp_path / "one.json")], tmp_path)
    accelerate = Path(sys.executable).parent / "accelerate"
    _run([str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "29517",
          "-m", "helpers.diffseg_eval", *args, "--json", str(tmp_path / "two.json")], tmp_path)
    one, two = (json.loads((tmp_path / f).read_text()) for f in ("one.json", "two.json"))
    assert one["processes"] == 1 and two["processes"] == 2
    assert two["images_per_process"] == [3, 2] and one["images"] == two["images"] == 5
    assert one["reference"] == two["reference"]
    assert one["present_classes_only"] == two["present_classes_only"]
    # at KL 0.3 DiffSeg finds the shapes but splits the background: scored only against each image's classes the
    # surplus pieces cost little; the reference's matching gives them to absent classes as false positives
    assert one["present_classes_only"]["miou"] > 0.5
    assert one["reference"]["miou"] < one["present_classes_only"]["miou"]


def test_cityscapes_layout_and_ids(tmp_path):
    root = tmp_path / "cityscapes"
    for city in ("bonn", "aachen"):
        (root / "leftImg8bit" / "val" / city).mkdir(parents=True)
        (root / "gtFine" / "val" / city).mkdir(parents=True)
        name = f"{city}_000000_000019"
        Image.fromarray(np.full((32, 64, 3), 100, np.uint8)).save(root / "leftImg8bit" / "val" / city /
                                                                  f"{name}_leftImg8bit.png")
        ids = np.zeros((32, 64), np.uint8)
        ids[:, 16:32], ids[:, 32:48], ids[:, 48:] = 7, 26, 33   # road, car, bicycle; 0 = unlabelled
        Image.fromarray(ids).save(root / "gtFine" / "val" / city / f"{name}_gtFine_labelIds.png")
    pairs = de.list_files(root, "cityscapes")
    assert [p.parent.name for p, _ in pairs] == ["aachen", "bonn"] and all(lab.exists() for _, lab in pairs)
    _, y = de.load_pair(*pairs[0], 16, de.lookup_table(de.CITYSCAPES_ID_TO_CLASS))
    assert y.shape == (16, 16)   # the centre 32 × 32 crop holds ids 7 and 26 → classes 0 and 19
    assert sorted(np.unique(y).tolist()) == [0, 19]
